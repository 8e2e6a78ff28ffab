"""Starting torchrun on one node and carrying a stop request to its workers.

The launcher side of the preemption protocol (the trainer side is in
trainers/preemption.py):
- torchrun starts in its own session with SIGUSR2 ignored: it would otherwise
  die of it (it forwards only INT/TERM/HUP/QUIT), taking unsaved workers along;
- it dies with this process (PR_SET_PDEATHSIG), and its workers die with it;
- when this process receives SIGUSR2, SIGTERM or SIGINT it writes the run's stop
  file; the ranks see it at the next step boundary, agree, save and exit. A second
  SIGINT (Ctrl-C twice) ends torchrun at once; the last complete checkpoint stays.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from hpctrain.launcher.contract.rundir import RunDir

PR_SET_PDEATHSIG = 1
WARM_START = "hpctrain.trainers.warm_start"
# room in torchrun's environment for a forked rank's own (trainers/warm_start.py: /proc/PID/environ)
ENV_ROOM = {"HPCTRAIN_ENV_ROOM": "." * 4096}
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA's driver, AMD's ROCm


def forks_ranks(rank_start: str) -> bool:
    """Whether this node's ranks start by forking torchrun's pre-imported process
    (`cluster.rank_start`): `auto` forks where the node has no GPU - a process that forks after
    CUDA or ROCm started cannot use the GPU, and starting them is not something imports are
    trusted never to do."""
    if rank_start != "auto":
        return rank_start == "fork"
    return not any(os.path.exists(p) for p in GPU_DEVICE_FILES)
FORWARDED = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def build_torchrun_command(
    run_dir: str,
    nproc_per_node: int,
    module: str = "hpctrain.trainers.pretrain",
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    run_id: str | None = None,
    deadline: float | None = None,
    python: str | None = None,
    stop_file: str | None = None,
    log_dir: str | None = None,
    fork_ranks: bool = False,
) -> list[str]:
    """The torchrun argv for one node (pure: unit-testable, quoted with shlex when shown).

    With `fork_ranks`, torchrun runs under trainers/warm_start.py, which imports what every rank
    imports once and forks each rank from that process."""
    cmd = [python or sys.executable, *(["-u", "-m", WARM_START] if fork_ranks else []), "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone"]
    else:
        # static rendezvous: node N's ranks are N*nproc.. (a c10d rendezvous numbers nodes in
        # join order, so global rank 0 - the console - landed on node 1 half the time; no
        # elasticity is lost: attempts restart through Slurm, never inside torchrun)
        cmd += [
            f"--nnodes={nnodes}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--node-rank={node_rank}",
            f"--rdzv-id={run_id or 'hpctrain'}",
        ]
    cmd += [f"--nproc-per-node={nproc_per_node}", "--max-restarts=0"]
    if log_dir is not None:
        cmd += [f"--log-dir={log_dir}", f"--redirects={rank_redirects(nproc_per_node, node_rank)}"]
    cmd += ["-m", module, "--run-dir", str(run_dir)]
    if stop_file is not None:
        cmd += ["--stop-file", stop_file]
    if deadline is not None:
        cmd += ["--deadline", f"{deadline:.0f}"]
    if log_dir is not None:
        cmd += ["--echo-to-log"]
    return cmd


def rank_redirects(nproc_per_node: int, node_rank: int) -> str:
    """torchrun's per-rank `--redirects` map: a console a person can read.

    Global rank 0 (local rank 0 of node 0) keeps its stdout on the console, without
    torchrun's `[default0]:` prefix, and echoes it into its stderr log (the trainer's
    `--echo-to-log`); everything else of every rank (the other ranks' output, library
    warnings and load reports on stderr) goes to the rank's files only.
    """
    if node_rank != 0:
        return "3"
    return ",".join(["0:2", *(f"{i}:3" for i in range(1, nproc_per_node))])


def show_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _child_setup() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # inherited through exec by torchrun
    try:
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


class Torchrun:
    """A started torchrun, and the thread copying its stderr when that is kept."""

    def __init__(self, proc: subprocess.Popen, copier: threading.Thread | None = None) -> None:
        self.proc, self._copier = proc, copier

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def stderr_copied(self) -> None:
        """Wait (briefly) until the last of torchrun's stderr is copied, once it has exited."""
        if self._copier is not None:
            self._copier.join(timeout=10)


def start_torchrun(cmd: list[str], env: dict | None = None, stderr_tail: list[str] | None = None) -> Torchrun:
    """torchrun in its own session, SIGUSR2 ignored, dying with this process.

    With `stderr_tail`, torchrun's stderr (its own messages: the ranks' go to their logs) is
    copied to ours line by line and its last lines kept, for `failure_reason`.
    """
    if stderr_tail is None:
        return Torchrun(subprocess.Popen(cmd, env=env, preexec_fn=_child_setup, start_new_session=True))
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_child_setup, start_new_session=True,
                            stderr=subprocess.PIPE, text=True, errors="replace")

    def copy() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            stderr_tail.append(line.rstrip("\n"))
            del stderr_tail[:-200]

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()
    return Torchrun(proc, copier)


_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


def failure_reason(rc: int, stderr_tail: list[str], node: int | None = None) -> str:
    """One line for status.json: which rank failed first and how, from torchrun's summary
    ("Root Cause (first observed failure)": rank, exitcode; negative = killed by a signal).

    A rank killed from outside (SIGKILL, SIGTERM...) listed among the other failures wins over
    a root cause that aborted itself (SIGABRT) or exited with an error: a rank whose peer
    vanished fails in its next collective (gloo: "Connection reset by peer") or dies of abort at
    exit ("terminate called without an active exception"), and torchrun can see both in the
    same poll. As `slurm.root_cause` across nodes.
    """
    where = f" on node {node}" if node is not None else ""
    start = next((i for i, x in enumerate(stderr_tail) if "Failures:" in x or "Root Cause" in x), 0)
    ranks = [int(m.group(1)) for x in stderr_tail[start:] if (m := _ROOT_RANK.match(x))]
    codes = [int(m.group(1)) for x in stderr_tail[start:] if (m := _ROOT_EXIT.match(x))]
    failures = list(zip(ranks, codes, strict=False))
    root_at = next((i for i, x in enumerate(stderr_tail) if "Root Cause" in x), None)
    root = None
    if root_at is not None:
        r = next((int(m.group(1)) for x in stderr_tail[root_at:] if (m := _ROOT_RANK.match(x))), None)
        c = next((int(m.group(1)) for x in stderr_tail[root_at:] if (m := _ROOT_EXIT.match(x))), None)
        root = (r, c) if r is not None and c is not None else None
    root = root or (failures[0] if failures else None)
    if root is None:
        return f"torchrun exited with code {rc}{where}"
    if root[1] == -signal.SIGABRT or root[1] > 0:
        root = next(((r, c) for r, c in failures if c < 0 and c != -signal.SIGABRT), root)
    rank, code = root
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return f"rank {rank} {how}{where}"


def run_torchrun(cmd: list[str], run_dir: str | Path, env: dict | None = None, log=print,
                 stderr_tail: list[str] | None = None) -> int:
    """Run torchrun to completion, turning signals into a stop request; returns its exit code."""
    stop, aborted = RunDir(run_dir).stop_file, RunDir(run_dir).aborted_file
    stop.unlink(missing_ok=True)  # a stop request belongs to one launch only
    aborted.unlink(missing_ok=True)
    requests = {"n": 0}
    proc: Torchrun | None = None

    def on_signal(signum, frame):  # noqa: ARG001
        requests["n"] += 1
        name = signal.Signals(signum).name
        if requests["n"] == 1:
            stop.parent.mkdir(parents=True, exist_ok=True)
            stop.write_text(name + "\n")
            log(f"hpctrain: {name}: asking the trainers to checkpoint and stop (again to abort)")
        elif signum == signal.SIGINT and proc is not None:
            log("hpctrain: aborting; the last complete checkpoint is kept")
            aborted.write_text(name + "\n")
            os.killpg(proc.pid, signal.SIGKILL)

    old = {s: signal.signal(s, on_signal) for s in FORWARDED}
    try:
        proc = start_torchrun(cmd, env, stderr_tail)
        while True:
            try:
                rc = proc.proc.wait()
                proc.stderr_copied()
                return rc
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.proc.wait()
