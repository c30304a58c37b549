#!/usr/bin/env bash
# Redo the failed and interrupted shards of a job with its recorded input, config and model.
# Usage: bash jobs/resume.sh OUT/job [--address auto]
set -euo pipefail
pseudolabel resume "$@"
pseudolabel status "$1"
