"""DeepSpeed ZeRO on CPU (gloo, 2 real torchrun ranks): same losses as DDP, bitwise resume, export."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
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

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (extra 'deepspeed')")
pytestmark = [pytest.mark.multiproc, pytest.mark.deepspeed]
STEPS = 12


def _spec(run, tok, corpus, engine: dict) -> dict:
    s = clm_spec(run, tok, corpus, training__steps=STEPS, training__eval_every=STEPS,
                 checkpoint__every_steps=4)
    s["engine"] = engine
    return s


@pytest.fixture(scope="module")
def ddp_losses(tmp_path_factory, bpe_tokenizer, bpe_corpus) -> dict[int, float]:
    d = tmp_path_factory.mktemp("ddp")
    r = run_cli("run", str(write_spec(d / "s.yaml", _spec(d / "run", bpe_tokenizer, bpe_corpus, {}))))
    assert r.returncode == 0, r.stdout + r.stderr
    return losses(d / "run")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, bpe_tokenizer, bpe_corpus):
    """One uninterrupted 2-rank run per ZeRO stage."""
    out = {}
    for stage in (1, 2, 3):
        d = tmp_path_factory.mktemp(f"zero{stage}")
        spec = write_spec(d / "s.yaml", _spec(d / "run", bpe_tokenizer, bpe_corpus,
                                              {"type": "deepspeed", "zero_stage": stage}))
        r = run_cli("run", str(spec), timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        out[stage] = (d / "run", r)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_with_ddps_losses(zero_runs, ddp_losses, stage):
    run, r = zero_runs[stage]
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Same model, data and seed: only the gradient reduction differs (DeepSpeed averages
    # fp32 gradients in its own buckets and order), a float reassociation of ~1e-7 per step
    # that Adam carries forward; 1e-4 relative is the bound DDP's own 2 -> 1 rank resume holds.
    for s in got:
        assert abs(got[s] - ddp_losses[s]) <= 1e-4 * abs(ddp_losses[s]), (s, got[s], ddp_losses[s])
    assert "Traceback" not in r.stderr and "[WARNING]" not in r.stdout  # DeepSpeed logs stay in rank logs
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "meta.json").is_file() and (ckpt / "ds").is_dir()


def test_zero_on_cpu_builds_no_kernel_that_training_does_not_call(zero_runs):
    """DeepSpeed compiles (30-60 s, once per environment) and loads a shared-memory all-reduce
    kernel when it starts on a CPU, and says so in each rank's log; only its inference path
    calls it. The trainer's ranks neither build nor load it."""
    for stage, (run, _) in zero_runs.items():
        logs = sorted((run / "logs").rglob("*.log"))
        assert any("step" in p.read_text() for p in logs), (stage, logs)  # the ranks' own logs
        named = [p for p in logs if "shm_comm" in p.read_text()]
        assert not named, (stage, named)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stop_and_resume_is_bitwise(tmp_path, zero_runs, bpe_tokenizer, bpe_corpus, stage):
    ref = losses(zero_runs[stage][0])
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus,
                                                 {"type": "deepspeed", "zero_stage": stage}))
    stopped = stop_with_ctrl_c(spec, run, 5, timeout=600)
    assert 5 <= stopped < STEPS and trainer_pids(run) == []
    if stage == 2:  # the same stopped run, resumed on one rank below
        shutil.copytree(run, tmp_path / "one")
    r = run_cli("run", str(spec), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped:08d}'}" in r.stdout
    got = losses(run)
    assert [got[s] for s in range(stopped + 1, STEPS + 1)] == [ref[s] for s in range(stopped + 1, STEPS + 1)]
    if stage == 2:
        _resume_on_one_rank(tmp_path, ref, stopped)


def _resume_on_one_rank(tmp_path, ref: dict[int, float], stopped: int) -> None:
    """Saved by 2 ranks, resumed by 1: the checkpoint is converted to DeepSpeed's universal
    format once (kept beside it) and training continues with the 2-rank run's losses (1e-4)."""
    one = tmp_path / "one"
    spec = yaml.safe_load((tmp_path / "s.yaml").read_text())
    spec["run_dir"] = str(one)
    spec["cluster"]["procs_per_node"] = 1
    r = run_cli("run", str(write_spec(tmp_path / "one.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "saved by 2 rank(s), now 1: loading its universal conversion" in r.stdout
    assert f"step_{stopped:08d}/ds_universal" in r.stdout  # kept beside the ZeRO checkpoint
    got = losses(one)
    for s in range(stopped + 1, STEPS + 1):
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])


def test_zero3_export_holds_every_weight_and_gives_the_trainers_validation_loss(zero_runs, bpe_corpus):
    """Parameters are partitioned under ZeRO-3; the export gathers them. Compare keys and shapes
    with the architecture and the loss with the trainer's own last validation loss."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    run, _ = zero_runs[3]
    state = load_file(run / "export" / "model.safetensors")
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "export")).state_dict()
    tied = {k for k in fresh if k not in state}  # tied weights are saved once
    assert tied <= {"lm_head.weight"}
    assert all(state[k].shape == fresh[k].shape and state[k].numel() > 0 for k in state)
    model = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    assert abs(two_rank_validation_loss(model, bpe_corpus) - last_val_loss(run)) < 1e-5


def test_kill_9_during_a_zero3_save_keeps_the_previous_checkpoint(tmp_path, zero_runs, bpe_tokenizer, bpe_corpus):
    """Every rank has written its ZeRO shards into the temporary folder; rank 0 dies before the
    commit. The half-written step is invisible, the previous one resumes, bitwise."""
    from hpctrain.launcher.contract.checkpoints import complete_checkpoints

    ref = losses(zero_runs[3][0])
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus, {"type": "deepspeed", "zero_stage": 3}))
    proc = start_run(spec, env={"HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S": "8:30"})
    tmp = run / "checkpoints" / ".step_00000008.tmp"
    wait_for(lambda: (tmp / "ds").is_dir(), timeout=600, what="the step-8 save")
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


def test_cpu_offload_trains_with_ddps_losses_and_resumes(tmp_path, ddp_losses, bpe_tokenizer, bpe_corpus):
    """ZeRO-3 offloading both optimizer and parameters under DS_ACCELERATOR=cpu works (ZeRO-2's
    optimizer offload runs the same CPU Adam path; tried by hand, not in the suite for time):
    the optimizer steps in DeepSpeed's CPU Adam
    (AdamW mode; DeepSpeed refuses other client optimizers with offload). Stopped by Ctrl-C and
    resumed, every step stays within the DDP bound (1e-4 relative): CPU Adam is the same
    update as fused AdamW, evaluated in another order."""
    run = tmp_path / "run"
    engine = {"type": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus, engine))
    stopped = stop_with_ctrl_c(spec, run, 5, timeout=600)
    assert 5 <= stopped < STEPS
    r = run_cli("run", str(spec), timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert abs(got[s] - ddp_losses[s]) <= 1e-4 * abs(ddp_losses[s]), (s, got[s], ddp_losses[s])


@pytest.mark.parametrize(("engine", "mode"), [("ddp", "selective"), ("zero3", "full")])
def test_activation_checkpointing_gives_the_same_losses(tmp_path, ddp_losses, zero_runs, bpe_tokenizer,
                                                        bpe_corpus, engine, mode):
    cfg = {} if engine == "ddp" else {"type": "deepspeed", "zero_stage": 3}
    spec = _spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, cfg)
    spec["training"]["activation_checkpointing"] = mode
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    reference = ddp_losses if engine == "ddp" else losses(zero_runs[3][0])
    assert losses(tmp_path / "run") == reference  # the recompute runs the same kernels on the same inputs


def test_a_planted_pickle_in_a_zero_checkpoint_is_skipped_and_never_runs(tmp_path, zero_runs):
    """DeepSpeed unpickles its own files with weights_only=False. A model-states file replaced by
    a pickle that calls os.system (sizes and checksums in meta.json updated to match): the
    resume names the file and the global, skips that checkpoint and continues bitwise from the
    one before; with every checkpoint planted it refuses, naming the file (exit 2). No code runs."""
    import torch

    from hpctrain.launcher.contract.checkpoints import CheckpointMeta, file_records
    from tests.launcher.contract.test_pickles import Planted

    ref = losses(zero_runs[3][0])
    run = tmp_path / "run"
    shutil.copytree(zero_runs[3][0], run)
    spec = yaml.safe_load((zero_runs[3][0].parent / "s.yaml").read_text())
    spec["run_dir"] = str(run)
    spec_path = write_spec(tmp_path / "s.yaml", spec)
    marker = tmp_path / "code ran"

    def plant(step: int) -> str:
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        target = ckpt / "ds" / "mp_rank_00_model_states.pt"
        torch.save({"module": Planted(marker)}, target)
        meta = CheckpointMeta.read(ckpt)
        meta.files = file_records(ckpt)
        (ckpt / "meta.json").write_text(meta.to_json())
        return "ds/mp_rank_00_model_states.pt would call posix.system when loaded"

    why = plant(STEPS)
    r = run_cli("run", str(spec_path), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"checkpoint step_{STEPS:08d} is damaged ({why}" in r.stdout and "skipped" in r.stdout
    assert "resuming from" in r.stdout and "step_00000008" in r.stdout
    got = losses(run)
    assert [got[s] for s in range(9, STEPS + 1)] == [ref[s] for s in range(9, STEPS + 1)]
    for step in (8, STEPS):
        plant(step)
    r = run_cli("run", str(spec_path), timeout=900)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no checkpoint is whole" in r.stderr and why in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
