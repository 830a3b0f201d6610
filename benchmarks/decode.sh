#!/usr/bin/env bash
# Every committed decode benchmark row: benchmarks/results/decode.json, decode-1024.json, decode-arith500.json,
# decode-paper.json, decode-paper-1024.json and the tables in benchmarks/README.md (its "Reproducing" section says
# how long it takes). Runs already in a results file are skipped, so it resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
F=results/learn2pd/filters
python benchmarks/decode.py                                            # fixed, threshold, factor, oracle x EoTP x cache
python benchmarks/decode.py --policies threshold --eotp yes --caches none --thresholds 0.5,0.6,0.7,0.8,0.95,0.99
python benchmarks/decode.py --policies learned --eotp yes --caches none --accept-thresholds 0.6,0.7,0.8,0.85,0.9,0.95 \
    --filters shipped,block-fill=$F/f-block-fill
# The shipped filter at its default accept threshold (the card's) without EoTP and with the dual cache; the
# cache-matched filter; the threshold rule beside it.
python benchmarks/decode.py --policies learned --eotp yes,no --caches none
python benchmarks/decode.py --policies learned --eotp yes --caches dual
python benchmarks/decode.py --policies learned --eotp yes --caches dual --filters pos7-fill-dual=$F/f-pos7-fill-dual
python benchmarks/decode.py --policies threshold --eotp yes --caches dual --thresholds 0.95
G1024=(--gen-length 1024 --n 100 --out benchmarks/results/decode-1024.json --rows-dir runs/bench-decode-1024
       --table decode-1024-table)
python benchmarks/decode.py "${G1024[@]}" --policies threshold,learned --thresholds 0.9,0.95 --eotp yes --caches none
python benchmarks/decode.py "${G1024[@]}" --policies fixed --eotp yes --caches none
# 500 held-out arith problems (the model card's test set size) for the rows nearest the baseline.
A500=(--n 500 --tasks arith --out benchmarks/results/decode-arith500.json --rows-dir runs/bench-decode-500
      --table decode-arith500-table)
python benchmarks/decode.py "${A500[@]}" --policies fixed,oracle --eotp no,yes --caches none
python benchmarks/decode.py "${A500[@]}" --policies threshold --eotp yes --caches none --thresholds 0.8,0.9,0.95,0.99
python benchmarks/decode.py "${A500[@]}" --policies learned --eotp yes --caches none --accept-thresholds 0.8,0.85,0.9,0.95
python benchmarks/decode.py "${A500[@]}" --policies learned --eotp yes --caches dual
python benchmarks/decode.py "${A500[@]}" --policies threshold --eotp yes --caches dual --thresholds 0.9
# The Learn2PD paper's decoding rules next to ours, same filters (decode-paper.json, decode-paper-1024.json); then
# its two rules one at a time: its commit rule with our EoTP, our commit rule with its truncating EoTP.
P256=(--n 500 --tasks arith --policies learned --eotp yes --caches none --out benchmarks/results/decode-paper.json
      --rows-dir runs/bench-paper --table decode-paper-table)
P1024=(--gen-length 1024 --n 100 --tasks arith,listops --policies learned --eotp yes --caches none
       --out benchmarks/results/decode-paper-1024.json --rows-dir runs/bench-paper-1024 --table decode-paper-1024-table)
python benchmarks/decode.py "${P256[@]}" --presets none,learn2pd-paper --filters shipped,block-fill=$F/f-block-fill
python benchmarks/decode.py "${P1024[@]}" --presets none,learn2pd-paper
python benchmarks/decode.py "${P256[@]}" --presets learn2pd-paper --eotp-modes fill
python benchmarks/decode.py "${P256[@]}" --eotp-modes truncate
python benchmarks/decode.py "${P1024[@]}" --presets learn2pd-paper --eotp-modes fill
python benchmarks/decode.py "${P1024[@]}" --eotp-modes truncate
