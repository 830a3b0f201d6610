#!/usr/bin/env bash
# The committed full sweep and its report: results/sweep-full (gen_length 256) and results/sweep-full/report
# (runs.csv, table.md, <task>_pareto.png). 1 hour 45 minutes on 2 CPU cores (analysis/sweeps/full.yaml); finished
# configurations are skipped, so an interrupted run resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
python analysis/sweep.py analysis/sweeps/full.yaml --out results/sweep-full
python analysis/pareto.py results/sweep-full --out results/sweep-full/report
