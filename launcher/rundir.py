"""The run directory: frozen spec, checkpoint discovery, status. No torch here.

RUN_DIR/spec.yaml              resolved spec, frozen at the first launch
RUN_DIR/checkpoints/step_N/    complete checkpoints (meta.json inside = complete; it records
                               every file's size and crc32, checked before a resume trusts it)
RUN_DIR/checkpoints/latest     name of the newest one (a derived view, written last)
RUN_DIR/metrics.jsonl          one JSON line per logged step / evaluation
RUN_DIR/status.json            running | preempted | finished | failed | stopped (the mark_* transitions below)
RUN_DIR/control/stop           a stop request from the launcher (deleted at each launch)
RUN_DIR/export/                the final model in HF format
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from pathlib import Path

from hpctrain.launcher.attempt import RetryVerdict
from hpctrain.launcher.errors import UserError
from hpctrain.launcher.spec import (
    RunSpec,
    forbidden_changes,
    load_spec_dict,
    spec_from_dict,
    spec_to_yaml,
)

CHECKPOINTS = "checkpoints"
META = "meta.json"
STEP_RE = re.compile(r"^step_(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, rename: complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first. Incomplete ones are invisible."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / META).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def file_records(directory: Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file under a checkpoint folder but its meta.json:
    what a resume checks before it trusts the checkpoint (a copy cut short, a failing disk)."""
    out = {}
    for f in sorted(Path(directory).rglob("*")):
        if f.is_file() and f.name != META:
            out[f.relative_to(directory).as_posix()] = [f.stat().st_size, file_crc32(f)]
    return out


def file_crc32(path: Path, chunk: int = 4 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def checkpoint_damage(path: Path, checksums: bool = True) -> str | None:
    """Why a complete checkpoint cannot be trusted, or None when every file is as it was saved
    (sizes always; contents with `checksums`). A checkpoint saved before files were recorded
    is trusted as it is."""
    try:
        recorded = json.loads((path / META).read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"{META} does not read ({e})"
    for rel, (size, crc) in (recorded or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        on_disk = f.stat().st_size
        if on_disk != size:
            return f"{rel} has {on_disk:,} bytes on disk, {size:,} when it was saved"
        if checksums and file_crc32(f) != crc:
            return f"{rel} differs from what was saved (checksum)"
    return None


def newest_whole_checkpoint(run_dir: str | Path, checksums: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint whose files are whole, and the newer ones skipped (with why)."""
    skipped = []
    for _, path in reversed(complete_checkpoints(run_dir)):
        why = checkpoint_damage(path, checksums)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, found by scanning (never trusting a stored path)."""
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def read_status(run_dir: str | Path) -> dict:
    p = Path(run_dir) / "status.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


CARRIED = ("attempts", "retries")  # kept through every transition


def _write_status(run_dir: str | Path, **fields) -> None:
    old = read_status(run_dir)
    fields = {**{k: old[k] for k in CARRIED if k in old}, **fields}
    atomic_write_text(Path(run_dir) / "status.json", json.dumps(fields, sort_keys=True) + "\n")


# The run's status and its transitions: this module is the only writer of status.json.
#   running -> preempted (checkpoint saved, resumable) | finished | failed | hung
#   preempted -> running (resumed) | stopped (Slurm would not requeue it)
#   any -> cancelled (the user ended it)


def mark_running(run_dir: str | Path, step: int, total: int, pid: int) -> int:
    """An attempt starts; returns how many attempts before it started (restarts)."""
    restarts = int(read_status(run_dir).get("attempts", 0))
    _write_status(run_dir, state="running", step=step, total_steps=total, pid=pid, attempts=restarts + 1)
    return restarts


def mark_preempted(run_dir: str | Path, step: int, total: int, reason: str) -> None:
    """The ranks saved a checkpoint at `step` and stopped: resumable. A run the user cancelled
    (whose ranks saved on the way out) stays cancelled."""
    old = read_status(run_dir)
    if old.get("state") == "cancelled":
        _write_status(run_dir, **{**old, "step": step, "total_steps": total})
        return
    _write_status(run_dir, state="preempted", step=step, total_steps=total, reason=reason)


def mark_finished(run_dir: str | Path, step: int, total: int, **extra) -> None:
    _write_status(run_dir, state="finished", step=step, total_steps=total, **extra)


def mark_failed(run_dir: str | Path, reason: str, user_error: bool = False, disk_full: bool = False) -> None:
    """The attempt failed: its reason and the last step it logged (not the step it started at).
    `user_error` and `disk_full` mark failures that a retry would only repeat."""
    old = read_status(run_dir)
    keep = {k: old[k] for k in ("step", "total_steps") if k in old}
    keep["step"] = max(keep.get("step", 0), last_logged_step(run_dir))
    flags = {k: True for k, v in (("user_error", user_error), ("disk_full", disk_full)) if v}
    _write_status(run_dir, **keep, state="failed", reason=reason, **flags)


def record_retry(run_dir: str | Path, reason: str, step: int, scope: str = "") -> None:
    """A failed attempt is being retried: keep its reason and step in the status's history
    (`scope`: the launch or Slurm job the retry belongs to; its retry budget is its own)."""
    old = read_status(run_dir)
    retries = [*old.get("retries", []), {"step": step, "reason": reason, "scope": scope}]
    _write_status(run_dir, **{**old, "retries": retries})


def give_up(run_dir: str | Path, verdict: RetryVerdict, reason: str) -> None:
    """Record a verdict not to retry: a step that failed twice in a row joins the failure's reason."""
    if verdict.repeated_step:
        mark_failed(run_dir, f"{reason}; {verdict.why}")


def metrics_records(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl in order ([] when none; a line cut by a crash is skipped)."""
    f = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in f.read_text(errors="replace").splitlines() if f.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def last_logged_step(run_dir: str | Path) -> int:
    """The highest training step in metrics.jsonl (0 when none)."""
    return max((int(r.get("step", 0)) for r in metrics_records(run_dir) if "loss" in r), default=0)


def mark_hung(run_dir: str | Path, step: int, total: int, reason: str) -> None:
    """No step completed within the watchdog's limit; the job ends (not requeued)."""
    _write_status(run_dir, state="hung", step=step, total_steps=total, reason=reason)


def mark_cancelled(run_dir: str | Path, reason: str) -> None:
    """Ended by the user (Ctrl-C twice, `hpctrain cancel`); the step reached is kept."""
    old = read_status(run_dir)
    step = max(old.get("step", 0), last_logged_step(run_dir))
    _write_status(run_dir, **{**old, "state": "cancelled", "step": step, "reason": reason})


def aborted(run_dir: str | Path) -> bool:
    """Whether the launcher's last torchrun was aborted by a second Ctrl-C."""
    return (stop_file(run_dir).with_name("aborted")).is_file()


def mark_stopped(run_dir: str | Path, reason: str) -> None:
    """Preempted or timed out, and not requeued (the requeue limit)."""
    _write_status(run_dir, **{**read_status(run_dir), "state": "stopped", "reason": reason})


def stop_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "control" / "stop"


WANDB_ID_FILE = "wandb_id"


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of this run dir: made once, when W&B is first enabled for it, and kept,
    so every restart, requeue and resume continues the same W&B run."""
    path = Path(run_dir) / WANDB_ID_FILE
    if not path.is_file():
        import secrets

        tmp = path.with_name(f".{WANDB_ID_FILE}.{os.getpid()}.tmp")
        tmp.write_text(secrets.token_hex(4) + "\n")
        try:
            os.link(tmp, path)  # atomic create-if-absent: a racing writer keeps the first id
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def next_free_path(run: Path) -> Path:
    """`run.1`, `run.2`, ...: the first that does not exist."""
    k = 1
    while Path(f"{run}.{k}").exists():
        k += 1
    return Path(f"{run}.{k}")


def freeze_run_dir(spec: RunSpec, resume: bool = True, log=print) -> tuple[RunSpec, Path]:
    """Create or re-open the run dir for `spec`; returns the spec as frozen there.

    Re-launching the same run dir must not silently change what the checkpoints
    mean: only the changes that resuming allows pass; anything else is refused.
    With resume=False a run dir holding checkpoints is left alone and the run
    starts over in `<run_dir>.N`.
    """
    run = Path(spec.run_path)
    frozen = run / "spec.yaml"
    if frozen.is_file() and complete_checkpoints(run):
        if not resume:
            new = next_free_path(run)
            log(f"--no-resume: {run} holds checkpoints; starting over in {new}")
            spec = spec.model_copy(update={"run_dir": str(new)})
            run, frozen = new, new / "spec.yaml"
        else:
            old = spec_from_dict(load_spec_dict(frozen), str(frozen))
            bad = forbidden_changes(old, spec.model_copy(update={"run_dir": old.run_dir}))
            if bad:
                raise UserError(
                    f"this run dir was started with a different spec: {', '.join(bad)} changed",
                    file=str(frozen),
                    field=bad[0],
                    expected="the same spec (only the budget, checkpoint cadence, cluster size and loader "
                    "workers may change on resume)",
                    hint="use --no-resume to start over in a new run dir, or another run_dir",
                )
    try:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(frozen, spec_to_yaml(spec))
        if spec.monitor.wandb.mode != "disabled":
            wandb_run_id(run)
    except OSError as e:
        raise UserError(
            f"cannot write the run dir: {e.strerror}", file=str(run), field="run_dir"
        ) from None
    return spec, run
