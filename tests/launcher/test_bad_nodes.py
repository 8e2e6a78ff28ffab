"""Which node a failed attempt blames, and the run's list of nodes left out: capped, shown by
`status`, cleared by `submit --forget-bad-nodes` (the Slurm test of a killed rank shows the
requeue leaving the node out: tests/slurm/test_submit.py)."""

from __future__ import annotations

from hpctrain.launcher import bad_nodes
from hpctrain.launcher.status import status_text


def test_a_killed_or_absent_rank_blames_its_node_and_a_consequence_blames_none():
    blame = bad_nodes.blamed_nodes
    assert blame("rank 3 killed by SIGKILL on node 1", procs_per_node=2, nnodes=2) == [1]
    assert blame("rank 3 killed by SIGABRT on node 1", 2, 2) == []  # its peer vanished: not the cause
    assert blame("rank 1 exited with code 1 on node 0", 2, 2) == []  # an error of the program, not the node
    hang = "no step completed for 60s after step 12: ranks that did not arrive: [{}] (...); waiting in a collective: [0]"
    assert blame(hang.format("2, 3"), 2, 2) == [1]
    assert blame(hang.format("1, 2"), 2, 3) == [0, 1]
    assert blame(hang.format("0, 1, 2, 3"), 2, 2) == []  # every node stalled: no node to blame


def test_the_list_is_capped_shown_and_forgotten(tmp_path):
    run = tmp_path / "run"
    (run / "spec.yaml").parent.mkdir()
    (run / "spec.yaml").write_text("name: x\n")
    added, capped = bad_nodes.exclude(run, ["n2"], "rank 1 killed by SIGKILL on node 1", "7", cap=2)
    assert (added, capped) == (["n2"], [])
    assert bad_nodes.exclude(run, ["n2", "n3", "n1"], "rank 0 killed by SIGKILL on node 0", "8", cap=2) == (["n3"], ["n1"])
    assert [e.host for e in bad_nodes.excluded(run)] == ["n2", "n3"]
    text = status_text(str(run))
    assert "excluded nodes" in text and "n2: job 7, rank 1 killed by SIGKILL on node 1" in text
    assert bad_nodes.forget(run) == ["n2", "n3"] and bad_nodes.excluded(run) == []
    assert "excluded nodes" not in status_text(str(run))
