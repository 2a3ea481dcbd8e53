#!/usr/bin/env bash
# Host discovery for launch/elastic.sh from a file you edit while the job runs: one "host:slots"
# (or "host") per line, # comments and blank lines ignored. Add a line and the job grows at its
# next commit; remove one and its workers are dropped. The file: $HOSTS_FILE, else ./hosts.txt.
set -euo pipefail
file="${HOSTS_FILE:-hosts.txt}"
[[ -r "$file" ]] || { echo "hostfile.sh: cannot read $file (set HOSTS_FILE)" >&2; exit 1; }
sed -e 's/#.*//' -e 's/[[:space:]]//g' "$file" | grep -v '^$' || true
