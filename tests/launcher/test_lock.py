"""The run dir lock: one live holder, refused at once, a dead holder's lock taken over."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hpctrain.launcher import lock
from hpctrain.launcher.contract.errors import UserError


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    # a live holder: a process whose command line names hpctrain, as `hpctrain run` does
    live = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)",
                             "hpctrain", "run"], stdout=subprocess.PIPE, text=True)
    try:
        # Popen returns while the kernel may still be setting up the new program: until it prints, its
        # /proc/PID/cmdline can read empty (seen once in CI), which is not what a running holder shows
        assert live.stdout.readline() == "up\n"
        first = {**lock.process_owner("hpctrain run"), "pid": live.pid}
        lock.acquire(tmp_path, first)
        lock.acquire(tmp_path, first)  # the same holder again (a requeued job, a retry) is fine
        me = lock.process_owner("hpctrain run")
        with pytest.raises(UserError, match=rf"another run holds this run dir: hpctrain run \(pid {live.pid} on"):
            lock.acquire(tmp_path, me)
        lock.release(tmp_path, me)  # not its lock: left alone
        assert lock.read_holder(tmp_path)["pid"] == live.pid
        lock.release(tmp_path, first)
        assert lock.read_holder(tmp_path) is None
    finally:
        live.kill()
        live.wait()


def test_a_recycled_pid_is_not_a_holder(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not hpctrain
    try:
        lock.acquire(tmp_path, {**lock.process_owner("hpctrain run"), "pid": other.pid})
        notes = []
        lock.acquire(tmp_path, lock.process_owner("hpctrain run"), log=notes.append)
        assert len(notes) == 1 and "its pid is another program's now" in notes[0]
    finally:
        other.kill()
        other.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_note(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = {**lock.process_owner("hpctrain run"), "pid": int(gone.stdout)}
    lock.acquire(tmp_path, dead)
    notes = []
    me = lock.process_owner("hpctrain run")
    lock.acquire(tmp_path, me, log=notes.append)
    assert lock.read_holder(tmp_path)["pid"] == me["pid"]
    assert notes == [f"note: hpctrain run (pid {dead['pid']} on {dead['host']}) held this run dir and is gone "
                     "(no longer running): taking it over"]


def test_a_holder_on_another_host_counts_as_alive(tmp_path):
    lock.acquire(tmp_path, {**lock.process_owner("hpctrain run"), "host": "login-7"})
    with pytest.raises(UserError) as e:
        lock.acquire(tmp_path, lock.process_owner("hpctrain run"))
    assert "on another host (login-7)" in str(e.value) and "remove" in str(e.value)
