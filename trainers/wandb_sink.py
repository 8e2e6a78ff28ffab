"""Global rank 0's Weights & Biases run: one per run dir, continued across restarts.

- The id lives in RUN_DIR/wandb_id (made with the run dir, launcher/contract/rundir.py); every
  attempt calls `wandb.init(id=..., resume="allow")`, so restarts, requeues and resumes
  continue one run. Pipeline stages share a group (the pipeline's name).
- The run's config is the frozen spec (which holds no secrets: the spec refuses them).
- After a crash the steps since the last checkpoint are trained again. W&B keeps a run's
  steps strictly increasing, so online the sink does not re-send steps W&B already has
  (`starting_step`); resume is bitwise, so the values it has are the values it would get.
  Offline, released wandb starts a new folder per attempt; `hpctrain sync` merges them.
- W&B failing (not installed, no key, unreachable, disk full) never stops training: one
  warning, the sink turns itself off, metrics.jsonl stays complete.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hpctrain.launcher.contract.rundir import wandb_run_id
from hpctrain.launcher.contract.spec import RunSpec


class WandbSink:
    def __init__(self, spec: RunSpec, run_dir: Path, print_fn=print) -> None:
        self.run = None
        self.print = print_fn
        self.skipped: list[int] = []
        w = spec.monitor.wandb
        try:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.run = wandb.init(
                project=w.project or spec.name, entity=w.entity, group=w.group, tags=w.tags or None,
                name=spec.name, id=wandb_run_id(run_dir), resume="allow", mode=w.mode, dir=str(run_dir),
                config=spec.model_dump(mode="json"),
                settings=wandb.Settings(console="off", save_code=False, silent=True),
            )
        except Exception as e:  # noqa: BLE001 - any W&B failure: warn once, train on
            self._fail(e)
            return
        self.first_step = int(getattr(self.run, "starting_step", 0) or 0)
        where = self.run.url if w.mode == "online" else str(Path(self.run.dir).parent)
        self.print(f"W&B run {self.run.id} ({w.mode}): {where}")

    def _fail(self, error: Exception) -> None:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        print(f"hpctrain: warning: W&B is off for this attempt ({type(error).__name__}: {first}); "
              "training goes on and metrics.jsonl stays complete", file=sys.stderr, flush=True)
        self.print("warning: W&B failed; see the rank-0 log. Training goes on (metrics.jsonl is complete)")
        self.run = None

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        step = int(record.get("step", 0))
        if step < self.first_step:  # W&B has it already (trained again after a crash)
            self.skipped.append(step)
            return
        data = {k: v for k, v in record.items() if k not in ("step", "time")}
        try:
            self.run.log(data, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        """`rows` as a W&B table under `name` at `step` (columns: the first row's keys)."""
        if self.run is None or not rows or step < self.first_step:
            return
        try:
            import wandb

            columns = list(rows[0])
            data = [[r.get(c) if isinstance(r.get(c), (int, float)) else str(r.get(c)) for c in columns] for r in rows]
            self.run.log({name: wandb.Table(columns=columns, data=data)}, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self, preempted: bool = False) -> None:
        if self.run is None:
            return
        if self.skipped:
            self.print(f"W&B already had steps {min(self.skipped)}-{max(self.skipped)} (trained again after "
                       "a crash, with the same values): not sent twice")
        try:
            if preempted:
                self.run.mark_preempting()
            self.run.finish(exit_code=1 if preempted else 0)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        self.run = None
