#!/usr/bin/env bash
# Install l2pd-harness and its dependencies on a fresh machine (CPU build of torch first, so pip never pulls a
# multi-GB CUDA build). Users with a CUDA torch already installed can skip straight to `pip install -e .[dev]`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
