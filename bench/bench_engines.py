"""DDP vs DeepSpeed ZeRO 1/2/3 (+ offload) vs FSDP2: step time and peak memory per rank, one run.

    .venv/bin/python bench/bench_engines.py [--steps 8] [--ranks 2] [--layers 10]
    .venv/bin/python bench/bench_engines.py --pretrained --hidden 1024 --layers 16 --steps 3 \
        --only ddp zero3 fsdp          # a ~300M Llama loaded from an HF folder by each engine

A ~100M-parameter Llama (hidden 768, tied embeddings, MiniLM's 30,522-token
vocabulary), seq 128 x micro batch 2, global batch 8, fp32, on this machine's
CPU through real `hpctrain run` (torchrun, gloo). Every engine trains the same
samples from the same seed. Step time: median of the wall-clock gaps between
consecutive logged steps, the first two dropped (start-up, op loading). Memory:
the trainer's logged peak resident set (rank 0) above its resident set before
the model was built, beside `hpctrain plan`'s prediction for the same spec
(states + activations + host, plus the whole model each rank builds at load).
Engines run one after another; rerun to see the spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import build_corpus, tokenizer_path  # noqa: E402

ENGINES = {
    "ddp": {},
    "zero1": {"type": "deepspeed", "zero_stage": 1},
    "zero2": {"type": "deepspeed", "zero_stage": 2},
    "zero3": {"type": "deepspeed", "zero_stage": 3},
    "zero2+offload_optimizer": {"type": "deepspeed", "zero_stage": 2, "offload_optimizer": "cpu"},
    "zero3+offload_all": {"type": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
                          "offload_params": "cpu"},
    "fsdp": {"type": "fsdp"},
    "fsdp+offload": {"type": "fsdp", "offload_params": "cpu"},
}


def model_config(args) -> dict:
    heads = max(args.hidden // 64, 1)
    return {"model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
            "intermediate_size": args.hidden * 8 // 3 // 64 * 64, "num_hidden_layers": args.layers,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 256, "tie_word_embeddings": not args.untied}


def pretrained_folder(root: Path, args) -> Path:
    """The bench model saved as an HF folder (safetensors), made once per run of the bench."""
    folder = root / "pretrained"
    if not folder.is_dir():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(11)
        cfg = model_config(args)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(folder)
    return folder


def spec_for(root: Path, name: str, engine: dict, args) -> dict:
    spec = {
        "name": f"bench-{name}", "run_dir": str(root / name),
        "model": ({"path": str(pretrained_folder(root, args)), "tokenizer": tokenizer_path()} if args.pretrained
                  else {"config": model_config(args), "tokenizer": tokenizer_path()}),
        "data": {"corpora": [{"path": str(build_corpus(root))}], "seq_len": 128},
        "training": {"global_batch": 8, "micro_batch": 2, "steps": args.steps, "lr": 3e-4,
                     "warmup_steps": 2, "log_every": 1, "seed": 11},
        "checkpoint": {"every_steps": 10_000}, "export": {"enabled": False},
        "cluster": {"procs_per_node": args.ranks},
        **({"engine": engine} if engine else {}),
    }
    if args.zero3_live and engine.get("zero_stage") == 3:  # DeepSpeed's own limit, not the trainer's "auto"
        cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
        cfg["zero_optimization"].update(stage3_max_live_parameters=args.zero3_live,
                                        stage3_max_reuse_distance=args.zero3_live)
        path = root / f"{name}-ds.json"
        path.write_text(json.dumps(cfg))
        spec["engine"] = {"type": "deepspeed", "config": str(path)}
    return spec


def measure(root: Path, name: str, engine: dict, args) -> dict:
    from hpctrain.launcher.contract.spec import spec_from_dict
    from hpctrain.launcher.plan import chosen_name, estimates, load_bytes, model_size

    raw = spec_for(root, name, engine, args)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "hpctrain.launcher.cli", "run", str(path)],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        return {"engine": name, "error": (r.stdout + r.stderr)[-800:]}
    recs = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    gaps = [b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False)]
    gaps = gaps[2:] or gaps[-1:]  # short runs: the last gap
    base = next(x["mem_base_mib"] for x in recs if "mem_base_mib" in x)
    peak = max(x["peak_mem_mib"] for x in steps)
    spec = spec_from_dict(raw)
    m = model_size(spec)
    row = next(e for e in estimates(spec, m, args.ranks) if e.name == chosen_name(spec))
    predicted = row.device + row.host + (load_bytes(spec, m) if engine else 0)
    return {"engine": name, "params": m.total, "step_s": statistics.median(gaps),
            "tokens_per_s": 8 * 128 / statistics.median(gaps), "peak_mib": peak - base,
            "plan_mib": predicted / 2**20, "final_loss": steps[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=30522,
                    help="vocabulary size (MiniLM's tokenizer has 30,522; ids above it are never seen)")
    ap.add_argument("--untied", action="store_true", help="an output head of its own (default: tied embeddings)")
    ap.add_argument("--zero3-live", type=int, default=0,
                    help="ZeRO-3's stage3_max_live_parameters and _reuse_distance (default: the trainer's auto)")
    ap.add_argument("--pretrained", action="store_true",
                    help="every engine loads the model from an HF folder (else: built from its config)")
    ap.add_argument("--only", nargs="*", choices=list(ENGINES), help="a subset of engines")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (run dirs, rank logs, the model)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpctrain-bench-engines-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = [measure(root, n, e, args) for n, e in ENGINES.items() if not args.only or n in args.only]
    print(f"\n{'engine':<25}{'step s':>9}{'tok/s':>9}{'peak MiB':>10}{'plan MiB':>10}{'final loss':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:<25} failed: {r['error']}")
            continue
        print(f"{r['engine']:<25}{r['step_s']:>9.2f}{r['tokens_per_s']:>9.0f}{r['peak_mib']:>10.0f}"
              f"{r['plan_mib']:>10.0f}{r['final_loss']:>12.4f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
