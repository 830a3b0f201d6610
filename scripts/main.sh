#!/usr/bin/env bash
# The main job on a fresh machine: install, then decode held-out problems of both tasks with the shipped tiny
# dLLM twice, with LLaDA's one-token-per-step baseline and with threshold 0.9 + EoTP + dual KV cache, and grade
# both (accuracy and mean forward passes). A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=runs/main
mkdir -p "$out"
for task in arith listops; do
  l2pd data "$task" --split test --n 32 --seed 123 --out "$out/$task.jsonl"
  l2pd generate --input "$out/$task.jsonl" --gen-length 256 --block-length 32 --policy fixed --steps 256 \
    --batch-size 32 --output "$out/$task.fixed.jsonl"
  l2pd generate --input "$out/$task.jsonl" --gen-length 256 --block-length 32 --policy threshold --threshold 0.9 \
    --eotp --cache dual --batch-size 32 --output "$out/$task.threshold-eotp-dual.jsonl"
  echo "$task, fixed (1 token/step):" && l2pd grade --input "$out/$task.fixed.jsonl"
  echo "$task, threshold 0.9 + EoTP + dual cache:" && l2pd grade --input "$out/$task.threshold-eotp-dual.jsonl"
done
