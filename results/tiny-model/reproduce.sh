#!/usr/bin/env bash
# The shipped model card's accuracy table (results/tiny-model/card-r4-shipped.jsonl): one `l2pd evaluate` summary
# row per cell. Hours on 2 CPU cores (the one-token rows spend gen_length passes per problem); minutes on a GPU:
#   DEVICE=cuda BATCH=500 bash results/tiny-model/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/tiny-model-card.jsonl}; DEVICE=${DEVICE:-cpu}; BATCH=${BATCH:-64}
mkdir -p "$(dirname "$OUT")"
row() {  # task n gen_length tokens-per-step
    l2pd evaluate --task "$1" --n "$2" --gen-length "$3" --steps $(($3 / $4)) --batch-size "$BATCH" \
        --device "$DEVICE" >> "$OUT"
}
for k in 1 2 4 8; do row arith 500 256 $k; done
for k in 1 2; do row listops 500 256 $k; done
row arith 100 1024 1; row listops 100 1024 1
echo "rows: $OUT"
