"""`finetune.kind: seq2seq`: a tiny Marian-shaped model, "pretrained" on the parallel corpus's base
sentences (the `tiny_marian` fixture), is re-trained on new sentences (time phrases, German
verb-second order) with real torchrun ranks. BLEU / chrF / ROUGE-L come from generating the
validation sources; our metric path scores copies 100 and nothing 0; a re-training resumes
bitwise after Ctrl-C; generation under ZeRO-2, ZeRO-3 and FSDP2 scores what DDP scores for the
same weights; QLoRA re-trains adapters on a 4-bit base; `hpctrain eval` generates, scores and
writes predictions; bad input exits 2 naming the file, line or field before anything runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sacrebleu

from hpctrain.launcher.contract.rundir import metrics_records
from hpctrain.trainers.tasks.scores import TextScores
from tests.conftest import run_cli
from tests.trainers.helpers import DATA, losses, s2s_spec, stop_with_ctrl_c, write_spec

VALID = [json.loads(x) for x in (DATA / "translate_valid.jsonl").read_text().splitlines()]


def evaluations(run_dir: Path) -> dict[int, dict]:
    """{step: its validation metrics} (without the wall-clock time)."""
    return {r["step"]: {k: v for k, v in r.items() if k != "time"} for r in metrics_records(run_dir) if "bleu" in r}


def test_copies_score_100_and_nothing_scores_0_as_sacrebleu_scores_the_whole_corpus():
    refs = [r["target"] for r in VALID]
    scores = TextScores(["bleu", "chrf", "rougeL"])
    # the statistics of parts (micro-batches, ranks) add up to the whole corpus's
    copied = sum((scores.stats(refs[i : i + 7], refs[i : i + 7]) for i in range(0, len(refs), 7)), start=0)
    assert scores.scores(copied) == pytest.approx({"bleu": 100.0, "chrf": 100.0, "rougeL": 100.0})
    assert scores.scores(scores.stats([""] * len(refs), refs)) == {"bleu": 0.0, "chrf": 0.0, "rougeL": 0.0}
    hyps = [" ".join(r.split()[:-2]) if i % 3 else r for i, r in enumerate(refs)]  # some words lost
    parts = scores.stats(hyps[:25], refs[:25]) + scores.stats(hyps[25:], refs[25:])
    got = scores.scores(parts)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert 0 < got["bleu"] < 100 and 0 < got["rougeL"] < 100
    zh = TextScores(["bleu"], "zh")  # the tokenizer a Chinese target needs
    assert zh.scores(zh.stats(["我们在训练模型"], ["我们在训练一个模型"]))["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(["我们在训练模型"], [["我们在训练一个模型"]], tokenize="zh").score)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, tiny_marian):
    """An uninterrupted 2-rank DDP re-training (the resume test's reference)."""
    run = tmp_path_factory.mktemp("s2s") / "run"
    spec = s2s_spec(run, tiny_marian, "full")
    spec["cluster"]["procs_per_node"] = 2
    r = run_cli("run", str(write_spec(run.parent / "s.yaml", spec)), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return run, spec, r.stdout


def test_retraining_raises_bleu_and_writes_predictions(retrained):
    run, _, out = retrained
    evals = evaluations(run)
    assert sorted(evals) == [4, 8]
    assert evals[8]["bleu"] > evals[4]["bleu"] > 0
    assert evals[8]["val_loss"] < evals[4]["val_loss"]
    assert 0 < evals[8]["chrf"] <= 100 and 0 < evals[8]["rougeL"] <= 100
    assert "best by bleu" in out and "600 training / 60 validation examples" in out
    rows = [json.loads(x) for x in (run / "predictions" / "step_8.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["source"] for r in rows} <= {v["source"] for v in VALID}
    by_source = {v["source"]: v["target"] for v in VALID}
    assert all(r["reference"] == by_source[r["source"]] and r["prediction"] for r in rows)


def test_a_retraining_resumes_bitwise_after_ctrl_c(retrained, tmp_path):
    ref, spec, _ = retrained
    run = tmp_path / "run"
    spec = {**spec, "run_dir": str(run)}
    path = write_spec(tmp_path / "s.yaml", spec)
    stopped = stop_with_ctrl_c(path, run, 3)
    assert stopped < 8
    r = run_cli("run", str(path), timeout=600)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    want, got = losses(ref), losses(run)
    assert [got[s] for s in range(stopped + 1, 9)] == [want[s] for s in range(stopped + 1, 9)]
    assert evaluations(run)[8] == evaluations(ref)[8]


def test_hpctrain_eval_generates_scores_and_writes_predictions(retrained, tmp_path):
    run, _, _ = retrained
    r = run_cli("eval", str(run), "--data", str(DATA / "translate_valid.jsonl"))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    final = evaluations(run)[8]
    assert res["examples"] == 60
    # the export is the final weights: the JSONL scores as the TSV of the same pairs did in training
    assert res["bleu"] == pytest.approx(final["bleu"], abs=1e-6)
    # (the loss is a mean of micro-batch means: 2 ranks in training batch the set otherwise than one here)
    assert res["val_loss"] == pytest.approx(final["val_loss"], rel=1e-2)
    rows = [json.loads(x) for x in Path(res["predictions"]).read_text().splitlines()]
    assert Path(res["predictions"]) == run / "eval" / "translate_valid.predictions.jsonl"
    assert [r["source"] for r in rows] == [v["source"] for v in VALID]
    own = TextScores(["bleu"])
    assert own.scores(own.stats([r["prediction"] for r in rows], [r["reference"] for r in rows]))["bleu"] == \
        pytest.approx(res["bleu"])
    out = tmp_path / "mine.jsonl"
    r = run_cli("eval", str(run), "--data", str(DATA / "translate_valid.tsv"), "--predictions", str(out))
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 60, r.stdout + r.stderr


def generation_run(run_dir: Path, model: str, engine: dict, method: str) -> dict:
    """One 2-rank step at a learning rate too small to move a weight, evaluated with beam search:
    the step's validation metrics."""
    spec = s2s_spec(run_dir, model, method, steps=1, eval_every=1, lr=1e-12, warmup_steps=0)
    spec["cluster"]["procs_per_node"] = 2
    spec["engine"] = engine
    spec["finetune"]["generation"] = {"num_beams": 2}
    r = run_cli("run", str(write_spec(run_dir.parent / f"{run_dir.name}.yaml", spec)), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return evaluations(run_dir)[1]


@pytest.fixture(scope="module")
def ddp_scores(tmp_path_factory, tiny_marian) -> dict:
    """What DDP scores for the pretrained weights (the sharded engines' reference)."""
    return generation_run(tmp_path_factory.mktemp("s2s-ddp") / "ddp", tiny_marian, {"type": "ddp"}, "full")


@pytest.mark.parametrize("engine,method", [
    ({"type": "fsdp"}, "full"),
    pytest.param({"type": "deepspeed", "zero_stage": 2}, "full", marks=pytest.mark.deepspeed),
    pytest.param({"type": "deepspeed", "zero_stage": 3}, "lora", marks=pytest.mark.deepspeed),
], ids=["fsdp-full", "zero2-full", "zero3-lora"])
def test_generation_under_sharded_engines_scores_what_ddp_scores(tiny_marian, ddp_scores, tmp_path, engine, method):
    """Every engine evaluates the pretrained weights, and generation (each rank its share of the
    sources; under ZeRO-3 and FSDP2 the sharded model's forwards in step) must score them
    exactly as DDP does."""
    scored = generation_run(tmp_path / "sharded", tiny_marian, engine, method)
    assert scored["bleu"] == ddp_scores["bleu"] > 0
    assert scored["chrf"] == ddp_scores["chrf"]
    assert scored["val_loss"] == pytest.approx(ddp_scores["val_loss"], rel=1e-5)


def test_qlora_retrains_adapters_on_a_4bit_base_and_generates(tiny_marian, tmp_path):
    """QLoRA: the Marian's linear layers load in 4 bits (bitsandbytes), the LoRA adapters learn
    (validation loss falls), generation from the 4-bit base + adapters is scored, and only the
    adapters are checkpointed and exported."""
    import torch

    spec = s2s_spec(tmp_path / "run", tiny_marian, "qlora", lr=3e-3)
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    # the weights it holds: the linear layers' 4-bit blocks, well under the fp32 model's bytes
    held = float(re.search(r"weights in memory: ([0-9.]+) MiB", r.stdout).group(1))
    assert held < 0.6 * (Path(tiny_marian) / "model.safetensors").stat().st_size / 2**20, r.stdout
    evals = evaluations(tmp_path / "run")
    assert sorted(evals) == [4, 8] and evals[8]["val_loss"] < evals[4]["val_loss"]
    assert all(0 <= e["bleu"] <= 100 and 0 < e["chrf"] <= 100 for e in evals.values())
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000008" / "model.pt", weights_only=True)
    assert state and all("lora_A" in k or "lora_B" in k for k in state), sorted(state)
    export = tmp_path / "run" / "export"
    assert json.loads((export / "adapter_config.json").read_text())["target_modules"] is not None
    rows = (tmp_path / "run" / "predictions" / "step_8.jsonl").read_text().splitlines()
    assert rows and all(json.loads(x)["prediction"] is not None for x in rows)


def decoder_only(folder: Path) -> str:
    """A tiny saved Llama (a decoder-only model folder)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return str(folder)


def test_validate_refuses_what_seq2seq_cannot_train(tmp_path, tiny_marian):
    tiny_llama = decoder_only(tmp_path / "llama")
    good = s2s_spec(tmp_path / "run", tiny_marian, "lora")
    r = run_cli("validate", str(write_spec(tmp_path / "ok.yaml", good)))
    assert r.returncode == 0, r.stdout + r.stderr
    no_target = tmp_path / "no_target.jsonl"
    no_target.write_text('{"source": "a", "target": "b"}\n{"source": "The job."}\n')
    one_column = tmp_path / "one.tsv"
    one_column.write_text("The job.\tDer Job.\nThe model.\n")

    def spec_with(**change):
        s = s2s_spec(tmp_path / "bad", tiny_marian, "lora")
        for dotted, value in change.items():
            section, field = dotted.split("__")
            s[section][field] = value
        return s

    cases = [
        (spec_with(model__path=tiny_llama), "model.path: kind seq2seq needs an encoder-decoder model"),
        (spec_with(finetune__train_file=str(no_target)), "line 2 has no field 'target'"),
        (spec_with(finetune__valid_file=str(one_column)), "line 2 has 1 tab-separated column(s)"),
        (spec_with(finetune__generation={"num_beams": 0}), "finetune.generation.num_beams: Input should be greater than or equal to 1"),
        (spec_with(finetune__best_metric="rougeL", finetune__metrics=["bleu"]), "finetune.best_metric 'rougeL' is not"),
        (spec_with(finetune__seq_len=64), "kind seq2seq counts source_len and target_len"),
        (spec_with(model__path=None, model__config={"model_type": "llama", "vocab_size": 600},
                   model__tokenizer=tiny_marian, finetune__method="full"), "model.config.model_type: kind seq2seq needs an encoder-decoder"),
    ]
    sft = {"name": "sft", "run_dir": str(tmp_path / "bad"), "task": "finetune", "model": {"path": tiny_marian},
           "finetune": {"kind": "sft", "method": "lora", "train_file": str(DATA / "sft_train.jsonl")},
           "training": {"global_batch": 8, "micro_batch": 4, "steps": 2}}
    cases.append((sft, "model.path: MarianMTModel is an encoder-decoder model: kind sft trains decoder-only"))
    for i, (bad, message) in enumerate(cases):
        r = run_cli("validate", str(write_spec(tmp_path / f"s{i}.yaml", bad)))
        assert r.returncode == 2 and message in r.stderr, (i, r.stdout + r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()
