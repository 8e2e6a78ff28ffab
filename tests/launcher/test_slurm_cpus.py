"""CPUs of the Slurm node task (torchrun and its ranks): pure parameters, validate's line, the
job script, and each rank's slice."""

from __future__ import annotations

import pytest

from hpctrain.launcher.contract.spec import spec_from_dict
from hpctrain.launcher.cpus import cpu_notes, node_task_cpus
from hpctrain.launcher.slurm import executor_parameters
from hpctrain.trainers.distributed import rank_cpu_slice
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, write_spec


def _spec(tmp_path, workers=0, **cluster) -> dict:
    s = clm_spec(tmp_path / "run", "tok", "corpus")
    s["data"]["num_workers"] = workers
    s["training"].update(global_batch=64, micro_batch=2)
    s["cluster"] = {"executor": "slurm", "nodes": 4, "procs_per_node": 8, "gpus_per_node": 8, **cluster}
    return s


def _typed(tmp_path, **kw):
    return spec_from_dict(_spec(tmp_path, **kw), "s.yaml")


def test_whole_nodes_give_the_node_task_every_cpu(tmp_path):
    spec = _typed(tmp_path, exclusive=True)
    p = executor_parameters(spec)
    assert node_task_cpus(spec) is None and "cpus_per_task" not in p and p["exclusive"] is True
    assert 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_ON_NODE"' in p["setup"]
    assert cpu_notes(spec) == ["CPUs per node task: the whole node (exclusive: true), split evenly among its 8 rank(s)"]


def test_a_shared_node_gives_each_rank_its_share(tmp_path):
    spec = _typed(tmp_path, workers=2)
    p = executor_parameters(spec)
    assert p["cpus_per_task"] == 24 and "export SRUN_CPUS_PER_TASK=24" in p["setup"]  # 8 x (1 + 2)
    assert _typed(tmp_path, cpus_per_rank=6).cluster.cpus_per_rank == 6
    assert executor_parameters(_typed(tmp_path, cpus_per_rank=6))["cpus_per_task"] == 48
    assert executor_parameters(_typed(tmp_path, exclusive=True, cpus_per_task=64))["cpus_per_task"] == 64


def test_too_few_cpus_for_the_ranks_and_their_workers_is_a_warning(tmp_path):
    notes = cpu_notes(_typed(tmp_path, workers=3, cpus_per_task=16))
    assert notes[0].startswith("CPUs per node task: 16")
    assert "8 rank(s) x (1 + data.num_workers) need 32 CPUs, the node task gets 16" in notes[1]


def test_dry_run_and_validate_show_the_cpus(tmp_path, bpe_tokenizer, bpe_corpus):
    raw = _spec(tmp_path, exclusive=True)
    raw["model"]["tokenizer"] = bpe_tokenizer
    raw["data"]["corpora"] = [{"path": bpe_corpus}]
    raw["data"]["validation"] = {"path": bpe_corpus}
    path = write_spec(tmp_path / "s.yaml", raw)
    dry = run_cli("submit", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --exclusive" in dry.stdout and "#SBATCH --ntasks-per-node=1" in dry.stdout
    assert 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_ON_NODE"' in dry.stdout
    v = run_cli("validate", str(path), "--no-slurm")
    assert v.returncode == 0 and "CPUs per node task: the whole node (exclusive: true)" in v.stdout, v.stdout + v.stderr


@pytest.mark.parametrize(
    ("cpus", "world", "slices"),
    [
        (list(range(8)), 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (list(range(7)), 3, [[0, 1, 2], [3, 4], [5, 6]]),
        ([4, 5], 2, [[4], [5]]),
        ([3], 2, [[3], [3]]),  # more ranks than CPUs: they share
    ],
)
def test_each_rank_takes_its_own_slice(cpus, world, slices):
    assert [rank_cpu_slice(cpus, r, world) for r in range(world)] == slices
