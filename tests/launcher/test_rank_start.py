"""cluster.rank_start: the torchrun command and the choice of fork or exec (pure; the ranks
themselves: tests/trainers/test_pretrain.py, and every multi-process test through the default)."""

from __future__ import annotations

import sys

import pytest

from hpctrain.launcher import node
from hpctrain.launcher.contract.errors import UserErrors
from hpctrain.launcher.contract.spec import spec_from_dict
from hpctrain.launcher.node import build_torchrun_command, forks_ranks
from hpctrain.trainers.warm_start import rank_module
from tests.trainers.helpers import clm_spec


def test_forked_ranks_run_torchrun_under_the_warm_start_module():
    execd = build_torchrun_command("/r", 2, python="/py")
    forked = build_torchrun_command("/r", 2, python="/py", fork_ranks=True)
    assert execd[:3] == ["/py", "-m", "torch.distributed.run"]
    assert forked[:6] == ["/py", "-u", "-m", "hpctrain.trainers.warm_start", "-m", "torch.distributed.run"]
    assert forked[6:] == execd[3:]  # torchrun's own arguments are the same


def test_auto_forks_only_on_a_node_without_a_gpu(tmp_path, monkeypatch):
    device = tmp_path / "nvidiactl"
    monkeypatch.setattr(node, "GPU_DEVICE_FILES", (str(device),))
    assert forks_ranks("auto") and forks_ranks("fork") and not forks_ranks("exec")
    device.write_text("")
    assert not forks_ranks("auto") and forks_ranks("fork") and not forks_ranks("exec")


def test_only_this_interpreters_python_modules_are_forked():
    py = sys.executable
    assert rank_module((py, "-u", "-m", "hpctrain.trainers.pretrain", "--run-dir", "/r")) == (
        "hpctrain.trainers.pretrain", ["--run-dir", "/r"])
    assert rank_module((py, "-m", "x")) == ("x", [])
    assert rank_module(("/usr/bin/python3-other", "-u", "-m", "x")) is None  # another interpreter
    assert rank_module((py, "-u", "train.py")) is None  # a script: exec'd as torchrun would
    assert rank_module(("nvidia-smi",)) is None


def test_an_unknown_rank_start_is_refused_naming_the_field(tmp_path, bpe_tokenizer, bpe_corpus):
    spec = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, cluster__rank_start="spawn")
    with pytest.raises(UserErrors) as e:
        spec_from_dict(spec, "spec.yaml")
    assert "spec.yaml: cluster.rank_start" in str(e.value) and "'fork'" in str(e.value)
