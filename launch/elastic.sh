#!/usr/bin/env bash
# Elastic hvd-train through horovodrun: workers may die or join mid-run, training goes on.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: launch/elastic.sh --min-np A --max-np B --discovery SCRIPT [options] [-- HVD_TRAIN_ARGS...]

Runs hvd-train elastic (Gloo) with horovodrun: between A and B processes on the hosts SCRIPT
prints (one host:slots per line; polled every second). A lost worker costs the batches since
the last commit (--commit-every, default each epoch end) and the Gloo timeout below; a host that
appears is joined at the next commit. Fewer than A processes for --elastic-timeout: the job fails
(meanwhile a line every few seconds says what it waits for).
  --min-np A            fewest processes to train with
  --max-np B            most processes to use
  --discovery SCRIPT    executable printing the available hosts (samples: launch/discover/)
  -n, --np N            processes to start with (default: A)
  --slots N             slots of a host line without :slots (default 1)
  --elastic-timeout S   wait at most S seconds for A processes (default 600, Horovod's)
  --reset-limit N       fail after N resets (default: no limit)
  --gloo-timeout S      a dead peer is noticed after at most S seconds, and an added host
                        is joined S seconds after it appears (default 10;
                        \$HOROVOD_GLOO_TIMEOUT_SECONDS; Horovod's own default is 30)
  --network-interface IF  the interface(s) Gloo uses, e.g. lo or eth0 (default: lo when every
                        listed host is this machine, else Horovod finds them)
  -h, --help            this text
Everything after -- goes to hvd-train (see: hvd-train --help). Environment: VENV (default: the
repository's .venv), DRY_RUN=1 (print the command instead of running it).
Example: launch/elastic.sh --min-np 1 --max-np 4 --discovery launch/discover/hostfile.sh -- --epochs 20
USAGE
}

prog=elastic.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
venv="$(venv_dir)"
min_np="" max_np="" discovery="" np="" slots=1 elastic_timeout=600 reset_limit="" nic=""
gloo_timeout="${HOROVOD_GLOO_TIMEOUT_SECONDS:-10}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --min-np) min_np="${2:?--min-np needs a number}"; shift 2 ;;
    --max-np) max_np="${2:?--max-np needs a number}"; shift 2 ;;
    --discovery) discovery="${2:?--discovery needs a script}"; shift 2 ;;
    -n|--np) np="${2:?--np needs a number}"; shift 2 ;;
    --slots) slots="${2:?--slots needs a number}"; shift 2 ;;
    --elastic-timeout) elastic_timeout="${2:?--elastic-timeout needs seconds}"; shift 2 ;;
    --reset-limit) reset_limit="${2:?--reset-limit needs a number}"; shift 2 ;;
    --gloo-timeout) gloo_timeout="${2:?--gloo-timeout needs seconds}"; shift 2 ;;
    --network-interface) nic="${2:?--network-interface needs a name}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "elastic.sh: unknown option $1 (hvd-train options go after --)" >&2; usage >&2; exit 2 ;;
  esac
done

[[ -n "$min_np" && -n "$max_np" && -n "$discovery" ]] || die "--min-np, --max-np and --discovery are required"
require_np "$min_np"
require_np "$max_np"
np="${np:-$min_np}"
require_np "$np"
(( min_np <= np && np <= max_np )) || die "need --min-np <= --np <= --max-np (got $min_np <= $np <= $max_np)"
require_np "$slots"
require_np "$elastic_timeout"
require_np "$gloo_timeout"
[[ -z "$reset_limit" ]] || require_np "$reset_limit"
[[ -f "$discovery" ]] || die "discovery script $discovery does not exist"
[[ -x "$discovery" ]] || die "discovery script $discovery is not executable (chmod +x it)"
# horovodrun runs it from elsewhere: an absolute path.
discovery="$(cd "$(dirname "$discovery")" && pwd)/$(basename "$discovery")"
[[ -x "$venv/bin/hvd-horovodrun" ]] || die "no hvd-horovodrun in $venv (run 'make setup' or set VENV)"

# Horovod compares two hosts' network interfaces before an elastic job starts, and waits without
# a word (up to --elastic-timeout) while it cannot. When every host the discovery script lists is
# this machine there is nothing to compare: Gloo gets the loopback interface.
# The discovery script's "host[:slots]" lines as "host slots" (--slots for a line without them).
listed_hosts() {
  local line
  while read -r line; do
    if [[ "$line" =~ ^([^[:space:]:]+)(:([0-9]+))?$ ]]; then
      echo "${BASH_REMATCH[1]} ${BASH_REMATCH[3]:-$slots}"
    fi
  done <<<"$1"
}

# Horovod compares two hosts' network interfaces before an elastic job starts, and waits without
# a word (up to --elastic-timeout) while it cannot. When every host the discovery script lists is
# this machine there is nothing to compare: Gloo gets the loopback interface.
discovered="$(listed_hosts "$("$discovery" 2>/dev/null || true)")"
if [[ -z "$nic" && -n "$discovered" ]]; then
  names="$(this_machine)" all_here=1
  while read -r host _; do
    [[ "$names" == *" $host "* ]] || all_here=0
  done <<<"$discovered"
  if (( all_here )); then
    nic=lo
    echo "elastic.sh: every host the discovery script lists is this machine: Gloo uses the loopback interface (--network-interface lo)" >&2
  fi
fi

# While fewer than --min-np slots are listed, horovodrun waits in silence: say what for, every
# few seconds, until there are enough (or the job ends).
wait_for_hosts() {
  local listed total n
  while :; do
    listed="$("$discovery" 2>&1)" || listed="the discovery script failed: ${listed##*$'\n'}"
    total=0
    while read -r _ n; do
      total=$((total + ${n:-0}))
    done <<<"$(listed_hosts "$listed")"
    (( total < min_np )) || return 0
    echo "elastic.sh: waiting for hosts: --min-np $min_np needs $min_np slot(s), the discovery script lists $total (${listed//$'\n'/ }); the job gives up after --elastic-timeout $elastic_timeout s" >&2
    sleep "${ELASTIC_WAIT_REPORT_SECONDS:-5}"
  done
}

# Horovod: a worker blocked on a dead peer gives up after this long, then the reset starts.
export HOROVOD_GLOO_TIMEOUT_SECONDS="$gloo_timeout"
# horovodrun, without the TensorFlow import of its build check (hvd_train/launchers/horovodrun.py).
command=("$venv/bin/hvd-horovodrun" -np "$np" --min-np "$min_np" --max-np "$max_np"
         --host-discovery-script "$discovery" --slots-per-host "$slots" --elastic-timeout "$elastic_timeout")
[[ -z "$reset_limit" ]] || command+=(--reset-limit "$reset_limit")
[[ -z "$nic" ]] || command+=(--network-interface "$nic")
if [[ -z "${DRY_RUN:-}" ]]; then
  wait_for_hosts &
  helper=$!
fi
run_command "${command[@]}" "$venv/bin/hvd-train" "$@"
