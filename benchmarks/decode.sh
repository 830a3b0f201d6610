#!/usr/bin/env bash
# Every committed decode benchmark row, in the order they were measured: benchmarks/results/decode.json,
# benchmarks/results/decode-1024.json and both tables in benchmarks/README.md. About two hours on 2 CPU cores
# (the one-token baseline alone is half of it); runs already in a results file are skipped, so it resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
F=results/learn2pd/filters
python benchmarks/decode.py                                            # fixed, threshold, factor, oracle x EoTP x cache
python benchmarks/decode.py --policies threshold --eotp yes --caches none --thresholds 0.5,0.6,0.7,0.8,0.95,0.99
python benchmarks/decode.py --policies learned --eotp yes --caches none --accept-thresholds 0.6,0.7,0.8,0.85,0.9,0.95 \
    --filters shipped,block-fill=$F/f-block-fill
python benchmarks/decode.py --policies learned --eotp yes,no --caches none              # shipped filter, its default
python benchmarks/decode.py --policies learned --eotp yes --caches dual --filters shipped,pos7-fill-dual=$F/f-pos7-fill-dual
python benchmarks/decode.py --policies threshold --eotp yes --caches dual --thresholds 0.95
python benchmarks/decode.py --gen-length 1024 --n 100 --policies threshold,learned --thresholds 0.9,0.95 --eotp yes \
    --caches none --out benchmarks/results/decode-1024.json --rows-dir runs/bench-decode-1024 --table decode-1024-table
