"""When a checkpoint is due: every N steps and/or M minutes of training, as the spec says, or
with `checkpoint.every_minutes: auto` the Young-Daly interval

    interval = sqrt(2 * C * MTBF)

that minimises the expected work lost to interruptions plus the time spent saving: C is what a
save costs the run (how long it blocked training, measured at every save), MTBF the expected
time between interruptions of this run. Until the run has been interrupted MTBF is the spec's
`checkpoint.mtbf_hours`; after n interruptions it is (mtbf_hours + hours trained) / (1 + n),
the prior counted as one more interval, so a few early preemptions move it without one of them
deciding it alone. An attempt knows C from the run's last logged save (`ckpt_save_s` in
metrics.jsonl); a run that has never saved saves after its first step to measure it (which
also shows early that checkpoints can be written). Rank 0 decides; the stop agreement's
all-reduce carries its decision to every rank (`StopRequest.agree`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

RECOMPUTE_CHANGE = 0.1  # a new interval is said on the console when it moves by more than this share


def last_logged_save_s(metrics: Path) -> float | None:
    """The blocking time of the newest save the run logged (its metrics.jsonl's end), or None."""
    if not metrics.is_file():
        return None
    with open(metrics, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - (1 << 20)))  # the last MiB holds many steps' records
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("ckpt_save_s"), int | float):
            return float(rec["ckpt_save_s"])
    return None


class Cadence:
    def __init__(self, cfg, deciding: bool, interruptions: int = 0, cost_s: float | None = None) -> None:
        self.every_steps = cfg.every_steps
        self.auto = cfg.every_minutes == "auto"
        self.minutes = None if self.auto else cfg.every_minutes
        self.prior_s = cfg.mtbf_hours * 3600
        self.deciding = deciding  # rank 0: the others follow through the stop agreement
        self.interruptions = interruptions
        self.cost_s = cost_s  # C: what the last save blocked training for
        self.step_s = 0.0  # a moving mean of the step time (hours trained = steps x this)
        self.interval_s: float | None = None
        self.said: float | None = None

    def due(self, step: int, last_save: float) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        if self.minutes:
            return time.time() - last_save >= self.minutes * 60
        if not (self.auto and self.deciding):
            return False
        if self.cost_s is None:  # never measured: this save measures it
            return True
        return self.interval_s is not None and time.time() - last_save >= self.interval_s

    def stepped(self, step: int, step_s: float) -> str | None:
        """After a step: the step time enters the hours trained, and the interval is chosen
        again; a line for the console when it moved (or was first chosen)."""
        self.step_s = step_s if self.step_s == 0 else 0.9 * self.step_s + 0.1 * step_s
        return self._choose(step)

    def saved(self, step: int, cost_s: float) -> str | None:
        self.cost_s = cost_s
        return self._choose(step)

    def mtbf_s(self, step: int) -> float:
        return (self.prior_s + step * self.step_s) / (1 + self.interruptions)

    def record(self, step: int) -> dict:
        """The interval and its inputs, for metrics.jsonl (`ckpt_interval_s`)."""
        return {"step": step, "ckpt_interval_s": round(self.interval_s, 3), "ckpt_cost_s": self.cost_s,
                "mtbf_h": round(self.mtbf_s(step) / 3600, 6), "interruptions": self.interruptions}

    def _choose(self, step: int) -> str | None:
        if not (self.auto and self.deciding) or self.cost_s is None:
            return None
        mtbf = self.mtbf_s(step)
        self.interval_s = math.sqrt(2 * self.cost_s * mtbf)
        if self.said is not None and abs(self.interval_s - self.said) <= RECOMPUTE_CHANGE * self.said:
            return None
        self.said = self.interval_s
        return (f"checkpoint cadence: every {_duration(self.interval_s)} (Young-Daly sqrt(2 C MTBF): a save blocks "
                f"training C = {self.cost_s:.2f}s, MTBF {mtbf / 3600:.3g} h = (mtbf_hours "
                f"{self.prior_s / 3600:g} + {step * self.step_s / 3600:.3g} h trained) / (1 + "
                f"{self.interruptions} interruption(s)))")


def _duration(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
