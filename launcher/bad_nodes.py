"""Bad nodes left out: a node an attempt died or hung on is not given to the run again.

On a large cluster some nodes fail again and again (a flaky GPU, a bad link, a full local
disk: a "black hole" node that takes each job that lands on it down). When an attempt of a
Slurm job ends because a rank on a node was killed, or because the watchdog found ranks that
never reached the step (trainers/watchdog.py names them), that node's host name joins the
run's list in `RUN_DIR/slurm/excluded_nodes.json`:

- the retry's requeue leaves it out (the job requeued held, its ExcNodeList set, released),
  and every later `submit` of the run dir passes `--exclude`;
- at most `cluster.max_excluded_nodes` (default 2) are left out: when more nodes fail, the
  fault is rarely the nodes, and a job that excludes half the partition never starts;
- `hpctrain status` shows the list and `hpctrain submit --forget-bad-nodes` clears it.

A rank that aborted itself (SIGABRT: its peer vanished) is a consequence, not a cause, and a
hang in which every node's ranks stalled names no node.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpctrain.launcher.contract.rundir import RunDir, atomic_write_text
from hpctrain.launcher.slurm_cmd import failure, slurm_command

_KILLED_ON = re.compile(r"rank \d+ killed by (SIG\w+|signal \d+) on node (\d+)")
_ABSENT = re.compile(r"ranks that did not arrive: \[([\d, ]+)\]")


@dataclass(frozen=True)
class ExcludedNode:
    host: str
    reason: str  # the attempt's failure as status.json recorded it
    job: str
    at: float  # epoch seconds


def blamed_nodes(reason: str, procs_per_node: int, nnodes: int) -> list[int]:
    """Indexes of the job's nodes a failure's reason (status.json's) blames: the node of a rank
    killed from outside, or the nodes of the ranks a hang found absent unless that is all."""
    m = _KILLED_ON.search(reason)
    if m:
        return [] if m.group(1) == "SIGABRT" else [int(m.group(2))]
    m = _ABSENT.search(reason)
    if m:
        nodes = sorted({int(r) // procs_per_node for r in m.group(1).split(",")})
        return [] if len(nodes) >= nnodes else nodes
    return []


def excluded(run_dir: str | Path) -> list[ExcludedNode]:
    f = RunDir(run_dir).excluded_nodes
    try:
        return [ExcludedNode(**e) for e in json.loads(f.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def exclude(run_dir: str | Path, hosts: list[str], reason: str, job: str, cap: int) -> tuple[list[str], list[str]]:
    """Add `hosts` to the run's list, up to `cap` in all: (added, left in because of the cap)."""
    have = excluded(run_dir)
    added, capped = [], []
    for h in hosts:
        if any(e.host == h for e in have):
            continue
        if len(have) >= cap:
            capped.append(h)
            continue
        have.append(ExcludedNode(h, reason, job, time.time()))
        added.append(h)
    if added:
        f = RunDir(run_dir).excluded_nodes
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(f, json.dumps([asdict(e) for e in have], indent=1) + "\n")
    return added, capped


def forget(run_dir: str | Path) -> list[str]:
    """Clear the run's list (`submit --forget-bad-nodes`); the hosts it held."""
    hosts = [e.host for e in excluded(run_dir)]
    RunDir(run_dir).excluded_nodes.unlink(missing_ok=True)
    return hosts


def requeue_leaving_out(job_id: str, run_dir: str | Path) -> None:
    """Requeue the job (from inside it) with the run's list as its excluded nodes.

    Slurm changes a job's ExcNodeList only while it is not running, so the job is requeued held,
    updated, and released. The requeue's own kill of the job's steps (SIGTERM, then SIGKILL after
    KillWait) reaches every process of the step where Slurm tracks processes by ancestry
    (proctrack/linuxproc), so the `scontrol` calls run with SIGTERM ignored: a TERM that lands
    while the update runs would otherwise kill it, and the release would send the job back to
    the bad node. The release comes even if the update fails: a held job would wait forever."""
    hosts = [e.host for e in excluded(run_dir)]
    if not hosts:
        _scontrol("requeue", job_id)
        return
    _scontrol("requeuehold", job_id)
    try:
        if error := _scontrol("update", f"jobid={job_id}", f"ExcNodeList={','.join(hosts)}", check=False):
            print(f"hpctrain: could not leave out {', '.join(hosts)}: {error}", flush=True)
    finally:
        _scontrol("release", job_id)


def _scontrol(*args: str, check: bool = True) -> str:
    """Run `scontrol args` (SIGTERM and SIGUSR2 ignored): '' if it succeeded, else its error
    (raised if `check`)."""
    error = failure(slurm_command(["scontrol", *args], timeout=120))
    if error and check:
        raise RuntimeError(error)
    return error


def status_lines(run_dir: str | Path) -> list[str]:
    out = [f"  {e.host}: job {e.job}, {e.reason}" for e in excluded(run_dir)]
    return ["excluded nodes (hpctrain submit --forget-bad-nodes clears them):", *out] if out else []
