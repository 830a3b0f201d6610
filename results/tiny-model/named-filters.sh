#!/usr/bin/env bash
# The model card's named-filter table: each filter shipped beside the tiny model, at its card's own setting, and the
# one-token-per-step baseline at the same block length and cache, on 200 held-out problems of arith and changeone
# (gen 256, EoTP), one `l2pd evaluate` summary row each (results/tiny-model/card-named.jsonl). Run it after copying
# the filters into l2pd_harness/assets/tiny-llada (results/policy-rl/recipe.sh says which is which).
#   OUT=results/tiny-model/card-named.jsonl bash results/tiny-model/named-filters.sh   (DEVICE=cuda on a GPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/tiny-model-named.jsonl}; DEVICE=${DEVICE:-cpu}; BATCH=${BATCH:-64}; N=${N:-200}
mkdir -p "$(dirname "$OUT")"
row() {  # task block-length cache [more l2pd evaluate options]
    l2pd evaluate --task "$1" --n "$N" --gen-length 256 --block-length "$2" --cache "$3" --eotp \
        --batch-size "$BATCH" --device "$DEVICE" "${@:4}" >> "$OUT"
}
for task in arith changeone; do
    row $task 32 none --policy learned --filter learned-b32
    row $task 128 none --policy learned --filter learned-b128
    row $task 32 dual --policy learned --filter learned-b32-dual
    row $task 128 dual --policy learned --filter learned-b128-dual
    row $task 32 none --policy learned --filter learn2pd-block-mlp
    row $task 32 none --policy learned
    for block in 32 128; do for cache in none dual; do row $task $block $cache; done; done
done
echo "rows: $OUT"
