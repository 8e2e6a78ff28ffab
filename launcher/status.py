"""`hpctrain status` / `logs` / `cancel`: what a run dir and Slurm say about a run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from hpctrain.launcher import bad_nodes
from hpctrain.launcher.contract.checkpoints import newest_whole_checkpoint
from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.rundir import RunDir, metrics_records, validation_losses
from hpctrain.launcher.contract.states import State, read_status


def _require_run_dir(run_dir: str) -> Path:
    p = Path(run_dir)
    if not RunDir(p).spec_file.is_file():
        raise UserError(
            "not a run directory (no spec.yaml)",
            file=str(p),
            expected="a run dir made by run/submit",
        )
    return p


def last_metrics(run_dir: Path) -> dict:
    """The newest training record (a line still being written is skipped by the one reader)."""
    return next((r for r in reversed(metrics_records(run_dir)) if "loss" in r), {})


def last_validation(run_dir: Path) -> tuple[int, list[tuple[str | None, float]]] | None:
    """(step, the losses of every validation set) of the last evaluation, or None."""
    for r in reversed(metrics_records(run_dir)):
        sets = validation_losses(r)
        if sets:
            return int(r["step"]), sets
    return None


def rank_logs(run_dir: Path) -> list[Path]:
    """stderr/stdout files of every rank of the newest attempt (torchrun --log-dir layout)."""
    root = RunDir(run_dir).logs
    if not root.is_dir():
        return []
    attempts = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not attempts:
        return []
    return sorted(attempts[-1].rglob("*.log"))


def tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _hub_lines(run: Path) -> list[str]:
    """The Hub models the run was pinned to (launcher/hub.py), from its frozen spec."""
    import yaml

    try:
        hub = (yaml.safe_load(RunDir(run).spec_file.read_text()) or {}).get("hub") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [f"{field}: {p.get('id')}@{p.get('revision')} pinned to commit {p.get('sha')}"
            for field, p in hub.items() if isinstance(p, dict)]


def status_text(run_dir: str) -> str:
    from hpctrain.launcher.slurm import jobs_of, slurm_state
    from hpctrain.launcher.sweep import read_sweep, report

    if read_sweep(run_dir) is not None:  # a sweep's dir: its comparison table
        return report(run_dir)
    run = _require_run_dir(run_dir)
    st = read_status(run)
    lines = [f"run dir: {run}"]
    jobs = jobs_of(run)
    if jobs:
        job = jobs[-1]["job_id"]
        sl = slurm_state(job)
        if sl:
            lines.append(
                f"slurm job {job}: {sl['state']} (reason {sl['reason']}), restarts {sl['restarts']}, "
                f"nodes {sl['nodes']}, run time {sl['run_time']}"
            )
        else:
            lines.append(
                f"slurm job {job}: no longer known to Slurm (finished jobs age out; no sacct here)"
            )
    lines += _hub_lines(run) + bad_nodes.status_lines(run)
    state = st.state or "not started"
    lines.append(
        f"trainer: {state}"
        + (f" at step {st.step}/{st.total_steps}" if st.state else "")
        + (f" ({st.reason})" if st.reason else "")
    )
    m = last_metrics(run)
    if m:
        lines.append(
            f"last loss: {m['loss']:.4f} at step {m['step']} ({time.strftime('%H:%M:%S', time.localtime(m['time']))})"
        )
        speed = []
        if m.get("tokens_per_s"):
            speed.append(f"{m['tokens_per_s']:,.0f} tokens/s")
        if m.get("mfu") is not None:
            speed.append(f"MFU {m['mfu']:.1%}")
        elif m.get("tflops_per_device"):
            speed.append(f"{m['tflops_per_device']:.3g} TFLOP/s per device")
        if state == State.RUNNING and m.get("step_time_s") and st.total_steps:
            left = (st.total_steps - m["step"]) * m["step_time_s"]
            speed.append(f"ETA {int(left) // 3600}:{int(left) // 60 % 60:02d}:{int(left) % 60:02d}")
        if m.get("restarts"):
            speed.append(f"{m['restarts']} restart(s)")
        if speed:
            lines.append("speed: " + ", ".join(speed))
    val = last_validation(run)
    if val:
        step, sets = val
        lines.append(f"validation at step {step}: " + "; ".join(
            f"{name + ' ' if name else ''}loss {loss:.4f}" for name, loss in sets))
    if st.retries:
        lines.append(f"retries: {len(st.retries)} ("
                     + "; ".join(f"step {r.step}: {r.reason}" for r in st.retries) + ")")
    ck = newest_whole_checkpoint(run, checksums=False)[0]
    lines.append(f"newest checkpoint: {ck if ck else 'none'}")
    lines += wandb_lines(run)
    if state == State.FAILED:
        for log in rank_logs(run):
            if log.name == "stderr.log":
                lines.append(f"--- last lines of {log}")
                lines += [f"  {x}" for x in tail(log, 8)]
    return "\n".join(lines)


def node_logs(run_dir: str, node: int = 0) -> list[Path]:
    from hpctrain.launcher.slurm import jobs_of

    run = _require_run_dir(run_dir)
    jobs = jobs_of(run)
    if not jobs:
        raise UserError("no Slurm job was submitted from this run dir", file=str(run))
    job = jobs[-1]["job_id"]
    return [RunDir(run).slurm / f"{job}_{node}_log.out", RunDir(run).slurm / f"{job}_{node}_log.err"]


def follow(paths: list[Path], follow_: bool) -> None:
    if not follow_:
        for p in paths:
            if p.is_file():
                print(f"==> {p} <==")
                print(p.read_text(errors="replace"), end="")
        return
    cmd = ["tail", "-n", "50", "-F", *map(str, paths)]
    try:
        subprocess.run(cmd)
    except KeyboardInterrupt:
        pass


def cancel(run_dir: str) -> list[str]:
    from hpctrain.launcher.slurm import jobs_of

    run = _require_run_dir(run_dir)
    ids = [j["job_id"] for j in jobs_of(run)]
    if not ids:
        raise UserError("no Slurm job was submitted from this run dir", file=str(run))
    subprocess.run(["scancel", *ids], check=False)
    from hpctrain.launcher.contract.states import mark_cancelled

    mark_cancelled(run, f"cancelled with hpctrain cancel (scancel {' '.join(ids)})")
    return ids


def wandb_lines(run: Path) -> list[str]:
    """The W&B run of this run dir, and what is left to upload."""
    from hpctrain.launcher.contract.rundir import WANDB_ID_FILE
    from hpctrain.launcher.wandb_files import SYNCED_FILE, offline_segments

    if not (run / WANDB_ID_FILE).is_file():
        return []
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    segments = offline_segments(run)
    line = f"W&B run: {run_id}"
    if segments:
        synced = json.loads((run / SYNCED_FILE).read_text())["last_step"] if (run / SYNCED_FILE).is_file() else 0
        line += (f" ({len(segments)} offline segment(s); synced up to step {synced}; "
                 f"upload: hpctrain sync {run})")
    return [line]
