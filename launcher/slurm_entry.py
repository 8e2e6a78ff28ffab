"""First code of every Slurm node task: hold on to an early USR2, then run submitit.

A preemption can arrive before Python has imported submitit (about a second):
the default action of SIGUSR2 would kill the task and fail the job. This module
is tiny, so it installs a recording handler within milliseconds; `NodeTask`
replays a recorded signal once submitit's handlers are in place. Before this
module runs, USR2 is ignored (`launcher.slurm.node_task_python` starts Python
through /bin/sh with `trap '' USR2`).

    /bin/sh -c 'trap "" USR2; exec "$0" "$@"' python -u -m hpctrain.launcher.slurm_entry \\
        -u -m submitit.core._submit FOLDER
"""

from __future__ import annotations

import runpy
import signal
import sys

EARLY_SIGNALS: list[int] = []


def _record(signum, frame) -> None:  # noqa: ARG001
    EARLY_SIGNALS.append(signum)


def main() -> None:
    signal.signal(signal.SIGUSR2, _record)
    # run with -m this module is __main__: NodeTask imports it by name, and must find this one
    # (the one holding the signals), not a fresh copy with an empty list
    sys.modules.setdefault("hpctrain.launcher.slurm_entry", sys.modules[__name__])
    args = sys.argv[1:]
    module = args[args.index("-m") + 1]
    sys.argv = [module, *args[args.index("-m") + 2 :]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
