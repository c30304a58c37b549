#!/usr/bin/env bash
# Redo the failed and interrupted shards of a job with its recorded input, config and model, on
# the Ray its last run was given (--address or RAY_ADDRESS; `pseudolabel status OUT/job` shows it).
# Usage: bash jobs/resume.sh OUT/job [--address HEAD:6379 | --address local]
set -euo pipefail
status=0
pseudolabel resume "$@" || status=$?
if [ "$status" -le 1 ]; then  # the job ran (1: a shard failed again): its ledger, with the failed shards' errors
    pseudolabel status "$1"
fi
exit "$status"
