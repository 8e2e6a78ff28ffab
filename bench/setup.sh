#!/usr/bin/env bash
# Peers for bench/bench_loader.py, bench/bench_dpo.py and bench/bench_grpo.py, installed into the project venv.
# litdata declares torchvision, whose PyPI build wants a CUDA torch: install it
# without dependencies plus the few it really imports, so the CPU torch stays.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh dev,examples
.venv/bin/python -m pip install -q --no-deps "litdata==0.2.76"
.venv/bin/python -m pip install -q lightning-utilities filelock boto3 requests tifffile obstore
# TRL for bench/bench_dpo.py and bench/bench_grpo.py: without dependencies (what it imports, datasets and accelerate,
# the project's extras already bring), so the CPU torch and the pinned transformers stay
.venv/bin/python -m pip install -q --no-deps "trl==1.16.0"
