"""`hpctrain` command line.

    hpctrain prepare 'raw/*.jsonl' --field text --tokenizer TOK --out corpus/x --workers 4
    hpctrain corpus inspect corpus/x
    hpctrain validate SPEC | plan SPEC | run SPEC | submit SPEC | status RUN_DIR
    hpctrain sweep SPEC --over data.corpora.0.weight=0.2,0.3,0.5 [--report]

No torch at module level: `hpctrain --help` must start instantly on a login node, and each
verb imports what it needs when it runs. The trainers and tools are reached through a
command line only (torchrun, or `python -m` for merge, eval and the tool verbs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from hpctrain.launcher import lock
from hpctrain.launcher.contract.errors import run_command
from hpctrain.launcher.contract.fast_exit import exit_process


def _load_stages(args: argparse.Namespace):
    """[(stage name or None, spec)] for a single-run spec or a pipeline, plus exports to come."""
    from hpctrain.launcher.contract.spec import (
        apply_overrides,
        load_spec_dict,
        spec_from_dict,
        with_absolute_paths,
    )
    from hpctrain.launcher.pipeline import is_pipeline, load_pipeline, produced_paths

    data = load_spec_dict(args.spec)
    pinner = _pinner(args.spec)
    if is_pipeline(data):
        stages = [(name, pinner.pin(spec)) for name, spec in load_pipeline(data, args.spec, args.set)]
        return stages, produced_paths(stages)
    spec = spec_from_dict(apply_overrides(data, args.set), args.spec)
    return [(None, pinner.pin(with_absolute_paths(spec)))], set()


def _pinner(file: str):
    """Hub model ids in the spec, pinned to their commit here (launcher/hub.py); progress on stderr."""
    from hpctrain.launcher.hub import Pinner

    return Pinner(file, log=lambda line: print(f"hpctrain: {line}", file=sys.stderr, flush=True))


def _check(stages, future, file) -> list[list[str]]:
    from hpctrain.launcher.contract.errors import UserErrors
    from hpctrain.launcher.validate import check_files

    notes, errors = [], []
    for name, spec in stages:
        try:
            notes.append(check_files(spec, file, future=future))
        except UserErrors as e:
            if name is not None:
                for err in e.errors:
                    err.field = f"{name}: {err.field}" if err.field else name
            errors += e.errors
    if errors:
        raise UserErrors(errors)
    return notes


def _fit_warning(spec, future) -> str | None:
    """The memory plan's warning when the spec's engine will not fit (a model still to be
    produced by an earlier pipeline stage is not planned)."""
    from hpctrain.launcher.plan import warning

    if spec.model.path is not None and spec.model.path in future:
        return None
    return warning(spec, spec.cluster.world_size)


def _cmd_plan(args: argparse.Namespace) -> int:
    from hpctrain.launcher.plan import report

    stages, future = _load_stages(args)
    for name, spec in stages:
        if name is not None:
            print(f"stage {name}:")
        if spec.model.path is not None and spec.model.path in future:
            print(f"  the model comes from an earlier stage ({spec.model.path}): planned once it exists")
            continue
        print(report(spec, args.gpu_mem))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    stages, future = _load_stages(args)
    all_notes = _check(stages, future, args.spec)
    print(f"{args.spec}: OK")
    for (name, spec), (notes, samples) in zip(stages, all_notes, strict=True):
        t = spec.training
        if name is not None:
            print(f"stage {name}:")
        if t.epochs is not None and samples is None:
            print(f"  {t.epochs:g} epoch(s): steps are resolved at start (the samples are counted "
                  "after tokenizing)")
        else:
            total = spec.total_steps_for(samples)
            per = f" ({t.epochs:g} epoch(s) of {samples:,} samples)" if t.epochs is not None else ""
            print(
                f"  {total} steps{per} x {t.global_batch} sequences x {spec.seq_len} tokens "
                f"= {total * t.global_batch * spec.seq_len:,} tokens"
            )
        print(f"  {spec.cluster.world_size} rank(s), micro batch {t.micro_batch}, grad accumulation {spec.grad_accum}")
        for n in notes:
            print(f"  {n}")
        fit = _fit_warning(spec, future)
        if fit:
            print(f"  {fit}")
        print(f"  run dir: {spec.run_path}")
    if args.slurm and any(s.cluster.executor == "slurm" for _, s in stages):
        from hpctrain.launcher.slurm import test_only

        for _, spec in stages:
            print(f"  sbatch --test-only: {test_only(spec)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    stages, future = _load_stages(args)
    _check(stages, future, args.spec)
    _no_container_here(stages, args.spec)
    for name, spec in stages:
        if name is not None:
            if _finished(spec) and not args.no_resume:
                print(f"stage {name}: already finished ({spec.run_path})")
                continue
            print(f"== stage {name}", flush=True)
        rc, finished = _run_one(spec, args.no_resume)
        if rc != 0 or not finished:
            return rc
    return 0


def _finished(spec) -> bool:
    from hpctrain.launcher.contract.states import State, read_status

    return read_status(spec.run_path).state == State.FINISHED


def _no_container_here(stages, file) -> None:
    """`run` trains on this machine as it is: a spec's container is for its Slurm jobs."""
    from hpctrain.launcher.contract.errors import UserError

    for name, spec in stages:
        if spec.cluster.container is not None:
            raise UserError(f"a container ({spec.cluster.container.runtime}) is for Slurm jobs; this command "
                            "trains on this machine as it is", file=file,
                            field=f"{name}: cluster.container" if name else "cluster.container",
                            hint="hpctrain submit SPEC runs it in the container; remove cluster.container to "
                                 "train here")


def _run_one(spec, no_resume: bool) -> tuple[int, bool]:
    """One run on this machine, its run dir held while it trains: (exit code, finished)."""
    from hpctrain.launcher.contract.checkpoints import newest_whole_checkpoint
    from hpctrain.launcher.contract.states import State, read_status
    from hpctrain.launcher.local import run_local

    owner = lock.process_owner("hpctrain run")
    try:
        spec, run_dir = _hold_run_dir(spec, not no_resume, owner)
    except OSError as e:
        return _disk_full(spec.run_path, e), False
    try:
        ckpt = newest_whole_checkpoint(run_dir, checksums=False)[0]  # the trainer checks contents too
        print(f"run dir: {run_dir}" + (f" (resuming from {ckpt.name})" if ckpt else ""), flush=True)
        rc = run_local(spec, run_dir)
    except OSError as e:  # the launcher's own writes (reserve, logs, status)
        rc = _disk_full(run_dir, e)
    finally:
        lock.release(run_dir, owner)
    return rc, read_status(run_dir).state == State.FINISHED


def _disk_full(run_dir, error: OSError) -> int:
    """A launcher write that found the disk full: one line naming the newest checkpoint, exit 1
    (contract/diskfull.py); any other OSError is re-raised."""
    from hpctrain.launcher.contract.diskfull import disk_full_cause, disk_full_reason, free_reserve

    if disk_full_cause(error) is None:
        raise error
    free_reserve(run_dir)
    print(f"hpctrain: {disk_full_reason(run_dir, error)}", file=sys.stderr, flush=True)
    return 1


def _hold_run_dir(spec, resume: bool, owner: dict):
    """Take the run dir's lock (refused at once while another run or job holds it), then
    freeze the spec there; --no-resume may move the run to RUN_DIR.N, whose lock is taken."""
    from hpctrain.launcher.contract.rundir import freeze_run_dir

    first = Path(spec.run_path)
    lock.acquire(first, owner)
    try:
        spec, run_dir = freeze_run_dir(spec, resume=resume)
    except BaseException:
        lock.release(first, owner)
        raise
    if run_dir != first:
        lock.release(first, owner)
        lock.acquire(run_dir, owner)
    return spec, run_dir


def _cmd_submit(args: argparse.Namespace) -> int:
    from hpctrain.launcher.slurm import dry_run

    stages, future = _load_stages(args)
    for notes, _ in _check(stages, future, args.spec):
        for line in (n for n in notes if n.startswith("warning:")):  # validate prints all of them
            print(f"hpctrain: {line}", file=sys.stderr)
    if args.dry_run:
        for name, spec in stages:
            if name is not None:
                print(f"# ===== stage {name}" + (" (after the stage before it succeeds)" if future else ""))
            print(dry_run(spec, Path(spec.run_path)), end="")
        return 0
    from hpctrain.launcher.slurm import require_slurm

    require_slurm(args.spec)
    previous = None
    for name, spec in stages:
        previous = _submit_one(f"stage {name}: " if name else "", spec, args.no_resume, previous, "afterok",
                               forget_bad_nodes=args.forget_bad_nodes)
    return 0


def _submit_one(label: str, spec, no_resume: bool, after: str | None, kind: str,
                forget_bad_nodes: bool = False) -> str:
    """Submit one run as a Slurm job (after job `after` ends: `kind` afterok | afterany), its run
    dir handed to the job; its job id."""
    from hpctrain.launcher import bad_nodes
    from hpctrain.launcher.contract.checkpoints import newest_whole_checkpoint
    from hpctrain.launcher.contract.diskfull import keep_reserve
    from hpctrain.launcher.slurm import submit

    owner = lock.process_owner("hpctrain submit")
    spec, run_dir = _hold_run_dir(spec, not no_resume, owner)
    if forget_bad_nodes and (hosts := bad_nodes.forget(run_dir)):
        print(f"{label}no longer leaving out node(s) {', '.join(hosts)}")
    elif left_out := [e.host for e in bad_nodes.excluded(run_dir)]:
        print(f"{label}leaving out node(s) {', '.join(left_out)}, where earlier attempts died or hung "
              "(--forget-bad-nodes to use them again)")
    ckpt = newest_whole_checkpoint(run_dir, checksums=False)[0]  # the trainer checks contents too
    try:
        keep_reserve(run_dir)  # the job's ranks free it if the disk fills (contract/diskfull.py)
        job = submit(spec, run_dir, dependency=f"{kind}:{after}" if after else None)
    except OSError as e:
        lock.release(run_dir, owner)
        raise SystemExit(_disk_full(run_dir, e)) from None
    except BaseException:
        lock.release(run_dir, owner)
        raise
    lock.hand_over(run_dir, lock.job_owner(job))  # the job, its requeues and node tasks hold it
    print(
        f"{label}submitted job {job}: {spec.cluster.nodes} node(s) x {spec.cluster.procs_per_node} process(es)"
        + (f", after job {after}" if after else "")
        + (f", resuming from {ckpt.name}" if ckpt else "")
    )
    print(f"run dir: {run_dir}")
    print(f"follow:  hpctrain status {run_dir}   |   hpctrain logs {run_dir} -f   |   hpctrain cancel {run_dir}")
    return job


def _cmd_sweep(args: argparse.Namespace) -> int:
    from hpctrain.launcher.contract.errors import EXIT_INTERRUPTED
    from hpctrain.launcher.sweep import report, sweep_specs, write_sweep_file

    if args.report:
        from hpctrain.launcher.contract.spec import load_spec, with_absolute_paths

        print(report(with_absolute_paths(load_spec(args.spec, args.set)).run_path))
        return 0
    base, points = sweep_specs(args.spec, args.set, args.over)
    pinner = _pinner(args.spec)  # every point on the same commit of a Hub model
    points = [(p, pinner.pin(s)) for p, s in points]
    stages = [(p.name, s) for p, s in points]
    _check(stages, set(), args.spec)  # every point, before anything runs or is submitted
    on_slurm = all(s.cluster.executor == "slurm" for _, s in stages)
    if on_slurm:
        from hpctrain.launcher.slurm import require_slurm

        require_slurm(args.spec)
    sweep_file = write_sweep_file(base, args.spec, points)
    print(f"sweep of {len(points)} point(s) in {base.run_path} ({sweep_file.name}): "
          + ", ".join(p.name for p in [p for p, _ in points]), flush=True)
    if on_slurm:
        jobs: list[str] = []
        for i, (name, spec) in enumerate(stages):
            n = args.max_parallel
            after = jobs[i - n] if n and i >= n else None  # at most n points at a time
            jobs.append(_submit_one(f"point {name}: ", spec, args.no_resume, after, "afterany"))
        print(f"report: hpctrain sweep {args.spec} --report   (or hpctrain status {base.run_path})")
        return 0
    _no_container_here(stages, args.spec)
    failed = []
    for name, spec in stages:
        if _finished(spec) and not args.no_resume:
            print(f"point {name}: already finished ({spec.run_path})")
            continue
        print(f"== point {name}", flush=True)
        rc, finished = _run_one(spec, args.no_resume)
        if rc == EXIT_INTERRUPTED or (rc == 0 and not finished):  # Ctrl-C, a preemption: stop here
            print(f"sweep stopped at point {name}: the same command resumes it", flush=True)
            return rc
        if rc != 0:  # this point failed; the others are independent of it
            failed.append(name)
    print(report(base.run_path))
    if failed:
        print(f"hpctrain: {len(failed)} point(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_module(module: str, *args: str) -> int:
    """`python -m MODULE ARGS` in this interpreter; its exit code. The CLI reaches the trainers
    and tools only through a command line: it never imports torch or their code. Ctrl-C
    reaches the child too (one process group): the child reports it, not this process."""
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", module, *args])
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, old)


def _trainer_tool(*args: str) -> int:
    """merge/eval run in a trainer process (the launcher itself never imports torch)."""
    return run_module("hpctrain.trainers.exported", *args)


# verbs that are tools of their own (tools/): their options are theirs, so `hpctrain VERB ...`
# hands everything after the verb to `python -m MODULE`
TOOL_VERBS = {
    ("prepare",): "hpctrain.tools.prepare",
    ("corpus", "inspect"): "hpctrain.tools.inspect_corpus",
    ("tokenizer", "train"): "hpctrain.tools.train_tokenizer",
}


def tool_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) when `argv` names a tool verb."""
    for words, module in TOOL_VERBS.items():
        if tuple(argv[: len(words)]) == words:
            return module, argv[len(words):]
    return None


def _cmd_merge(args: argparse.Namespace) -> int:
    return _trainer_tool("--merge", args.run_dir)


def _cmd_eval(args: argparse.Namespace) -> int:
    extra = ("--predictions", args.predictions) if args.predictions else ()
    return _trainer_tool("--eval", args.run_dir, "--data", args.data, *extra)


def _cmd_status(args: argparse.Namespace) -> int:
    from hpctrain.launcher.status import status_text

    print(status_text(args.run_dir))
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from hpctrain.launcher.wandb_files import sync

    try:
        sync(Path(args.run_dir), offline=args.offline)
    except ImportError:
        print("hpctrain: error: W&B is not installed (bash tools/setup.sh examples,wandb)", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - W&B's own errors (no key, unreachable): one line
        from hpctrain.launcher.contract.errors import UserError, UserErrors

        if isinstance(e, (UserError, UserErrors)):
            raise
        print(f"hpctrain: error: W&B sync failed ({type(e).__name__}: {str(e).strip()[:300]}); nothing "
              "was recorded as synced, run it again", file=sys.stderr)
        return 1
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from hpctrain.launcher.plot import plot

    print(f"plot written to {plot(args.run_dirs, args.out)}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from hpctrain.launcher.status import follow, node_logs

    follow(node_logs(args.run_dir, args.node), args.follow)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from hpctrain.launcher.status import cancel

    print(f"cancelled job(s) {', '.join(cancel(args.run_dir))}")
    return 0


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="run spec (YAML)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set training.lr=3e-4 (repeatable)",
    )


def positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a number above zero (argparse names the option and exits 2 otherwise)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value != value or value == float("inf"):
            what = "a whole number of at least 1" if kind is int else "a number above 0"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpctrain",
        description="Continued pretraining and fine-tuning runs from one YAML spec, locally or on Slurm.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    sub.add_parser("prepare", help="tokenize raw text into a Megatron-format token corpus", add_help=False)
    _spec_verbs(sub)
    _run_dir_verbs(sub)
    _tool_verbs(sub)
    return p


def _tool_verbs(sub) -> None:
    """Verbs that hand their arguments to a tool of their own (`TOOL_VERBS`; `prepare` too)."""

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tk_sub = tk.add_subparsers(dest="tokenizer_verb", metavar="ACTION", required=True)
    tk_sub.add_parser("train", help="train a byte-level BPE tokenizer on text files (HF format)", add_help=False)

    co = sub.add_parser("corpus", help="look at a token corpus")
    co_sub = co.add_subparsers(dest="corpus_verb", metavar="ACTION", required=True)
    co_sub.add_parser("inspect", help="counts, dtype, tokenizer, samples, length histogram", add_help=False)


def _spec_verbs(sub) -> None:
    """Verbs that take a spec: check it, plan it, run it here or on Slurm, sweep it."""
    va = sub.add_parser(
        "validate", help="check a spec and everything it points at, without running"
    )
    _spec_args(va)
    va.add_argument(
        "--no-slurm", dest="slurm", action="store_false", help="skip `sbatch --test-only` for slurm specs"
    )
    va.set_defaults(func=_cmd_validate)

    pl = sub.add_parser(
        "plan", help="memory per rank for DDP and each ZeRO stage; the smallest engine that fits",
        description=(__import__("hpctrain.launcher.plan", fromlist=["x"]).__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _spec_args(pl)
    pl.add_argument("--gpu-mem", type=positive(float), metavar="GB", help="memory of one GPU (default: "
                    "cluster.device_memory_gb, this machine's GPU, or its available memory / ranks)")
    pl.set_defaults(func=_cmd_plan)

    ru = sub.add_parser(
        "run", help="train on this machine (torchrun with the spec's process count)"
    )
    _spec_args(ru)
    ru.add_argument(
        "--no-resume",
        action="store_true",
        help="ignore checkpoints in the run dir and start over in a new run dir",
    )
    ru.set_defaults(func=_cmd_run)

    su = sub.add_parser("submit", help="submit the run to Slurm (through submitit)")
    _spec_args(su)
    su.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and torchrun command only"
    )
    su.add_argument("--no-resume", action="store_true", help="start over in a new run dir")
    su.add_argument("--forget-bad-nodes", action="store_true",
                    help="clear the nodes this run left out after attempts died or hung on them")
    su.set_defaults(func=_cmd_submit)

    sw = sub.add_parser("sweep", help="one run per point of a grid of spec values (--over KEY=V1,V2,...), "
                        "locally one after another or on Slurm as independent jobs; --report compares them")
    _spec_args(sw)
    sw.add_argument("--over", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a spec field and its values (repeatable: the grid of all of them), e.g. "
                    "--over data.corpora.0.weight=0.2,0.3,0.5")
    sw.add_argument("--max-parallel", type=positive(int), metavar="N", help="Slurm: at most N points queued or "
                    "running at once (default: all)")
    sw.add_argument("--report", action="store_true", help="print the sweep's comparison table and stop")
    sw.add_argument("--no-resume", action="store_true", help="start every point over in a new run dir")
    sw.set_defaults(func=_cmd_sweep)


def _run_dir_verbs(sub) -> None:
    """Verbs about a run directory: look at it, its logs and plots, end it, use its export."""
    st = sub.add_parser("status", help="job state, restarts, step, last loss, newest checkpoint")
    st.add_argument("run_dir")
    st.set_defaults(func=_cmd_status)

    sy = sub.add_parser("sync", help="upload a run's offline W&B segments as one W&B run (idempotent)")
    sy.add_argument("run_dir")
    sy.add_argument("--offline", action="store_true",
                    help="write the merged run as one offline run (RUN_DIR/wandb-merged/) instead of uploading")
    sy.set_defaults(func=_cmd_sync)

    pt = sub.add_parser("plot", help="loss, validation loss, LR, tokens/s and MFU against step, restarts "
                        "marked; several runs on one figure")
    pt.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pt.add_argument("--out", metavar="FILE.png", help="where to write it (default RUN_DIR/plot.png)")
    pt.set_defaults(func=_cmd_plot)

    lo = sub.add_parser("logs", help="show (or follow) the job's node logs")
    lo.add_argument("run_dir")
    lo.add_argument("-f", "--follow", action="store_true")
    lo.add_argument("--node", type=int, default=0, help="node task to show (default 0)")
    lo.set_defaults(func=_cmd_logs)

    ca = sub.add_parser("cancel", help="cancel the run's Slurm job(s)")
    ca.add_argument("run_dir")
    ca.set_defaults(func=_cmd_cancel)

    me = sub.add_parser("merge", help="merge a LoRA/QLoRA run's adapter into its base model (export/merged)")
    me.add_argument("run_dir")
    me.set_defaults(func=_cmd_merge)

    ev = sub.add_parser("eval", help="evaluate a fine-tuning run's export on a file of examples")
    ev.add_argument("run_dir")
    ev.add_argument("--data", required=True, help="JSONL/CSV/TSV with the run's fields")
    ev.add_argument("--predictions", help="seq2seq: where the generated outputs go (default: "
                    "RUN_DIR/eval/<data stem>.predictions.jsonl)")
    ev.set_defaults(func=_cmd_eval)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tool = tool_command(argv)
    if tool is not None:
        return run_module(tool[0], *tool[1])
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


def entry() -> None:
    """The `hpctrain` command: `main`, then an exit without the interpreter's slow teardown."""
    exit_process(main())


if __name__ == "__main__":
    entry()
