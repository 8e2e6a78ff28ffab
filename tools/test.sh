#!/usr/bin/env bash
# Set up the venv with every test extra and run the whole test suite.
#   bash tools/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh dev,qlora,examples
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
