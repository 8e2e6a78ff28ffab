"""DPO (`finetune.kind: dpo`): a pair's tokens, the loss and its gradients against a hand
computation, and runs on 2 real torchrun ranks of the tiny Llama: the reference precomputed and
stored (read back on resume, a damaged part computed again, a stop during the pass resumed
without redoing it), the reference as a frozen copy, and as the policy with its LoRA adapters
off; under ZeRO-3 and FSDP2 the same losses as under DDP."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from hpctrain.launcher.contract.errors import UserError, UserErrors
from hpctrain.launcher.contract.spec import spec_from_dict
from tests.conftest import run_cli
from tests.trainers.helpers import (
    DATA,
    last_step,
    losses,
    start_run,
    stop_with_ctrl_c,
    wait_for,
    write_spec,
)

LN2 = math.log(2)


def dpo_spec(run_dir, base: str, method: str = "full", **training) -> dict:
    return {
        "name": "dpo", "run_dir": str(run_dir), "task": "finetune",
        "model": {"path": base},
        "finetune": {"kind": "dpo", "method": method, "train_file": str(DATA / "pairs_train.jsonl"),
                     "valid_file": str(DATA / "pairs_valid.jsonl"), "seq_len": 96, "beta": 0.1,
                     "reference_chunk_pairs": 32,
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}},
        "training": {"global_batch": 8, "micro_batch": 4, "steps": 6, "lr": 1e-3, "eval_every": 6,
                     "log_every": 1, "seed": 5, **training},
        "checkpoint": {"every_steps": 2},
        "cluster": {"procs_per_node": 2},
    }


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_both_responses_are_cut_by_one_rule_and_only_responses_carry_labels(tiny_llama):
    from transformers import AutoTokenizer

    from hpctrain.trainers.data.examples import ExampleDataset
    from hpctrain.trainers.tasks import kind_task
    from hpctrain.trainers.tasks.sft import PROMPT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    dpo = kind_task(spec_from_dict(dpo_spec("/tmp/unused", tiny_llama)).finetune.model_copy(update={"seq_len": 40}))
    recs = [(1, {"prompt": "Who?", "chosen": "The scheduler decides.", "rejected": "the scheduler " * 20}),
            (2, {"prompt": "Why?", "chosen": "Short.", "rejected": "Also short."})]
    tk = dpo.tokenize(recs, tok, "pairs.jsonl", None)
    prompt = tok(PROMPT_TEMPLATE.format(prompt="Who?"), add_special_tokens=False)["input_ids"]
    assert tk.truncated == 1 and tk.prompt_lens[0] == len(prompt)  # the long rejected side: counted once
    assert tk.input_ids[0][: len(prompt)] == prompt == tk.labels[0][: len(prompt)]  # the prompt kept on both
    assert len(tk.labels[0]) == 40 and len(tk.input_ids[0]) < 40  # the rejected side cut, the chosen not

    batch = ExampleDataset(tk, tok.eos_token_id, dpo.collate).batch([0, 1])
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected: one forward
    labelled = (batch["labels"] != -100).sum(1).tolist()
    assert labelled == [len(tk.input_ids[0]) - len(prompt), len(tk.input_ids[1]) - tk.prompt_lens[1],
                        40 - len(prompt), len(tk.labels[1]) - tk.prompt_lens[1]]


def _hand_logps(model, rows: list[list[int]], prompt_lens: list[int]) -> torch.Tensor:
    """Each row alone (no padding), its response tokens' log-probs summed one by one."""
    out = []
    for row, p in zip(rows, prompt_lens, strict=True):
        logits = model(input_ids=torch.tensor([row])).logits[0].double()
        out.append(sum(torch.log_softmax(logits[t - 1], -1)[row[t]] for t in range(p, len(row))))
    return torch.stack(out)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_the_loss_and_its_gradients_equal_a_hand_computation(tiny_llama, loss_type, smoothing):
    """Policy = the tiny Llama, reference log-probs given; the kind's loss (one padded forward for
    both sides) against each row scored alone in float64 and the formula written out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpctrain.trainers.data.examples import ExampleDataset
    from hpctrain.trainers.tasks import kind_task

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ft = spec_from_dict(dpo_spec("/tmp/unused", tiny_llama)).finetune.model_copy(
        update={"loss_type": loss_type, "label_smoothing": smoothing, "beta": 0.5})
    dpo = kind_task(ft)
    lines = [json.loads(x) for x in (DATA / "pairs_train.jsonl").read_text().splitlines()[:3]]
    tk = dpo.tokenize(list(enumerate(lines, 1)), tok, "pairs.jsonl", None)
    tk.reference = torch.tensor([[-30.0, -31.0], [-25.5, -20.0], [-40.0, -44.0]], dtype=torch.float64)
    batch = ExampleDataset(tk, tok.eos_token_id, dpo.collate).batch([0, 1, 2])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loss, stats = dpo.loss(model, batch, torch.device("cpu"))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    rows = tk.input_ids + tk.labels
    logps = _hand_logps(model, rows, tk.prompt_lens * 2)
    ref = tk.reference.T.reshape(-1)
    if loss_type == "ipo":
        n = torch.tensor([len(r) - p for r, p in zip(rows, tk.prompt_lens * 2, strict=True)], dtype=torch.float64)
        logps, ref = logps / n, ref / n
    x = (logps[:3] - ref[:3]) - (logps[3:] - ref[3:])
    if loss_type == "ipo":
        hand = ((x - 1 / (2 * 0.5)) ** 2).mean()
    else:
        sig = torch.sigmoid(0.5 * x)
        hand = -(torch.log(sig) * (1 - smoothing) + torch.log(1 - sig) * smoothing).mean()
    hand.backward()
    torch.testing.assert_close(loss.double(), hand, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name].double(), p.grad.double(), rtol=1e-3, atol=1e-6, msg=name)
    dpo.trims = True  # the head over the positions from the first response token on only: the same loss
    with torch.no_grad():
        torch.testing.assert_close(dpo.loss(model, batch, torch.device("cpu"))[0], loss.detach(), rtol=1e-6, atol=1e-6)
    rewards = 0.5 * (logps - ref)
    torch.testing.assert_close(stats[:, 0].double(), rewards[:3].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[:, 3].double(), (rewards[:3] - rewards[3:]).detach(), rtol=1e-5, atol=1e-6)


def test_a_dpo_spec_is_checked_before_anything_runs(tmp_path):
    spec = dpo_spec(tmp_path / "run", str(tmp_path))
    for change, message in [({"beta": 0}, "finetune.beta"), ({"beta": -0.1}, "greater than 0"),
                            ({"method": "qlora", "reference": "model"}, "reference: model with method qlora"),
                            ({"reference": "adapter"}, "adapter needs method lora or qlora"),
                            ({"best_metric": "accuracy"}, "eval_rewards/accuracies"),
                            ({"center_rewards_coefficient": 0.1}, "not a field of kind dpo")]:
        bad = json.loads(json.dumps(spec))
        bad["finetune"].update(change)
        with pytest.raises(UserErrors, match=message):
            spec_from_dict(bad, "s.yaml")
    ok = spec_from_dict({**spec, "finetune": {**spec["finetune"], "best_metric": "eval_rewards/accuracies"}})
    assert ok.finetune.higher_is_better("eval_rewards/accuracies") and not ok.finetune.higher_is_better("val_loss")
    assert ok.finetune.reference_kind() == "precompute"


def test_bad_pairs_are_refused_by_validate_naming_file_and_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": "Who decides?", "chosen": "The scheduler.", "rejected": "The switch."}
    for bad, message in [({"chosen": "   "}, "line 2: 'chosen' is an empty response"),
                         ({"rejected": "The scheduler."}, "line 2: chosen and rejected are the same"),
                         ({"rejected": None}, "line 2 has no field 'rejected'")]:
        pairs.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        spec = dpo_spec(tmp_path / "run", str(tmp_path))
        spec["finetune"].update(train_file=str(pairs), valid_file=None)
        r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", spec)))
        assert r.returncode == 2 and f"{pairs}: finetune.train_file" in r.stderr and message in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()
    pairs.write_bytes(json.dumps(good).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", spec)))
    assert r.returncode == 2 and "line 2" in r.stderr and "UTF-8" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def full_ddp(tiny_llama, tmp_path_factory):
    """6 steps of full DPO with a precomputed reference on 2 DDP ranks, uninterrupted."""
    d = tmp_path_factory.mktemp("dpo-ddp")
    r = run_cli("run", str(write_spec(d / "s.yaml", dpo_spec(d / "run", tiny_llama))), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return d / "run", r.stdout


def test_full_dpo_starts_at_ln2_logs_trl_names_and_stores_its_reference(full_ddp):
    run, out = full_ddp
    recs = records(run)
    steps = [x for x in recs if "rewards/chosen" in x]
    assert [x["step"] for x in steps] == list(range(1, 7))
    assert abs(steps[0]["loss"] - LN2) < 1e-5, steps[0]  # the policy is the reference at step 1
    assert abs(steps[0]["rewards/margins"]) < 1e-5
    assert all(abs(x["rewards/margins"]) > 1e-3 for x in steps[1:])  # the policy has moved from the reference
    evals = [x for x in recs if "eval_rewards/accuracies" in x]
    assert [x["step"] for x in evals] == [6]
    assert {"val_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_logps/chosen",
            "eval_logps/rejected"} <= set(evals[0])
    assert "reference log-probs of train (160 pairs): 0 stored, computing 5 part(s)" in out
    assert sorted(p.name for p in (run / "reference" / "train").glob("*.npy"))[:2] == ["000000000.npy", "000000032.npy"]
    assert len(list((run / "reference" / "valid").glob("*.json"))) == 2

    scored = run_cli("eval", str(run), "--data", str(DATA / "pairs_valid.jsonl"))
    assert scored.returncode == 0, scored.stderr
    res = json.loads(scored.stdout.strip().splitlines()[-1])
    assert res["examples"] == 40
    assert res["rewards/accuracies"] == pytest.approx(evals[0]["eval_rewards/accuracies"], abs=0.03)
    assert res["rewards/margins"] == pytest.approx(evals[0]["eval_rewards/margins"], rel=1e-3, abs=1e-4)


def test_a_resume_reads_the_stored_reference_and_computes_a_damaged_part_again(full_ddp, tiny_llama, tmp_path):
    """Ctrl-C, one stored part damaged: the resume says so, computes that part through a frozen
    copy of the initial model, reads the others, and its losses are bitwise the uninterrupted run's."""
    ref, _ = full_ddp
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", dpo_spec(run, tiny_llama))
    stopped = stop_with_ctrl_c(spec, run, 2)
    assert stopped < 6
    kept = run / "reference" / "train" / "000000000.npy"
    before = kept.stat().st_mtime_ns
    damaged = run / "reference" / "train" / "000000064.npy"
    raw = bytearray(damaged.read_bytes())
    raw[-3] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    r = run_cli("run", str(spec))
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    assert f"{damaged} are damaged (checksum mismatch): computed again" in r.stdout
    assert "through a frozen copy of the initial model" in r.stdout
    assert "reference log-probs of valid (40 pairs): read from" in r.stdout
    assert kept.stat().st_mtime_ns == before
    want, got = losses(ref), losses(run)
    assert [got[s] for s in range(stopped + 1, 7)] == [want[s] for s in range(stopped + 1, 7)]


def test_a_stop_during_the_reference_pass_resumes_without_redoing_the_finished_parts(full_ddp, tiny_llama, tmp_path):
    ref, _ = full_ddp
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", dpo_spec(run, tiny_llama))
    proc = start_run(spec, env={**os.environ, "HPCTRAIN_FAULT_SLOW_REFERENCE_PART_S": "1.5"})
    parts = run / "reference" / "train"
    wait_for(lambda: len(list(parts.glob("*.json"))) >= 2, timeout=180, what="two stored parts")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "reference pass of train stopped" in out and "resumable" in out, out
    assert last_step(run) == 0 and not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    done = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npy")}
    assert 2 <= len(done) < 5

    r = run_cli("run", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{32 * len(done)} stored, computing {5 - len(done)} part(s)" in r.stdout
    assert {p: (parts / p).stat().st_mtime_ns for p in done} == done  # not computed again
    assert losses(run) == losses(ref)


def test_a_frozen_reference_model_agrees_with_the_precomputed_one(full_ddp, tiny_llama, tmp_path):
    ref, _ = full_ddp
    spec = dpo_spec(tmp_path / "run", tiny_llama)
    spec["finetune"]["reference"] = "model"
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0 and "a frozen copy of the initial model" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "run" / "reference").exists()
    want, got = losses(ref), losses(tmp_path / "run")
    assert got[1] == pytest.approx(LN2, abs=1e-6)
    assert sorted(got) == sorted(want)
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-4 * want[s], (s, got[s], want[s])


def test_lora_dpo_uses_the_policy_with_adapters_off_as_its_reference(tiny_llama, tmp_path):
    """No copy, no stored pass: the first loss is exactly ln 2 (LoRA starts as a no-op), the
    export is the adapter, and `hpctrain eval` scores against the base."""
    spec = dpo_spec(tmp_path / "run", tiny_llama, method="lora", steps=4, eval_every=4)
    spec["training"]["lr"] = 2e-2
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    got = losses(tmp_path / "run")
    assert got[1] == pytest.approx(LN2, abs=1e-7), got
    assert got[4] != got[1]
    assert not (tmp_path / "run" / "reference").exists()
    assert (tmp_path / "run" / "export" / "adapter_config.json").is_file()
    scored = run_cli("eval", str(tmp_path / "run"), "--data", str(DATA / "pairs_valid.jsonl"))
    assert scored.returncode == 0, scored.stderr
    last = [x for x in records(tmp_path / "run") if "eval_rewards/margins" in x][-1]
    res = json.loads(scored.stdout.strip().splitlines()[-1])
    assert res["rewards/margins"] == pytest.approx(last["eval_rewards/margins"], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("engine,reference", [
    pytest.param({"type": "deepspeed", "zero_stage": 3}, "model", marks=pytest.mark.deepspeed),
    ({"type": "fsdp"}, "precompute")], ids=["zero3-frozen-copy", "fsdp-precompute"])
def test_dpo_trains_alike_and_resumes_bitwise_under_the_sharding_engines(full_ddp, tiny_llama, tmp_path, engine,
                                                                          reference):
    """The same steps under a sharding engine: each loss within 1e-4 (relative) of DDP's with a
    precomputed reference; stopped with Ctrl-C and run again: under ZeRO-3 bitwise its own
    uninterrupted losses (the frozen copy built again from the initial weights), under FSDP2 on
    one rank instead of two, the stored reference read, within 1e-4 of them."""
    ref, _ = full_ddp
    spec = dpo_spec(tmp_path / "run", tiny_llama)
    spec["engine"] = engine
    spec["finetune"]["reference"] = reference
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    want, got = losses(ref), losses(tmp_path / "run")
    assert sorted(got) == sorted(want)
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-4 * want[s], (s, got[s], want[s])
    assert [x["step"] for x in records(tmp_path / "run") if "eval_rewards/accuracies" in x] == [6]

    again = tmp_path / "again"
    path = write_spec(tmp_path / "again.yaml", {**spec, "run_dir": str(again)})
    stopped = stop_with_ctrl_c(path, again, 2)
    assert stopped < 6
    fewer = engine["type"] == "fsdp"  # FSDP2 resumes on another rank count: its stored reference is read
    r = run_cli("run", str(path), *(["--set", "cluster.procs_per_node=1"] if fewer else []), timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    resumed = losses(again)
    if fewer:
        assert "reference log-probs of train (160 pairs): read from" in r.stdout
        for s in range(stopped + 1, 7):
            assert abs(resumed[s] - got[s]) <= 1e-4 * got[s], (s, resumed[s], got[s])
    else:
        assert [resumed[s] for s in range(stopped + 1, 7)] == [got[s] for s in range(stopped + 1, 7)]


def test_qlora_dpo_scores_the_reference_with_the_4bit_base_and_adapters_off(tiny_llama, tmp_path):
    spec = dpo_spec(tmp_path / "run", tiny_llama, method="qlora", steps=3, eval_every=3)
    spec["cluster"]["procs_per_node"] = 1
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    got = losses(tmp_path / "run")
    assert got[1] == pytest.approx(LN2, abs=1e-7) and sorted(got) == [1, 2, 3], got
    assert (tmp_path / "run" / "export" / "adapter_config.json").is_file()


def test_a_unit_dpo_tokenizer_refuses_a_prompt_with_no_room(tiny_llama):
    from transformers import AutoTokenizer

    from hpctrain.trainers.tasks import kind_task

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    dpo = kind_task(spec_from_dict(dpo_spec("/tmp/unused", tiny_llama)).finetune.model_copy(update={"seq_len": 16}))
    with pytest.raises(UserError, match="line 4: the prompt alone takes .* no room for a response at seq_len 16"):
        dpo.tokenize([(4, {"prompt": "Who decides? " * 10, "chosen": "a", "rejected": "b"})], tok, "p.jsonl", None)


def test_a_chat_pair_shares_its_rendered_prompt_and_needs_one_message_per_side(tiny_llama):
    """TRL's conversational form: the prompt's messages rendered once (here the plain role template:
    the tiny tokenizer has no chat template), each side one assistant message."""
    from transformers import AutoTokenizer

    from hpctrain.trainers.tasks import kind_task

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    dpo = kind_task(spec_from_dict(dpo_spec("/tmp/unused", tiny_llama)).finetune)
    prompt = [{"role": "user", "content": "Who decides?"}]
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "The scheduler."}],
            "rejected": [{"role": "assistant", "content": "The switch."}]}
    tk = dpo.tokenize([(1, pair)], tok, "pairs.jsonl", None)
    n = tk.prompt_lens[0]
    assert tk.input_ids[0][:n] == tk.labels[0][:n] and tk.input_ids[0][n:] != tk.labels[0][n:]
    rendered = tok.decode(tk.input_ids[0][:n])
    assert "Who decides?" in rendered and "The scheduler." not in rendered
    with pytest.raises(UserError, match="line 7: a chat pair"):
        dpo.tokenize([(7, {**pair, "rejected": "The switch."})], tok, "pairs.jsonl", None)
