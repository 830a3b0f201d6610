#!/usr/bin/env bash
# The shipped model card's accuracy rows that the full sweep (analysis/full.sh: arith, changeone and pairsum at
# k = 1, 2, 4, 8 tokens per step, gen 256) does not give: listops at k = 1, 2, 4, 8 (gen 256) and one token per step
# + EoTP at gen 1024 for every task, one `l2pd evaluate` summary row each (results/tiny-model/card-changeone.jsonl;
# its changeone, listops and pairsum rows at 1024 were measured with BATCH=100, which does not change outputs).
# 57 minutes on 2 CPU cores (2026-12-06); minutes on a GPU:
#   DEVICE=cuda BATCH=200 bash results/tiny-model/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/tiny-model-card.jsonl}; DEVICE=${DEVICE:-cpu}; BATCH=${BATCH:-64}; N=${N:-200}
mkdir -p "$(dirname "$OUT")"
row() {  # task gen_length tokens-per-step [more l2pd evaluate options]
    l2pd evaluate --task "$1" --n "$N" --gen-length "$2" --steps $(($2 / $3)) --batch-size "$BATCH" \
        --device "$DEVICE" "${@:4}" >> "$OUT"
}
for k in 1 2 4 8; do row listops 256 $k; done
for task in arith changeone listops pairsum; do row $task 1024 1 --eotp; done
echo "rows: $OUT"
