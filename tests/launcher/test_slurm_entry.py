"""A node task's first moments: a USR2 while Python is still starting does not kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpctrain.launcher.slurm import node_task_python

REPO = Path(__file__).resolve().parents[2]


REPORT = "from hpctrain.launcher import slurm_entry\nprint('early signals:', len(slurm_entry.EARLY_SIGNALS), flush=True)\n"


def _start(tmp_path: Path, python_cmd: str, payload: str = REPORT, slow_start: bool = True) -> subprocess.Popen:
    """`python_cmd -u -m payload`, as srun starts it; with `slow_start`, Python's start-up is
    held for 2 s (a sitecustomize that sleeps): a wide window before any hpctrain code runs."""
    if slow_start:
        (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(2)\n")
    (tmp_path / "payload.py").write_text(payload)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(f"exec {python_cmd} -u -m payload", shell=True, env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _usr2_once_python_runs(proc: subprocess.Popen) -> None:
    """USR2 once the process is Python (the shell, if any, has exec'd it), during its start-up."""
    end = time.time() + 30
    while time.time() < end:
        cmd = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        if cmd and cmd[0] == sys.executable.encode():
            break
        time.sleep(0.01)
    time.sleep(0.2)  # inside the 2 s of start-up
    os.kill(proc.pid, signal.SIGUSR2)


def test_a_usr2_during_python_start_up_is_dropped_and_the_node_task_lives(tmp_path):
    proc = _start(tmp_path, node_task_python())
    _usr2_once_python_runs(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "early signals: 0" in out  # dropped before slurm_entry ran; not recorded, not fatal


def test_without_the_shell_the_same_signal_kills_python(tmp_path):
    """What the shell is for: started directly, Python dies of that USR2."""
    proc = _start(tmp_path, f"{sys.executable} -u -m hpctrain.launcher.slurm_entry")
    _usr2_once_python_runs(proc)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGUSR2


def test_a_usr2_once_slurm_entry_runs_is_recorded(tmp_path):
    """After start-up the recorder holds the signal for NodeTask to replay."""
    waits = ("import time\nfrom hpctrain.launcher import slurm_entry\n"
             "print('ready', flush=True)\n"
             "end = time.time() + 20\n"
             "while not slurm_entry.EARLY_SIGNALS and time.time() < end:\n"
             "    time.sleep(0.01)\n"
             "print('early signals:', len(slurm_entry.EARLY_SIGNALS), flush=True)\n")
    proc = _start(tmp_path, node_task_python(), waits, slow_start=False)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert "early signals: 1" in out
