"""Test-only fault switches, read from the environment at the entry point and installed there;
no product code path knows about them. Unset (always, outside the test suite), nothing happens.

    HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S=STEP:SECONDS  the save of STEP waits before it publishes
                                                       (a window to kill a rank mid-save)
    HPCTRAIN_FAULT_FAIL_AT_STEP=STEP                   rank 0 crashes after STEP, every attempt
    HPCTRAIN_FAULT_STALL=RANK:STEP                     RANK stops making progress after STEP
    HPCTRAIN_FAULT_SLOW_STEP_S=SECONDS                 every step takes SECONDS longer, idle (a
                                                       slow step without the CPU it would burn)
    HPCTRAIN_FAULT_SLOW_REFERENCE_PART_S=SECONDS       every part of DPO's reference pass takes
                                                       SECONDS longer (a window to stop the pass)
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass


def _read(env: dict, name: str, *types: type):
    """A switch's colon-separated fields converted by `types` (one type: the value), or None."""
    raw = env.get(name, "")
    if not raw:
        return None
    fields = raw.split(":")
    if len(fields) != len(types):
        raise SystemExit(f"{name}={raw!r}: expected {len(types)} colon-separated field(s)")
    values = tuple(t(f) for t, f in zip(types, fields, strict=True))
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class Faults:
    pause_before_commit: tuple[int, float] | None = None
    fail_at_step: int | None = None
    stall: tuple[int, int] | None = None
    slow_step: float | None = None
    slow_reference_part: float | None = None

    @classmethod
    def from_env(cls, env: dict | None = None) -> Faults:
        env = os.environ if env is None else env
        return cls(
            pause_before_commit=_read(env, "HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S", int, float),
            fail_at_step=_read(env, "HPCTRAIN_FAULT_FAIL_AT_STEP", int),
            stall=_read(env, "HPCTRAIN_FAULT_STALL", int, int),
            slow_step=_read(env, "HPCTRAIN_FAULT_SLOW_STEP_S", float),
            slow_reference_part=_read(env, "HPCTRAIN_FAULT_SLOW_REFERENCE_PART_S", float),
        )

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.pause_before_commit, self.fail_at_step, self.stall,
                                           self.slow_step, self.slow_reference_part))


def install(faults: Faults) -> None:
    """Wrap the points the switches act at: a checkpoint's publication, a rank's step boundary
    (after its watchdog heard of the step, as a real crash or stall would be), a part of the
    reference pass."""
    if not faults:
        return
    from hpctrain.trainers.checkpoint import Checkpointer
    from hpctrain.trainers.run import Run

    if faults.pause_before_commit is not None:
        pause_step, seconds = faults.pause_before_commit
        publish = Checkpointer.publish

        @functools.wraps(publish)
        def paused_publish(self, tmp, final, meta):
            if meta.step == pause_step:
                time.sleep(seconds)
            return publish(self, tmp, final, meta)

        Checkpointer.publish = paused_publish

    if faults.fail_at_step is not None or faults.stall is not None or faults.slow_step is not None:
        original = Run.after_step

        # named as the method it wraps: a stalled rank's stack shows it stopped in after_step
        @functools.wraps(original)
        def after_step(self, step, total, step_seconds, *args, **kwargs):
            self.watchdog.beat(step, step_seconds)
            if faults.fail_at_step == step and self.d.is_main:
                raise RuntimeError(f"HPCTRAIN_FAULT_FAIL_AT_STEP: a deliberate crash after step {step} (tests)")
            if faults.stall == (self.d.rank, step):
                print(f"HPCTRAIN_FAULT_STALL: rank {self.d.rank} stops at step {step} (tests)", file=sys.stderr,
                      flush=True)
                time.sleep(3600)
            if faults.slow_step is not None:  # counted in the step's time, as a slow step's would be
                time.sleep(faults.slow_step)
                step_seconds += faults.slow_step
            return original(self, step, total, step_seconds, *args, **kwargs)

        Run.after_step = after_step

    if faults.slow_reference_part is not None:
        from hpctrain.trainers.tasks.reference import Precompute

        part = Precompute._part

        @functools.wraps(part)
        def slow_part(self, *args, **kwargs):
            time.sleep(faults.slow_reference_part)
            return part(self, *args, **kwargs)

        Precompute._part = slow_part
