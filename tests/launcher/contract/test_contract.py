"""The contract on its own: no torch, the run directory's paths, the states and their
transitions, the checkpoint meta record and the discovery of the newest whole checkpoint."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

from hpctrain.launcher.contract.checkpoints import (
    CheckpointMeta,
    complete_checkpoints,
    newest_whole_checkpoint,
    step_name,
    unfinished_name,
)
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.states import (
    State,
    mark_cancelled,
    mark_failed,
    mark_preempted,
    mark_running,
    read_status,
)


def test_the_contract_and_the_attempt_policy_load_without_torch():
    code = ("import pkgutil, importlib, sys, hpctrain.launcher.contract as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module(f'{c.__name__}.{m.name}')\n"
            "import hpctrain.launcher.attempt, hpctrain.launcher.cli\n"
            "print(sorted(n for n in ('torch', 'transformers', 'hpctrain.trainers', 'hpctrain.tools')"
            " if n in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_every_path_of_a_run_dir_lies_inside_it(tmp_path):
    run = RunDir(tmp_path / "run")
    paths = [run.spec_file, run.checkpoints, run.metrics, run.status, run.wandb_id, run.export, run.best,
             run.stop_file, run.aborted_file, run.lock, run.slurm_stop_file("17", 2), run.failure_reports("17", 2),
             run.hang_report(1), run.node_logs("17", 2, 1), run.local_logs, run.jobs_file]
    assert all(p.is_relative_to(run.root) for p in paths)
    assert len(set(paths)) == len(paths)
    assert not run.root.exists()  # asking creates nothing


def test_states_are_recorded_as_their_names_and_follow_their_transitions(tmp_path):
    assert read_status(tmp_path).state is None
    assert mark_running(tmp_path, 0, 10, pid=1) == 0
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "running"
    assert read_status(tmp_path).state is State.RUNNING and read_status(tmp_path).state == State.RUNNING
    mark_preempted(tmp_path, 4, 10, "SIGUSR2")
    assert read_status(tmp_path).state is State.PREEMPTED
    assert mark_running(tmp_path, 4, 10, pid=2) == 1  # a restart counts
    mark_cancelled(tmp_path, "the user ended it")
    mark_preempted(tmp_path, 6, 10, "SIGTERM")  # the ranks saved on the way out: still cancelled
    assert read_status(tmp_path).state is State.CANCELLED and read_status(tmp_path).step == 6
    mark_failed(tmp_path, "bad file", user_error=True)
    st = read_status(tmp_path)
    assert st.state == State.FAILED and st.user_error and st.attempts == 2


def test_meta_keeps_every_field_at_the_top_level_and_reads_back(tmp_path):
    meta = CheckpointMeta(step=7, world_size=2, sampler={"position": 56}, tokens_seen=3584, spec_name="t",
                          task={"best": 0.5, "stale": 1})
    data = json.loads(meta.to_json())
    assert data["step"] == 7 and data["best"] == 0.5 and data["sampler"] == {"position": 56}
    assert CheckpointMeta.from_dict(data) == meta
    old = {"step": 3, "world_size": 1, "sampler": {}, "tokens_seen": 0, "best": None}  # written before the type
    assert CheckpointMeta.from_dict(old).task == {"best": None}


def _checkpoint(run, step, payload=pickle.dumps({"w": 1}).ljust(100, b"x")):  # a pickle and its bytes
    from hpctrain.launcher.contract.checkpoints import file_records

    d = RunDir(run).checkpoints / step_name(step)
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(payload)
    (d / "meta.json").write_text(CheckpointMeta(step=step, world_size=1, sampler={}, files=file_records(d)).to_json())
    return d


def test_the_newest_whole_checkpoint_skips_damaged_and_unfinished_ones(tmp_path):
    _checkpoint(tmp_path, 10)
    newer = _checkpoint(tmp_path, 20)
    (RunDir(tmp_path).checkpoints / unfinished_name(30)).mkdir()  # a save that never finished
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10, 20]
    (newer / "model.pt").write_bytes(b"y" * 100)  # same size, other bytes
    path, skipped = newest_whole_checkpoint(tmp_path)
    assert path.name == step_name(10)
    assert skipped == [(newer, "model.pt differs from what was saved (checksum)")]
