"""`hpctrain run`: one machine, torchrun with the spec's process count."""

from __future__ import annotations

import os
from pathlib import Path

from launcher.node import build_torchrun_command, run_torchrun
from launcher.rundir import read_status
from launcher.spec import RunSpec


def torch_env(nproc: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_local(spec: RunSpec, run_dir: Path, log=print) -> int:
    if spec.cluster.nodes != 1:
        log(
            f"note: cluster.nodes={spec.cluster.nodes}; a local run uses this machine only "
            f"({spec.cluster.procs_per_node} process(es))"
        )
    cmd = build_torchrun_command(str(run_dir), spec.cluster.procs_per_node, module=spec.trainer_module)
    rc = run_torchrun(cmd, run_dir, env=torch_env(spec.cluster.procs_per_node), log=log)
    status = read_status(run_dir)
    state = status.get("state")
    if rc == 0 and state == "finished":
        log(f"done: {spec.name} trained {status.get('step')} steps")
        log(f"  checkpoints: {run_dir / 'checkpoints'}\n  metrics:     {run_dir / 'metrics.jsonl'}")
        if spec.export.enabled:
            log(f"  export:      {run_dir / 'export'}")
        return 0
    if rc == 0 and state == "preempted":
        log(
            f"stopped at step {status.get('step')} with a checkpoint; run the same command to resume"
        )
        return 0
    if rc == 2 or status.get("user_error"):
        return 2  # the trainer printed the message
    log(f"hpctrain: training failed (torchrun exit code {rc}); see the output above")
    return rc or 1
