#!/usr/bin/env bash
# Host discovery for launch/elastic.sh on Kubernetes: the Running, ready pods with label
# $WORKER_SELECTOR (default app=hvd-train-worker) in this namespace, by IP, $SLOTS slots each
# (default 1). Needs kubectl and a service account allowed to list pods; the pods run sshd.
set -euo pipefail
selector="${WORKER_SELECTOR:-app=hvd-train-worker}"
kubectl get pods -l "$selector" --field-selector=status.phase=Running \
  -o jsonpath='{range .items[?(@.status.containerStatuses[0].ready==true)]}{.status.podIP}{"\n"}{end}' \
  | grep -v '^$' | sed "s/\$/:${SLOTS:-1}/"
