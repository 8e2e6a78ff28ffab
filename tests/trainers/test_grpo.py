"""GRPO (`finetune.kind: grpo`): the loss against a hand computation, and the tiny Llama sampling
completions of the shipped prompts on 2 real torchrun ranks, learning toward a verifiable reward
(tests/trainers/grpo_rewards.py): the reward rises, the KL to the reference starts at 0, a stop
resumes bitwise under DDP and FSDP2, a reward stage's export scores in a pipeline, and bad input
is refused before anything runs."""

from __future__ import annotations

import json

import pytest
import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.spec import spec_from_dict
from tests.conftest import run_cli
from tests.trainers.helpers import DATA, losses, stop_with_ctrl_c, write_spec

REWARDS = "tests.trainers.grpo_rewards"


def grpo_spec(run_dir, base: str, method: str = "full", **finetune) -> dict:
    return {
        "name": "grpo", "run_dir": str(run_dir), "task": "finetune",
        "model": {"path": base},
        "finetune": {"kind": "grpo", "method": method, "train_file": str(DATA / "sft_train.jsonl"),
                     "valid_file": str(DATA / "sft_valid.jsonl"), "seq_len": 48, "group_size": 4,
                     "max_new_tokens": 12, "reward_functions": [f"{REWARDS}:mentions_scheduler"],
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}, **finetune},
        "training": {"global_batch": 8, "micro_batch": 4, "steps": 30, "lr": 3e-3, "eval_every": 15,
                     "log_every": 1, "seed": 3},
        "checkpoint": {"every_steps": 4},
        "cluster": {"procs_per_node": 2},
    }


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def in_process(tiny_llama, **finetune):
    """The grpo kind and the tiny Llama in this process, four prompts tokenized and collated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpctrain.trainers.data.examples import ExampleDataset
    from hpctrain.trainers.tasks import kind_task

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    kind = kind_task(spec_from_dict(grpo_spec("/tmp/unused", tiny_llama, **finetune)).finetune)
    recs = [(i + 1, json.loads(x)) for i, x in enumerate((DATA / "sft_train.jsonl").read_text().splitlines()[:4])]
    tk = kind.tokenize(recs, tok, "prompts.jsonl", None)
    kind.use_initial_model(lambda: AutoModelForCausalLM.from_pretrained(tiny_llama))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    return kind, model, ExampleDataset(tk, tok.eos_token_id, kind.collate)


def test_the_loss_is_the_advantage_weighted_token_mean_and_a_tied_group_gives_nothing(tiny_llama):
    """One update per generation: the loss is -sum(A_i len_i) / sum(len_i), A normalised within
    each prompt's group; with every reward equal each advantage is 0, and so is every gradient.
    The same prompt draw samples the same completions; another draw others."""
    kind, model, data = in_process(tiny_llama)
    batch = data.batch([0, 1])
    batch["draws"] = [10, 11]
    loss, stats = kind.loss(model, batch, torch.device("cpu"))
    rewards, std, lengths = stats[:, 0], stats[:, 1], stats[:, 4]
    groups = rewards.view(2, 4)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert abs(float(loss.detach()) + float((adv * lengths).sum() / lengths.sum())) < 1e-6
    assert torch.equal(std, groups.std(1, keepdim=True).expand(-1, 4).reshape(-1))
    again = data.batch([0, 1])
    again["draws"] = [10, 11]
    same = kind.loss(model, again, torch.device("cpu"))[1]
    assert torch.equal(same[:, :-1], stats[:, :-1])  # the same completions (the last column: seconds)
    assert kind._noise([12], 4).ne(kind._noise([10], 4)).all()

    tied, model, data = in_process(tiny_llama, reward_functions=[f"{REWARDS}:constant"])
    batch = data.batch([0, 1, 2])
    batch["draws"] = [0, 1, 2]
    loss, stats = tied.loss(model, batch, torch.device("cpu"))
    loss.backward()
    assert float(loss.detach()) == 0.0 and stats[:, 0].eq(1).all() and stats[:, 1].eq(0).all()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_a_reward_function_that_returns_a_non_number_is_named(tiny_llama):
    kind, model, data = in_process(tiny_llama, reward_functions=[f"{REWARDS}:not_a_number"])
    with pytest.raises(UserError, match="reward function tests.trainers.grpo_rewards:not_a_number returned None "
                                        "for a completion of the prompt 'Who is responsible here"):
        kind.loss(model, data.batch([0]), torch.device("cpu"))


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_llama):
    """The reference run: 30 steps of full GRPO with a KL penalty to a frozen copy, 2 ranks, DDP."""
    d = tmp_path_factory.mktemp("grpo")
    spec = grpo_spec(d / "run", tiny_llama, kl_coef=0.05)
    r = run_cli("run", str(write_spec(d / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return d, spec


def test_the_reward_rises_and_the_kl_starts_at_zero(learned):
    d, _ = learned
    steps = [x for x in records(d / "run") if "reward" in x]
    assert [x["step"] for x in steps] == list(range(1, 31))
    first, last = (sum(x["reward"] for x in part) / len(part) for part in (steps[:5], steps[-8:]))
    assert last > first + 0.2 and last > 2.5 * first, (first, last)
    # the KL to the frozen copy is 0 while the policy is that copy: up to and including the first
    # step whose groups had rewards to tell apart (reward_std > 0: an advantage, so an update)
    moved = next(x["step"] for x in steps if x["reward_std"] > 0)
    assert moved <= 3, steps[:moved]
    assert all(x["kl"] == 0.0 for x in steps[:moved]) and all(x["kl"] > 0 for x in steps[moved:])
    assert all(0 < x["completions/mean_length"] <= 12 and 0 <= x["completions/clipped_ratio"] <= 1 for x in steps)
    assert all(x["rewards/mentions_scheduler/mean"] == x["reward"] for x in steps)  # one function, weight 1
    evals = [x for x in records(d / "run") if "eval_reward" in x]
    assert [x["step"] for x in evals] == [15, 30] and all("eval_kl" in x for x in evals)
    samples = [json.loads(x) for x in (d / "run" / "samples" / "step_30.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all({"prompt", "completion", "reward", "mentions_scheduler"} <= set(s) for s in samples)
    from hpctrain.launcher.plot import series

    curves = series(d / "run")  # what `hpctrain plot` draws in its reward and KL panels
    assert curves["reward"][0] == list(range(1, 31)) and curves["eval_reward"][0] == [15, 30]
    assert len(curves["kl"][1]) == 30
    r = run_cli("plot", str(d / "run"), "--out", str(d / "plot.png"))
    assert r.returncode == 0 and (d / "plot.png").stat().st_size > 0, r.stderr


def test_a_stopped_run_resumes_with_the_same_completions_and_losses(learned):
    """Ctrl-C at step 9 and the same command again: every later step's loss, reward and KL are
    bitwise the uninterrupted run's (the completions are sampled again, the same)."""
    d, spec = learned
    again = d / "again"
    path = write_spec(d / "again.yaml", {**spec, "run_dir": str(again)})
    stopped = stop_with_ctrl_c(path, again, 9)
    assert stopped < 30
    r = run_cli("run", str(path), timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    want = {x["step"]: (x["loss"], x["reward"], x["kl"]) for x in records(d / "run") if "reward" in x}
    got = {x["step"]: (x["loss"], x["reward"], x["kl"]) for x in records(again) if "reward" in x}
    assert [got[s] for s in range(stopped + 1, 31)] == [want[s] for s in range(stopped + 1, 31)]


def test_lora_under_fsdp2_resumes_bitwise_against_the_policy_with_its_adapters_off(tmp_path, tiny_llama):
    spec = grpo_spec(tmp_path / "run", tiny_llama, method="lora", kl_coef=0.1,
                     reward_functions=[f"{REWARDS}:shorter"])
    spec["training"].update(steps=4, eval_every=4, global_batch=4, micro_batch=2)
    spec["checkpoint"]["every_steps"] = 2
    spec["engine"] = {"type": "fsdp"}
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {x["step"]: x for x in records(tmp_path / "run") if "reward" in x}
    assert steps[1]["kl"] == 0.0 and all(steps[s]["kl"] > 0 for s in (2, 3, 4))  # adapters start at zero
    again = tmp_path / "again"
    path = write_spec(tmp_path / "again.yaml", {**spec, "run_dir": str(again)})
    stopped = stop_with_ctrl_c(path, again, 1)
    assert stopped < 4
    r = run_cli("run", str(path), timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    want, got = losses(tmp_path / "run"), losses(again)
    assert [got[s] for s in range(stopped + 1, 5)] == [want[s] for s in range(stopped + 1, 5)]


def test_a_reward_stage_export_scores_the_completions_of_the_next_stage(tmp_path, tiny_llama):
    """A pipeline: a reward model trained from the pairs, then GRPO with `reward_model:
    stage:reward` and a reward function reading the record's `response` field, weighted."""
    pipeline = {
        "name": "rlhf", "run_dir": str(tmp_path / "runs"),
        "defaults": {"cluster": {"procs_per_node": 1}, "task": "finetune", "model": {"path": tiny_llama},
                     "training": {"global_batch": 4, "micro_batch": 4, "steps": 2, "lr": 1e-3, "log_every": 1,
                                  "eval_every": 2}},
        "stages": [
            {"name": "reward", "finetune": {"kind": "reward", "method": "full", "seq_len": 96,
                                            "train_file": str(DATA / "pairs_train.jsonl"),
                                            "valid_file": str(DATA / "pairs_valid.jsonl")}},
            {"name": "grpo", "finetune": {
                **grpo_spec("", tiny_llama)["finetune"], "reward_model": "stage:reward", "samples_logged": 2,
                "reward_functions": [f"{REWARDS}:matches_response"], "reward_weights": [2.0, 0.5]}},
        ],
    }
    r = run_cli("run", str(write_spec(tmp_path / "p.yaml", pipeline)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reward model: " in r.stdout and "frozen" in r.stdout
    steps = [x for x in records(tmp_path / "runs" / "grpo") if "reward" in x]
    assert len(steps) == 2
    for x in steps:
        assert abs(x["reward"] - 2.0 * x["rewards/matches_response/mean"] - 0.5 * x["rewards/reward_model/mean"]) < 1e-9
        assert x["rewards/reward_model/mean"] != 0.0
    samples = (tmp_path / "runs" / "grpo" / "samples" / "step_2.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "reward_model" in json.loads(samples[0])


def test_bad_grpo_input_is_refused_before_anything_runs(tmp_path, tiny_llama):
    """Exit 2 naming the field (and the file or line) for each, and no run dir."""
    no_prompt = tmp_path / "questions.jsonl"
    no_prompt.write_text('{"prompt": "Who?"}\n{"question": "Why?"}\n')
    cases = [
        ({"group_size": 1}, "finetune.group_size"),
        ({"max_new_tokens": 40}, "seq_len 48 (the prompt) + max_new_tokens 40 is past the model's 64 positions"),
        ({"reward_functions": ["tests.trainers.no_such_module:f"]},
         "finetune.reward_functions.0: tests.trainers.no_such_module:f cannot be imported: ModuleNotFoundError"),
        ({"reward_functions": [f"{REWARDS}:no_such_function"]}, "has no 'no_such_function'"),
        ({"reward_model": tiny_llama}, "finetune.reward_model: the model is a LlamaForCausalLM, not a sequence classifier"),
        ({"reward_functions": [], "reward_model": None}, "grpo needs a reward"),
        ({"reward_weights": [1.0, 2.0]}, "finetune.reward_weights has 2 weight(s) for 1 reward(s)"),
        ({"train_file": str(no_prompt)}, f"{no_prompt}: finetune.train_file: line 2 has no field 'prompt'"),
    ]
    for i, (over, message) in enumerate(cases):
        spec = grpo_spec(tmp_path / f"run{i}", tiny_llama, **over)
        r = run_cli("validate", str(write_spec(tmp_path / f"s{i}.yaml", spec)))
        assert r.returncode == 2 and message in r.stderr, (over, r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / f"run{i}").exists()


def test_a_reward_function_that_raises_ends_the_run_in_one_line(tmp_path, tiny_llama):
    spec = grpo_spec(tmp_path / "run", tiny_llama, reward_functions=[f"{REWARDS}:raises"])
    spec["cluster"]["procs_per_node"] = 1
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("finetune.reward_functions: reward function tests.trainers.grpo_rewards:raises raised ValueError: "
            "no scorer configured (batch with the prompt of 'prompt'") in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.deepspeed
def test_zero3_samples_from_weights_gathered_once_and_starts_as_ddp(learned, tmp_path):
    """ZeRO-3 (the reference a partitioned frozen copy): its first step samples the same
    completions as DDP's (the same rewards) to within float order in the loss, and it trains on."""
    d, spec = learned
    z = {**spec, "run_dir": str(tmp_path / "run"), "engine": {"type": "deepspeed", "zero_stage": 3},
         "training": {**spec["training"], "steps": 3, "eval_every": 3}}
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", z)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    ddp = next(x for x in records(d / "run") if x.get("step") == 1 and "reward" in x)
    got = [x for x in records(tmp_path / "run") if "reward" in x]
    assert [x["step"] for x in got] == [1, 2, 3]
    assert got[0]["reward"] == ddp["reward"] and got[0]["kl"] == 0.0 and got[2]["kl"] > 0
    assert abs(got[0]["loss"] - ddp["loss"]) <= 1e-4 * max(abs(ddp["loss"]), 1e-3)


def test_num_iterations_trains_each_generation_several_steps_and_resumes_between_them(tmp_path, tiny_llama):
    """num_iterations 2: steps 1 and 2 train on one generation (the same rewards, no sampling in
    step 2, the ratio to the sampling policy moving the loss), and so on. A crash after step 4
    leaves the checkpoint of step 3, between the two steps of a generation: the same command
    again takes the generation back from it and steps 4-6 are bitwise the uninterrupted run's."""
    spec = grpo_spec(tmp_path / "run", tiny_llama, kl_coef=0.05, num_iterations=2,
                     reward_functions=[f"{REWARDS}:shorter"])
    spec["training"].update(steps=6, eval_every=None, global_batch=8, micro_batch=2)
    spec["checkpoint"]["every_steps"] = 3
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {x["step"]: x for x in records(tmp_path / "run") if "reward" in x}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for first in (1, 3, 5):
        a, b = steps[first], steps[first + 1]
        assert b["reward"] == a["reward"] and b["completions/mean_length"] == a["completions/mean_length"]
        assert a["time/generation_s"] > 0 and b["time/generation_s"] == 0
        assert a["clip_ratio/region_mean"] == 0 and 0 <= b["clip_ratio/region_mean"] <= 1
        assert b["loss"] != a["loss"]
    assert steps[3]["reward"] != steps[1]["reward"]  # another batch of prompts, sampled anew
    assert steps[1]["kl"] == 0.0 and steps[2]["kl"] > 0

    again = tmp_path / "again"
    path = write_spec(tmp_path / "again.yaml", {**spec, "run_dir": str(again)})
    r = run_cli("run", str(path), env={"HPCTRAIN_FAULT_FAIL_AT_STEP": "4"}, timeout=900)
    assert r.returncode == 1, r.stdout + r.stderr
    meta = json.loads((again / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["sampler"]["steps_done"] == 1  # the checkpoint is between a generation's two steps
    r = run_cli("run", str(path), timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    assert "sampled again" not in r.stdout  # each rank's kept generation came back
    want = {s: (x["loss"], x["reward"], x["kl"]) for s, x in steps.items()}
    got = {x["step"]: (x["loss"], x["reward"], x["kl"]) for x in records(again) if "reward" in x}
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]


def test_an_epochs_budget_counts_num_iterations_steps_per_batch():
    spec = grpo_spec("/tmp/unused", "/tmp/model", num_iterations=3)
    spec["training"] = {**spec["training"], "steps": None, "epochs": 2}
    assert spec_from_dict(spec).total_steps_for(20) == 3 * 5  # ceil(2 * 20 / 8) batches, 3 steps each
