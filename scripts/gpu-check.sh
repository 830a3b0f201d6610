#!/usr/bin/env bash
# The GPU check, under 10 minutes on one H200 (run it whenever a GPU is available; it needs no network and no
# weights): the tests that use CUDA, then the engine benchmark at LLaDA-8B-Instruct's shape in bf16 with random
# weights. Writes gpu-tests.log, benchmarks/results/gpu-engine-batch1.json and gpu-engine.json (or under $OUT when the
# device tool runs it) to commit with the hardware named (the results' setup names the GPU). The grid runs last: it
# writes row by row, smallest shapes first, so a time limit cuts only its largest rows. PASSES sets the passes timed
# per grid row (24).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS="${OUT:-benchmarks/results}"
PASSES="${PASSES:-24}"
mkdir -p "$RESULTS"
PY=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, safetensors; assert torch.cuda.is_available(); print('torch', torch.__version__, torch.cuda.get_device_name())"
if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$RESULTS/gpu-tests.log"
else
    echo "pytest is not installed here: CUDA tests skipped" | tee "$RESULTS/gpu-tests.log"
fi
# Batch 1 with the dual cache over a whole gen-256 decode: the pass time to set against reading the weights once.
"$PY" benchmarks/engine.py --config benchmarks/configs/llada-8b-instruct.json --device cuda --dtype bfloat16 \
    --batch-sizes 1 --gen-lengths 256 --caches dual --tokens-per-step 1 --out "$RESULTS/gpu-engine-batch1.json"
# Batch 1/8/32 x gen 256/1024 x cache none/prefix/dual, 4 tokens per pass; the first PASSES passes of each decode
# (24: 3 blocks, their refresh passes in their share) keep the grid inside the time limit.
"$PY" benchmarks/engine.py --config benchmarks/configs/llada-8b-instruct.json --device cuda --dtype bfloat16 \
    --batch-sizes 1,8,32 --gen-lengths 256,1024 --caches none,prefix,dual --tokens-per-step 4 --passes "$PASSES" \
    --out "$RESULTS/gpu-engine.json"
