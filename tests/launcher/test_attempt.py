"""The attempt policy both launchers apply: what an attempt ended as (pure, no processes)."""

from __future__ import annotations

import pytest

from hpctrain.launcher.attempt import Outcome, attempt_outcome, retry_verdict
from hpctrain.launcher.contract.states import Status

USER = {"state": "failed", "reason": "data.corpora: all blend weights are zero", "user_error": True}


@pytest.mark.parametrize(
    ("rc", "status", "aborted", "outcome"),
    [
        (0, {"state": "finished", "step": 9}, False, Outcome.FINISHED),
        (0, {"state": "preempted", "step": 4}, False, Outcome.PREEMPTED),
        (1, {"state": "hung", "reason": "no step in 60 s"}, False, Outcome.HUNG),
        (-9, {"state": "running"}, True, Outcome.CANCELLED),
        # a trainer under torchrun records a user error and exits 0: never "torchrun exited with code 0"
        (0, USER, False, Outcome.USER_ERROR),
        (1, USER, False, Outcome.USER_ERROR),  # another rank crashed on its way out
        (2, {}, False, Outcome.USER_ERROR),  # a trainer run without torchrun
        (0, {"state": "failed", "reason": "disk full: ...", "disk_full": True}, False, Outcome.DISK_FULL),
        (1, {"state": "running"}, False, Outcome.FAILED),
        (0, {"state": "running"}, False, Outcome.FAILED),  # exited without saying how
        (-9, {"state": "failed", "reason": "rank 1 killed by SIGKILL"}, False, Outcome.FAILED),
    ],
)
def test_what_an_attempt_ended_as(rc, status, aborted, outcome):
    assert attempt_outcome(rc, Status.from_dict(status), aborted) is outcome


def test_retries_stop_at_the_budget_and_at_a_step_that_fails_twice():
    assert retry_verdict([], 5, 2).retry
    assert retry_verdict([3], 5, 2).retry
    again = retry_verdict([5], 5, 2)
    assert not again.retry and again.repeated_step and "twice in a row" in again.why
    spent = retry_verdict([3, 5], 8, 2)
    assert not spent.retry and "2 retries used up" in spent.why
    assert retry_verdict([], 0, 0) == retry_verdict([], 0, 0).__class__(False)


def test_the_job_reports_the_rank_killed_from_outside(tmp_path):
    from hpctrain.launcher.slurm import root_cause

    (tmp_path / "node0").write_text("rank 0 killed by SIGABRT on node 0\n")  # aborted: its peer vanished
    (tmp_path / "node1").write_text("rank 1 killed by SIGKILL on node 1\n")
    assert root_cause(tmp_path, 2, "rank 0 killed by SIGABRT on node 0", wait_s=0) == "rank 1 killed by SIGKILL on node 1"
    (tmp_path / "node1").write_text("rank 1 exited with code 1 on node 1\n")
    assert root_cause(tmp_path, 2, "x", wait_s=0) == "rank 0 killed by SIGABRT on node 0"
    for f in tmp_path.iterdir():
        f.write_text("rank 0 exited with code 1\n")
    assert root_cause(tmp_path, 2, "mine", wait_s=0) == "mine"


SUMMARY = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
hpctrain.trainers.pretrain FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-01_23:59:01
  host      : vm
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4243)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4243
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_23:59:01
  host      : vm
  rank      : 0 (local_rank: 0)
  exitcode  : -6 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 6 (SIGABRT) received by PID 4242
============================================================""".splitlines()


def test_torchruns_summary_names_the_rank_killed_from_outside():
    from hpctrain.launcher.node import failure_reason

    assert failure_reason(1, SUMMARY) == "rank 1 killed by SIGKILL"  # not the rank that aborted after it
    alone = [x.replace("-9 (pid", "1 (pid") for x in SUMMARY]  # the other rank exited with an error
    assert failure_reason(1, alone) == "rank 0 killed by SIGABRT"
    erred = [x.replace("-6 (pid", "1 (pid") for x in SUMMARY]  # its collective failed: peer gone
    assert failure_reason(1, erred) == "rank 1 killed by SIGKILL"
    root_only = SUMMARY[SUMMARY.index("Root Cause (first observed failure):"):]
    assert failure_reason(1, root_only, node=0) == "rank 0 killed by SIGABRT on node 0"
    assert failure_reason(3, ["no summary"]) == "torchrun exited with code 3"
