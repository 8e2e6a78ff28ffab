"""The run directory: one object that knows every path in it, the frozen spec, the W&B id,
and the one reader of metrics.jsonl. No torch here.

    RUN_DIR/spec.yaml                 resolved spec, frozen at the first launch
    RUN_DIR/checkpoints/              complete checkpoints and `latest` (contract/checkpoints.py)
    RUN_DIR/metrics.jsonl             one JSON line per logged step / evaluation
    RUN_DIR/status.json               the run's state (contract/states.py)
    RUN_DIR/wandb_id, RUN_DIR/wandb/  the one W&B run of every attempt, and its files
    RUN_DIR/export/, RUN_DIR/best/    the final model (and fine-tuning's best) in HF format
    RUN_DIR/control/                  between launcher and trainers: stop requests (`stop`
                                      locally, `stop-JOB.N` per Slurm attempt), `aborted`,
                                      the run dir's `lock`, failure and hang reports, the
                                      `disk-reserve` (contract/diskfull.py)
    RUN_DIR/logs/                     per-rank logs (`local.N/`, `jobJOB.N/nodeK/`)
    RUN_DIR/slurm/                    submitit's folder and `jobs.json`
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpctrain.launcher.contract.checkpoints import complete_checkpoints
from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.spec import (
    RunSpec,
    forbidden_changes,
    load_spec_dict,
    spec_from_dict,
    spec_to_yaml,
)

WANDB_ID_FILE = "wandb_id"
JOBS_FILE = "jobs.json"


@dataclass(frozen=True)
class RunDir:
    """Every path of one run directory (nothing is created by asking)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def wandb_id(self) -> Path:
        return self.root / WANDB_ID_FILE

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def reference(self) -> Path:
        """Precomputed reference log-probs of a DPO run (trainers/tasks/reference.py)."""
        return self.root / "reference"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def stop_file(self) -> Path:
        """The local launcher's stop request (deleted at each launch)."""
        return self.control / "stop"

    @property
    def aborted_file(self) -> Path:
        """Written when a second Ctrl-C aborted the launcher's torchrun."""
        return self.control / "aborted"

    @property
    def lock(self) -> Path:
        return self.control / "lock"

    @property
    def disk_reserve(self) -> Path:
        """Space kept for the record of a full disk (contract/diskfull.py)."""
        return self.control / "disk-reserve"

    def slurm_stop_file(self, job: str, restart: int | str) -> Path:
        """The stop request of one Slurm attempt (a requeued job's next attempt has its own)."""
        return self.control / f"stop-{job}.{restart}"

    def failure_reports(self, job: str, restart: int | str) -> Path:
        """Where one Slurm attempt's node tasks leave why their ranks ended."""
        return self.control / f"failure-{job}.{restart}"

    def hang_report(self, rank: int) -> Path:
        return self.control / f"hang.{rank}.json"

    def hang_reports(self) -> list[Path]:
        return sorted(self.control.glob("hang.*.json"))

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def node_logs(self, job: str, restart: int | str, node: int) -> Path:
        return self.logs / f"job{job}.{restart}" / f"node{node}"

    @property
    def local_logs(self) -> Path:
        """`logs/local`; each local launch takes the first free `logs/local.N`."""
        return self.logs / "local"

    @property
    def slurm(self) -> Path:
        """submitit's folder: sbatch scripts, pickles, and its job logs."""
        return self.root / "slurm"

    @property
    def jobs_file(self) -> Path:
        return self.slurm / JOBS_FILE

    @property
    def excluded_nodes(self) -> Path:
        """Nodes this run's attempts died or hung on, left out of its later jobs (launcher/bad_nodes.py)."""
        return self.slurm / "excluded_nodes.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, rename: complete or absent."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def aborted(run_dir: str | Path) -> bool:
    """Whether the launcher's last torchrun was aborted by a second Ctrl-C."""
    return RunDir(run_dir).aborted_file.is_file()



def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of this run dir: made once, when W&B is first enabled for it, and kept,
    so every restart, requeue and resume continues the same W&B run."""
    path = RunDir(run_dir).wandb_id
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
    frozen = RunDir(run).spec_file
    if frozen.is_file() and complete_checkpoints(run):
        if not resume:
            new = next_free_path(run)
            log(f"--no-resume: {run} holds checkpoints; starting over in {new}")
            spec = spec.model_copy(update={"run_dir": str(new)})
            run, frozen = new, RunDir(new).spec_file
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


def metrics_records(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl in order ([] when none; a line cut by a crash is skipped)."""
    f = RunDir(run_dir).metrics
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


def validation_losses(record: dict) -> list[tuple[str | None, float]]:
    """[(set name, or None for the single unnamed set; loss)] in a metrics record: `val_loss`, or
    `val/<name>/loss` of named sets (`ValidationSet.key` in the spec writes them)."""
    out: list[tuple[str | None, float]] = []
    for k, v in record.items():
        if k == "val_loss":
            out.append((None, v))
        elif k.startswith("val/") and k.endswith("/loss"):
            out.append((k[len("val/"):-len("/loss")], v))
    return out
