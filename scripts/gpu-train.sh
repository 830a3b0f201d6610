#!/usr/bin/env bash
# The base-model training that 2 CPU cores cannot do, in under 12 minutes on one H100/H200: fine-tune the last
# committed checkpoint (the shipped model, l2pd_harness/assets/tiny-llada, unless INIT names another) on arith,
# listops, pairsum and changeone (weights 2,1,2,3), with more long padded canvases (EoTP at gen 1024) and half the
# samples masked block-wise as a block-32 decode sees them (what took arith from 71% to 97% at block 32 on the CPU),
# then measure the one-token reference on 500 held-out problems per task at gen 256, and LONG_N of them at gen 1024
# with and without EoTP.
# Writes the checkpoint and eval.jsonl under $OUT (the device tool) or runs/gpu-train; commit them with the GPU named
# (training_log.json records the device). Runs here too for a smoke test: DEVICE=cpu STEPS=2 TOKENS=2048 N=4.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS="${OUT:-runs/gpu-train}"
INIT="${INIT:-l2pd_harness/assets/tiny-llada}"
DEVICE="${DEVICE:-cuda}"; STEPS="${STEPS:-8000}"; TOKENS="${TOKENS:-65536}"; N="${N:-500}"; LONG_N="${LONG_N:-$N}"
PY=$(command -v python3 || command -v python)
l2pd() { "$PY" -m l2pd_harness.cli "$@"; }
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv; fi
mkdir -p "$RESULTS"
# 8,000 steps of 65,536 positions: about 7 minutes on an H100 (the shipped model's runs: 0.053 s per step).
l2pd train-base --task arith,listops,pairsum,changeone --task-weights 2,1,2,3 --init-from "$INIT" --out "$RESULTS/model" \
    --device "$DEVICE" --steps "$STEPS" --warmup 200 --lr 1e-3 --tokens-per-batch "$TOKENS" --long-share 0.35 \
    --semi-ar-share 0.5 --block-length 32 --checkpoint-every 500 --num-workers 6
for task in changeone pairsum arith listops; do
    l2pd evaluate --model "$RESULTS/model" --task "$task" --n "$N" --gen-length 256 --steps 256 \
        --batch-size "$N" --device "$DEVICE" | tee -a "$RESULTS/eval.jsonl"
done
# Issue 20's long-canvas goal: one token per step at gen 1024 with and without EoTP (hours per task on 2 CPU cores).
for task in listops pairsum changeone arith; do
    for eotp in --eotp --no-eotp; do
        l2pd evaluate --model "$RESULTS/model" --task "$task" --n "$LONG_N" --gen-length 1024 --steps 1024 "$eotp" \
            --batch-size "$LONG_N" --device "$DEVICE" | tee -a "$RESULTS/eval.jsonl"
    done
done
