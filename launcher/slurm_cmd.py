"""Slurm's commands (scontrol, squeue, scancel) as a node task runs them.

A preemption's SIGUSR2, and the SIGTERM of a requeue's or a cancel's kill, reach
every process of a job step where Slurm tracks processes without cgroups
(`ProctrackType=proctrack/linuxproc`, docs/cluster-notes.md). A command the
node task has started at that moment would die of it half-way: `scontrol show
hostnames` printing nothing cost a node task its start (it could not name the
rendezvous host), and its peers waited for it in torchrun's rendezvous. So the
commands start with both signals ignored; an ignored signal stays ignored
through exec, and the node task itself still gets and handles them.
"""

from __future__ import annotations

import signal
import subprocess

SHIELDED = (signal.SIGUSR2, signal.SIGTERM)


def _shield() -> None:  # in the child, between fork and exec
    for s in SHIELDED:
        signal.signal(s, signal.SIG_IGN)


def slurm_command(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a Slurm command with its output captured (text), immune to the step's signals."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, preexec_fn=_shield)


def failure(done: subprocess.CompletedProcess) -> str:
    """'' if the command succeeded, else the command and what it said (its stderr, or its exit code)."""
    if done.returncode == 0:
        return ""
    return f"{' '.join(done.args)}: {done.stderr.strip() or f'exit code {done.returncode}'}"
