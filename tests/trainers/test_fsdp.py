"""FSDP2 (`engine.type: fsdp`) on CPU with gloo and 2 real torchrun ranks: DDP's losses, bitwise
resume, resume on another number of ranks (DCP reshards), kill -9 inside a save, the export."""

from __future__ import annotations

import math
import os
import shutil
import signal

import pytest
import torch
import yaml

from tests.conftest import run_cli
from tests.trainers.helpers import (
    clm_spec,
    last_val_loss,
    losses,
    rank_of,
    start_run,
    stop_with_ctrl_c,
    trainer_pids,
    two_rank_validation_loss,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.multiproc
STEPS = 12
FSDP = {"type": "fsdp"}
EXPORT_SHARD_MIB = 1 / 16


PRETRAINED: dict = {}  # the HF folder every run of this module starts from (made once)


def _spec(run, tok, corpus, engine: dict, procs: int = 2) -> dict:
    s = clm_spec(run, tok, corpus, training__steps=STEPS, training__eval_every=STEPS,
                 checkpoint__every_steps=4)
    s["model"] = {"path": PRETRAINED["path"], "tokenizer": tok}
    s["engine"] = engine
    s["cluster"]["procs_per_node"] = procs
    return s


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe_tokenizer, bpe_corpus):
    """A small Llama saved as an HF folder, and one uninterrupted 2-rank run from it each under
    DDP and fsdp (which reads each rank's slices of the safetensors file into its shards)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.trainers.helpers import TINY_LLAMA

    folder = tmp_path_factory.mktemp("pretrained") / "tiny-llama"
    torch.manual_seed(3)
    cfg = dict(TINY_LLAMA)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(folder)
    PRETRAINED["path"] = str(folder)
    out = {}
    for name, engine in (("ddp", {}), ("fsdp", FSDP)):
        d = tmp_path_factory.mktemp(name)
        spec = _spec(d / "run", bpe_tokenizer, bpe_corpus, engine)
        if name == "fsdp":  # the export in files of at most 64 KiB: the ~240 KiB model takes several
            spec["export"] = {"max_shard_mib": EXPORT_SHARD_MIB}
        r = run_cli("run", str(write_spec(d / "s.yaml", spec)), timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = (d / "run", r)
    return out


def _close(got: dict[int, float], ref: dict[int, float], steps) -> None:
    # only the gradient reduction differs (reduce-scatter of shards against DDP's all-reduce): a
    # float reassociation that Adam carries forward; the bound DDP's own 2 -> 1 rank resume holds
    for s in steps:
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])


def test_fsdp_trains_with_ddps_losses(runs):
    run, r = runs["fsdp"]
    got, ref = losses(run), losses(runs["ddp"][0])
    assert sorted(got) == list(range(1, STEPS + 1))
    _close(got, ref, got)
    assert "Traceback" not in r.stderr
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "dcp" / ".metadata").is_file()


def test_fsdp_stop_and_resume_is_bitwise_and_reshards_to_one_rank(tmp_path, runs, bpe_tokenizer, bpe_corpus):
    ref = losses(runs["fsdp"][0])
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus, FSDP))
    stopped = stop_with_ctrl_c(spec, run, 5, timeout=600)
    assert 5 <= stopped < STEPS and trainer_pids(run) == []
    shutil.copytree(run, tmp_path / "one")  # the same stopped run, resumed on one rank below
    r = run_cli("run", str(spec), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped:08d}'}" in r.stdout
    got = losses(run)
    assert [got[s] for s in range(stopped + 1, STEPS + 1)] == [ref[s] for s in range(stopped + 1, STEPS + 1)]
    # saved by 2 ranks, resumed by 1: no conversion, no user action
    one = yaml.safe_load(spec.read_text())
    one["run_dir"], one["cluster"]["procs_per_node"] = str(tmp_path / "one"), 1
    r = run_cli("run", str(write_spec(tmp_path / "one.yaml", one)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "saved by 2 rank(s), now 1" in r.stdout
    _close(losses(tmp_path / "one"), ref, range(stopped + 1, STEPS + 1))


def test_fsdp_saved_by_one_rank_resumes_on_two(tmp_path, runs, bpe_tokenizer, bpe_corpus):
    ref = losses(runs["fsdp"][0])
    run = tmp_path / "run"
    one = write_spec(tmp_path / "one.yaml", _spec(run, bpe_tokenizer, bpe_corpus, FSDP, procs=1))
    stopped = stop_with_ctrl_c(one, run, 5, timeout=600)
    assert 5 <= stopped < STEPS
    _close(losses(run), ref, range(1, stopped + 1))
    two = write_spec(tmp_path / "two.yaml", _spec(run, bpe_tokenizer, bpe_corpus, FSDP, procs=2))
    r = run_cli("run", str(two), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "saved by 1 rank(s), now 2" in r.stdout
    _close(losses(run), ref, range(stopped + 1, STEPS + 1))


def test_kill_9_during_an_fsdp_save_keeps_the_previous_checkpoint(tmp_path, runs, bpe_tokenizer, bpe_corpus):
    """Every rank has written its DCP shards into the temporary folder; rank 0 dies before the
    commit. The half-written step is invisible, the previous one resumes, bitwise."""
    from hpctrain.launcher.contract.checkpoints import complete_checkpoints

    ref = losses(runs["fsdp"][0])
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus, FSDP))
    proc = start_run(spec, env={"HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S": "8:30"})
    tmp = run / "checkpoints" / ".step_00000008.tmp"
    wait_for(lambda: (tmp / "dcp" / ".metadata").is_file(), timeout=600, what="the step-8 save")
    victim = next(p for p in trainer_pids(run) if rank_of(p) == 0)
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    wait_for(lambda: trainer_pids(run) == [], timeout=30, what="all ranks gone")
    assert [s for s, _ in complete_checkpoints(run)] == [4]
    r = run_cli("run", str(spec), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout and "step_00000004" in r.stdout
    got = losses(run)
    assert [got[s] for s in range(5, STEPS + 1)] == [ref[s] for s in range(5, STEPS + 1)]


def test_fsdp_export_loads_in_plain_transformers_with_the_trainers_validation_loss(runs, bpe_corpus):
    """Gathered a file's worth at a time and written as HF's sharded safetensors with their index:
    plain transformers loads it and gives the trainer's own last validation loss."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run, _ = runs["fsdp"]
    index = json.loads((run / "export" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for f in files:  # every file within the bound, or a single tensor larger than it
        with safe_open(run / "export" / f, "pt") as st:
            sizes = [st.get_slice(k).get_shape() for k in st.keys()]
        nbytes = sum(4 * math.prod(shape) for shape in sizes)
        assert nbytes <= EXPORT_SHARD_MIB * 2**20 or len(sizes) == 1, (f, nbytes)
    assert not (run / "export" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    assert set(index["weight_map"]) == set(model.state_dict())  # every weight, nothing more
    assert abs(two_rank_validation_loss(model, bpe_corpus) - last_val_loss(run)) < 1e-5


@pytest.mark.parametrize("change", ["activation_checkpointing", "offload_params"])
def test_fsdp_with_activation_checkpointing_or_offload_keeps_the_losses(tmp_path, runs, bpe_tokenizer,
                                                                        bpe_corpus, change):
    """Recomputed blocks (FSDP's hooks outside the recompute) and parameters offloaded to host
    memory (where a CPU run keeps them anyway) train the same steps, bitwise."""
    spec = _spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, FSDP)
    if change == "activation_checkpointing":
        spec["training"]["activation_checkpointing"] = "full"
    else:
        spec["engine"] = {**FSDP, "offload_params": "cpu"}
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert losses(tmp_path / "run") == losses(runs["fsdp"][0])


def test_fsdp_from_model_config_initializes_each_shard_and_trains(tmp_path, runs, bpe_tokenizer, bpe_corpus):
    spec = _spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, FSDP)
    spec["model"] = clm_spec(tmp_path, bpe_tokenizer, bpe_corpus)["model"]  # from scratch
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    first = got[1]
    assert abs(first - math.log(600)) < 0.5  # a fresh init: about log(vocab) at the start
    assert got[STEPS] < first - 0.15  # and it learns (DDP from a fresh init: 6.39 -> 6.13 in these 12 steps)


def test_qlora_under_fsdp_is_refused_before_anything_runs(tmp_path, minilm_path):
    from tests.trainers.helpers import cls_spec

    spec = cls_spec(tmp_path / "run", minilm_path)
    spec["finetune"]["method"] = "qlora"
    spec["engine"] = FSDP
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", spec)))
    assert r.returncode == 2 and "qlora with engine.type: fsdp is not supported" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_lora_fine_tuning_under_fsdp_gives_ddps_losses(tmp_path, tiny_bert):
    """LoRA classification of a BERT (its base built whole, then sharded; the adapters and the
    new head start as under DDP): the same per-step losses as DDP, and an adapter export. The
    2-layer BERT of width 32 has every part MiniLM has (blocks, embeddings, pooler, head)."""
    from tests.trainers.helpers import cls_spec

    got = {}
    for name, engine in (("ddp", {}), ("fsdp", FSDP)):
        spec = cls_spec(tmp_path / name, tiny_bert, merge=False)
        spec["training"].update(steps=10, eval_every=10)
        spec["engine"] = engine
        r = run_cli("run", str(write_spec(tmp_path / f"{name}.yaml", spec)), timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        got[name] = losses(tmp_path / name)
    assert sorted(got["fsdp"]) == list(range(1, 11))
    _close(got["fsdp"], got["ddp"], got["ddp"])
    assert (tmp_path / "fsdp" / "export" / "adapter_config.json").is_file()


def test_mlm_under_fsdp_trains_on_masked_positions(tmp_path, tiny_bert, minilm_corpus):
    """Continued MLM of a saved BERT encoder under fsdp: the head on masked positions (a forward
    pre-hook on the sharded output layer) and the fresh MLM head the folder lacks (as MiniLM's
    does), initialized on its shards. The 2-layer BERT of width 32 has MiniLM's parts and
    tokenizer; lr 3e-3 since its random weights start from a loss near ln(vocab)."""
    spec = {"name": "mlm-fsdp", "run_dir": str(tmp_path / "run"), "model": {"path": tiny_bert},
            "objective": {"type": "mlm"},
            "data": {"corpora": [{"path": minilm_corpus}], "seq_len": 64, "validation": {"path": minilm_corpus}},
            "training": {"global_batch": 16, "micro_batch": 8, "steps": 8, "lr": 3e-3, "eval_every": 8},
            "engine": FSDP, "cluster": {"procs_per_node": 2}}
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "initialized fresh" in r.stdout and "cls.predictions" in r.stdout  # the MLM head MiniLM lacks
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 9)) and got[8] < got[1] - 0.3
    assert "validation: loss" in r.stdout


def test_fsdp_bf16_computes_in_bf16_over_fp32_master_weights_and_resumes_bitwise(tmp_path, runs, bpe_tokenizer,
                                                                                  bpe_corpus):
    """`training.precision: bf16` under fsdp is FSDP2's MixedPrecisionPolicy, not autocast: the
    forward and backward run on bf16 copies of the parameters, the optimizer steps fp32 shards
    (the export is fp32), the losses follow DDP's bf16 autocast closely (not bitwise: the
    weights themselves are rounded to bf16 for the matmuls, where autocast rounds per op), and a
    stopped run resumes bitwise, also on one rank (the master-path lever at world size 1)."""
    from safetensors.torch import load_file

    def spec(name, engine, procs=2):
        s = _spec(tmp_path / name, bpe_tokenizer, bpe_corpus, engine, procs)
        s["training"]["precision"] = "bf16"
        return write_spec(tmp_path / f"{name}.yaml", s)

    for name, engine in (("ddp", {}), ("fsdp", FSDP)):
        r = run_cli("run", str(spec(name, engine)), timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == list(range(1, STEPS + 1))
    assert all(abs(fsdp[s] - ddp[s]) <= 0.02 * abs(ddp[s]) for s in ddp), (fsdp, ddp)
    assert fsdp != ddp  # a path of its own, not autocast
    assert {t.dtype for t in load_file(tmp_path / "fsdp" / "export" / "model.safetensors").values()} == {torch.float32}

    cut = spec("cut", FSDP)
    stopped = stop_with_ctrl_c(cut, tmp_path / "cut", 5, timeout=600)
    r = run_cli("run", str(cut), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    got = losses(tmp_path / "cut")
    assert [got[s] for s in range(stopped + 1, STEPS + 1)] == [fsdp[s] for s in range(stopped + 1, STEPS + 1)]

    one = spec("one", FSDP, procs=1)  # world size 1: bf16 compute, fp32 master weights
    r = run_cli("run", str(one), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    single = losses(tmp_path / "one")
    assert all(abs(single[s] - ddp[s]) <= 0.02 * abs(ddp[s]) for s in ddp)
