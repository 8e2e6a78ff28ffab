"""What is done with a fine-tuning run's export once the run is over, in a trainer process (the
launcher never imports torch):

    python -m hpctrain.trainers.exported --merge RUN_DIR             # `hpctrain merge RUN_DIR`
    python -m hpctrain.trainers.exported --eval RUN_DIR --data FILE  # `hpctrain eval RUN_DIR --data FILE`

`--eval` scores the export on a file of examples with the run's kind (its loss and metrics) and
prints one JSON line; a kind that generates (seq2seq) also writes its outputs (`--predictions`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hpctrain.launcher.contract.errors import UserError, run_command
from hpctrain.launcher.contract.fast_exit import exit_process
from hpctrain.launcher.contract.rundir import RunDir, atomic_write_text
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.trainers.data.examples import ExampleDataset, read_records
from hpctrain.trainers.distributed import Dist
from hpctrain.trainers.entry import frozen_spec
from hpctrain.trainers.finetune import evaluate
from hpctrain.trainers.model import build_model, quiet_libraries
from hpctrain.trainers.peft_model import load_exported, merge
from hpctrain.trainers.tasks import kind_task


def finetune_run(run_dir: Path) -> RunSpec:
    """The frozen spec of a fine-tuning run (a pretraining run dir is refused)."""
    spec = frozen_spec(run_dir)
    if spec.task != "finetune":
        raise UserError("not a fine-tuning run", file=str(RunDir(run_dir).spec_file), field="task",
                        expected="finetune")
    return spec


def _tokenizer(export_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export_dir, local_files_only=True)


def run_eval(run_dir: Path, data: str, predictions: str | None = None) -> dict:
    """Evaluate the run's export on a file of examples (`hpctrain eval`); a kind that generates
    (seq2seq) writes every output beside its source and reference to `predictions` (default:
    RUN_DIR/eval/<data file's stem>.predictions.jsonl)."""
    spec = finetune_run(run_dir)
    export_dir = RunDir(run_dir).export
    if not export_dir.is_dir():
        raise UserError("no export yet (the run has not finished)", file=str(export_dir))
    tok = _tokenizer(export_dir)
    model, labels = load_exported(spec, export_dir)
    model.eval()
    kind = kind_task(spec.finetune)
    tk = kind.tokenize(read_records(data, spec.finetune.tsv_columns()), tok, data, labels)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kind.use_initial_model(lambda: build_model(spec, labels, pad).model)  # DPO's reference
    d = Dist(0, 1, 0, 1, torch.device("cpu"))
    kind.keep_all_outputs()
    res = evaluate(model, ExampleDataset(tk, pad, kind.collate), kind, spec.training.micro_batch, d)
    out = {"examples": len(tk.input_ids), **res}
    rows = kind.outputs()
    if rows:
        path = Path(predictions) if predictions else RunDir(run_dir).root / "eval" / f"{Path(data).stem}.predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        out["predictions"] = str(path)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--merge", metavar="RUN_DIR", help="merge the run's adapter into its base model")
    what.add_argument("--eval", metavar="RUN_DIR", help="evaluate the run's export on --data")
    ap.add_argument("--data", help="examples to evaluate (JSONL/CSV/TSV)")
    ap.add_argument("--predictions", help="where a generating kind (seq2seq) writes its outputs (default: "
                    "RUN_DIR/eval/<data stem>.predictions.jsonl)")
    args = ap.parse_args(argv)
    quiet_libraries()

    def body() -> None:
        if args.merge:
            run = Path(args.merge)
            spec = finetune_run(run)
            print(f"merged model written to {merge(spec, RunDir(run).export, _tokenizer(RunDir(run).export))}")
            return
        if not args.data:
            raise UserError("--data is required", field="--data", expected="a JSONL or CSV file")
        print(json.dumps(run_eval(Path(args.eval), args.data, args.predictions)))

    return run_command(body)


if __name__ == "__main__":
    exit_process(main())
