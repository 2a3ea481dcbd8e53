#!/usr/bin/env bash
# Line coverage of hvd_train/ over the test suite, the ranks under the launchers included.
#
# Every Python process the tests start (horovodrun's ranks, mpirun's, hvd-bench's workers,
# sweep trials, Slurm steps, Ray workers on this machine) measures itself: a .pth file in the
# venv starts coverage.py at interpreter start-up when COVERAGE_PROCESS_START is set, and each
# process writes its own data file (parallel = true), combined at the end. Processes killed with
# SIGKILL write nothing (their lines are counted where another process ran them); SIGTERM saves.
# Not measured: the container test's ranks (another Python, inside the image).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/coverage.sh [PYTEST_ARGS...]

Runs the test suite (default: the whole of it, as make test) under coverage and writes
coverage/report.txt (per module), coverage/coverage.json and coverage/index.html.
Environment: VENV=.venv
EOF
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

cd "$(dirname "$0")/.."
repo="$PWD"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
[[ -x "$VENV/bin/python" ]] || { echo "coverage.sh: no venv at $VENV (make setup first)" >&2; exit 2; }

"$VENV/bin/pip" install -q -c constraints.txt coverage
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Runs at the start-up of every venv Python; does nothing unless COVERAGE_PROCESS_START is set.
echo 'import os; "COVERAGE_PROCESS_START" in os.environ and __import__("coverage").process_startup()' \
  > "$site/hvd_train_coverage.pth"

out="$repo/coverage"
rm -rf "$out" && mkdir -p "$out/data"
export COVERAGE_PROCESS_START="$repo/pyproject.toml"
export COVERAGE_FILE="$out/data/cov"
status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
unset COVERAGE_PROCESS_START
"$VENV/bin/python" -m coverage combine -q --keep "$out/data" >/dev/null
"$VENV/bin/python" -m coverage report > "$out/report.txt" || true
"$VENV/bin/python" -m coverage json -q -o "$out/coverage.json" || true
"$VENV/bin/python" -m coverage html -q -d "$out/html" || true
echo "[coverage] $(find "$out/data" -name 'cov.*' | wc -l) process(es) measured; $(grep '^TOTAL' "$out/report.txt")"
echo "[coverage] per module: $out/report.txt; pytest exit status $status"
exit "$status"
