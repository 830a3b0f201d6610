#!/usr/bin/env bash
# The main job on a fresh machine: install, then decode held-out problems of both tasks with the shipped tiny
# dLLM (LLaDA reference sampler, one token per step) and grade them. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=runs/main
mkdir -p "$out"
for task in arith listops; do
  l2pd data "$task" --split test --n 32 --seed 123 --out "$out/$task.jsonl"
  l2pd generate --input "$out/$task.jsonl" --gen-length 256 --block-length 32 --steps 256 --batch-size 32 \
    --output "$out/$task.out.jsonl"
  l2pd grade --input "$out/$task.out.jsonl"
done
