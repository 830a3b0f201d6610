#!/usr/bin/env bash
# Every committed decode benchmark row: benchmarks/results/decode.json, decode-1024.json, decode-arith500.json and
# the tables in benchmarks/README.md (its "Reproducing" section says how long it takes). Runs already in a results
# file are skipped, so it resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
F=results/learn2pd/filters
python benchmarks/decode.py                                            # fixed, threshold, factor, oracle x EoTP x cache
python benchmarks/decode.py --policies threshold --eotp yes --caches none --thresholds 0.5,0.6,0.7,0.8,0.95,0.99
python benchmarks/decode.py --policies learned --eotp yes --caches none --accept-thresholds 0.6,0.7,0.8,0.85,0.9,0.95 \
    --filters shipped,block-fill=$F/f-block-fill
# The rows of the shipped filter at an accept threshold other than its default (results/learn2pd/README.md).
python benchmarks/decode.py --policies learned --eotp yes,no --caches none --accept-thresholds 0.85
python benchmarks/decode.py --policies learned --eotp yes --caches dual --accept-thresholds 0.85
python benchmarks/decode.py --policies learned --eotp yes --caches dual --filters pos7-fill-dual=$F/f-pos7-fill-dual
python benchmarks/decode.py --policies threshold --eotp yes --caches dual --thresholds 0.95
G1024=(--gen-length 1024 --n 100 --out benchmarks/results/decode-1024.json --rows-dir runs/bench-decode-1024
       --table decode-1024-table)
python benchmarks/decode.py "${G1024[@]}" --policies threshold,learned --thresholds 0.9,0.95 --accept-thresholds 0.85 \
    --eotp yes --caches none
# 500 held-out arith problems (the model card's test set size) for the rows that decide Learn2PD's acceptance.
A500=(--n 500 --tasks arith --out benchmarks/results/decode-arith500.json --rows-dir runs/bench-decode-500
      --table decode-arith500-table)
python benchmarks/decode.py "${A500[@]}" --policies fixed,oracle --eotp no,yes --caches none
python benchmarks/decode.py "${A500[@]}" --policies threshold --eotp yes --caches none --thresholds 0.8,0.9,0.95,0.99
python benchmarks/decode.py "${A500[@]}" --policies learned --eotp yes --caches none --accept-thresholds 0.8,0.85,0.9,0.95
python benchmarks/decode.py "${A500[@]}" --policies learned --eotp yes --caches dual --accept-thresholds 0.85
python benchmarks/decode.py "${A500[@]}" --policies threshold --eotp yes --caches dual --thresholds 0.9
# The filter's default accept threshold, and one token per step + EoTP at 1024.
python benchmarks/decode.py "${A500[@]}" --policies learned --eotp yes --caches none,dual
python benchmarks/decode.py --policies learned --eotp yes --caches none,dual
python benchmarks/decode.py "${G1024[@]}" --policies learned,fixed --eotp yes --caches none
# The Learn2PD paper's decoding rules next to ours, same filters (decode-paper.json).
python benchmarks/decode.py --n 500 --tasks arith --policies learned --eotp yes --caches none \
    --presets none,learn2pd-paper --filters shipped,block-fill=$F/f-block-fill --out benchmarks/results/decode-paper.json \
    --rows-dir runs/bench-paper --table decode-paper-table
python benchmarks/decode.py --gen-length 1024 --n 100 --tasks arith,listops --policies learned --eotp yes \
    --caches none --presets none,learn2pd-paper --out benchmarks/results/decode-paper-1024.json \
    --rows-dir runs/bench-paper-1024 --table decode-paper-1024-table
