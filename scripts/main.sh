#!/usr/bin/env bash
# The main job on a fresh machine: install, then a small sweep with the shipped tiny dLLM through lm-eval
# (LLaDA's one-token-per-step baseline, 4 tokens/step, threshold 0.7/0.9 and the learned filter + EoTP, with and
# without the dual KV cache; 12 held-out problems of each task) and its Pareto plots and table. README.md states
# its measured time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python analysis/sweep.py analysis/sweeps/quick.yaml --out runs/sweep-quick
python analysis/pareto.py runs/sweep-quick --out runs/sweep-quick/report
echo "plots and table: runs/sweep-quick/report/"
