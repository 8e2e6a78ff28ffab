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


def test_the_step_wide_usr2_and_sigterm_spare_the_slurm_commands_a_node_task_runs(tmp_path):
    """Without cgroup process tracking, Slurm signals every process of the step: a node task
    asking `scontrol show hostnames` for its rendezvous host at that moment must still get the
    answer (the command dying of it left a node task without one and its peers waiting in the
    rendezvous). The node task itself still sees both signals."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "asked"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\ntouch {asked}\nsleep 1\necho n1 n2\n")
    (bin_dir / "scontrol").chmod(0o755)
    node_task = ("import signal\n"
                 "from hpctrain.launcher.slurm import hostnames\n"
                 "for s in (signal.SIGUSR2, signal.SIGTERM):\n"
                 "    signal.signal(s, lambda n, f: print('node task got', signal.Signals(n).name, flush=True))\n"
                 "print('hosts', hostnames('n[1-2]'), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", node_task], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    end = time.time() + 60
    while not asked.exists() and time.time() < end:
        time.sleep(0.01)
    for s in (signal.SIGUSR2, signal.SIGTERM):  # the whole process group, as Slurm's linuxproc tracking
        os.killpg(proc.pid, s)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert "hosts ['n1', 'n2']" in out
    assert "node task got SIGUSR2" in out and "node task got SIGTERM" in out


def test_a_node_list_that_names_no_host_is_one_clear_error(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'invalid hostlist' >&2\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    code = "from hpctrain.launcher.slurm import first_node\nfirst_node('n[1-')\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == 1
    assert "scontrol show hostnames 'n[1-' named no host (exit code 1: invalid hostlist)" in r.stderr
