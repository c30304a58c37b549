#!/usr/bin/env bash
# Submit the VOC job to a running Ray cluster (started with `ray start --head` on the head node
# and `ray start --address HEAD:6379` on each GPU node; pseudolabel installed on every node and
# VOC, shards and the output folder on a file system every node sees).
# Usage: RAY_ADDRESS=http://HEAD:8265 VOC=/shared/VOC2012 OUT=/shared/pseudo bash jobs/cluster_submit.sh
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://head:8265}"
ray job submit --address "$RAY_ADDRESS" --working-dir . -- \
    env VOC="${VOC:?}" OUT="${OUT:?}" ADDRESS=auto bash jobs/voc_train_aug.sh "$@"
