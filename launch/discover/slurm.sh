#!/usr/bin/env bash
# Host discovery for launch/elastic.sh inside a Slurm allocation: every node of the job with
# $SLURM_NTASKS_PER_NODE slots (default 1). Nodes Slurm takes away (a shrinking or failing
# allocation, scontrol update) drop out of the list.
set -euo pipefail
slots="${SLURM_NTASKS_PER_NODE:-1}"
scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}" | sed "s/\$/:${slots%%(*}/"
