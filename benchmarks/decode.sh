#!/usr/bin/env bash
# Every committed decode benchmark row, in the order they were measured: benchmarks/results/decode.json,
# decode-1024.json, decode-arith500.json and the tables in benchmarks/README.md. About 3.5 hours on 2 CPU cores
# (the one-token baselines are most of it); runs already in a results file are skipped, so it resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
F=results/learn2pd/filters
python benchmarks/decode.py                                            # fixed, threshold, factor, oracle x EoTP x cache
python benchmarks/decode.py --policies threshold --eotp yes --caches none --thresholds 0.5,0.6,0.7,0.8,0.95,0.99
python benchmarks/decode.py --policies learned --eotp yes --caches none --accept-thresholds 0.6,0.7,0.8,0.85,0.9,0.95 \
    --filters shipped,block-fill=$F/f-block-fill
# The shipped filter's accept threshold is written out: its default was 0.85 when these rows were measured and is
# 0.98 since `l2pd choose-threshold` chose it again on 319 validation problems (results/learn2pd/README.md).
python benchmarks/decode.py --policies learned --eotp yes,no --caches none --accept-thresholds 0.85
python benchmarks/decode.py --policies learned --eotp yes --caches dual --accept-thresholds 0.85
python benchmarks/decode.py --policies learned --eotp yes --caches dual --filters pos7-fill-dual=$F/f-pos7-fill-dual
python benchmarks/decode.py --policies threshold --eotp yes --caches dual --thresholds 0.95
G1024=(--gen-length 1024 --n 100 --out benchmarks/results/decode-1024.json --rows-dir runs/bench-decode-1024
       --table decode-1024-table)
python benchmarks/decode.py "${G1024[@]}" --policies threshold,learned --thresholds 0.9,0.95 --accept-thresholds 0.85 \
    --eotp yes --caches none
# 500 held-out arith problems (the model card's test set size) for the rows that decide Learn2PD's acceptance: one
# arith problem is 0.2 points here instead of 0.5. About an hour; the one-token baseline is 43 minutes of it.
A500=(--n 500 --tasks arith --out benchmarks/results/decode-arith500.json --rows-dir runs/bench-decode-500
      --table decode-arith500-table)
python benchmarks/decode.py "${A500[@]}" --policies fixed,oracle --eotp no,yes --caches none
python benchmarks/decode.py "${A500[@]}" --policies threshold --eotp yes --caches none --thresholds 0.8,0.9,0.95,0.99
python benchmarks/decode.py "${A500[@]}" --policies learned --eotp yes --caches none --accept-thresholds 0.8,0.85,0.9,0.95
python benchmarks/decode.py "${A500[@]}" --policies learned --eotp yes --caches dual --accept-thresholds 0.85
python benchmarks/decode.py "${A500[@]}" --policies threshold --eotp yes --caches dual --thresholds 0.9
# The new default accept threshold (0.98) and one-token + EoTP at 1024.
python benchmarks/decode.py "${A500[@]}" --policies learned --eotp yes --caches none,dual
python benchmarks/decode.py --policies learned --eotp yes --caches none,dual
python benchmarks/decode.py "${G1024[@]}" --policies learned,fixed --eotp yes --caches none
