"""The preemption protocol, trainer side. Read this file to know how a run stops.

1. A stop request reaches a trainer rank in one of two ways, and either is enough
   (clusters differ in who gets Slurm's signal, see docs/cluster-notes.md):
   - a signal delivered to the rank itself: SIGUSR2 (Slurm/submitit's preemption
     and time-limit signal), SIGTERM, or SIGINT. The handler only sets a flag:
     saving inside a handler has been seen to hang;
   - the stop file RUN_DIR/control/stop, written by the launcher's node task
     when *it* receives the signal (or Ctrl-C). torchrun itself is started with
     SIGUSR2 ignored so it survives the signal and keeps its workers.
2. At every step boundary the ranks agree: one all-reduce (MAX) of what each
   rank saw (a signal, the stop file, the deadline near), so all ranks stop at
   the same step and name the same reason.
3. The loop then saves one checkpoint collectively and exits 0 with status
   "preempted"; the launcher (or submitit's checkpoint()) sees that status and
   requeues only after the save is complete.
4. On restart every rank scans RUN_DIR/checkpoints for the newest complete
   checkpoint and continues at the exact next sample.

Workers also ask the kernel to kill them if their parent (torchrun) dies, so
no trainer outlives its job (orphans survived requeues under proctrack/linuxproc).
"""

from __future__ import annotations

import ctypes
import signal
import time
from pathlib import Path

from hpctrain.trainers.distributed import agree_any

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
REASONS = (*(s.name for s in STOP_SIGNALS), "stop file", "deadline")  # what `local_reason` can say
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no orphaned ranks)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # not Linux: nothing to do
        pass


class StopRequest:
    """Collects stop requests (signals, stop file, deadline) and makes ranks agree."""

    def __init__(
        self, stop_file: Path, deadline: float | None = None, margin_s: float = 0.0
    ) -> None:
        self.stop_file = stop_file
        self.deadline = deadline
        self.margin_s = margin_s
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signal_name = signal.Signals(signum).name

    def local_reason(self, next_step_s: float = 0.0) -> str | None:
        if self.signal_name:
            return self.signal_name
        if self.stop_file.exists():
            return "stop file"
        if self.deadline is not None and time.time() + next_step_s + self.margin_s >= self.deadline:
            return "deadline"
        return None

    def agree(self, save_due: bool, next_step_s: float = 0.0) -> tuple[str | None, bool]:
        """(reason to stop, save now?), the same on every rank after one all-reduce.

        The reason names what any rank saw ("stop file", "SIGUSR2", "stop file, SIGUSR2"...), so
        the console says why a run stopped whichever rank heard of it first. A time-based save
        interval is decided per rank too, so it rides along: if any rank wants to save or stop,
        all of them do, at this very step.
        """
        reason = self.local_reason(next_step_s)
        seen = agree_any([reason == kind for kind in REASONS] + [save_due])
        stop = [kind for kind, yes in zip(REASONS, seen, strict=False) if yes]
        return (", ".join(stop) or None), seen[-1]
