#!/usr/bin/env bash
# The measured requirements of issue 20's task (pairsum, or $TASK: changeone) for a model, on held-out test
# problems: one token per step (the reference decoder), 4 tokens per step, and threshold 0.9 + EoTP; one
# `l2pd evaluate` summary row each (its settings included). Usage: [TASK=changeone] pairsum-check.sh MODEL [N]
# [GEN_LENGTH]; rows appended to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:?usage: pairsum-check.sh MODEL [N] [GEN_LENGTH]}; N=${2:-500}; GEN=${3:-256}
TASK=${TASK:-pairsum}; OUT=${OUT:-runs/$TASK-check.jsonl}; DEVICE=${DEVICE:-cpu}
mkdir -p "$(dirname "$OUT")"
row() {
    l2pd evaluate --model "$MODEL" --task "$TASK" --n "$N" --gen-length "$GEN" --batch-size 100 --device "$DEVICE" \
        "$@" | tee -a "$OUT"
}
row --steps "$GEN"
row --steps $((GEN / 4))
row --policy threshold --threshold 0.9 --eotp
