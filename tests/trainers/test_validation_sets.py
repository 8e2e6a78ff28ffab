"""Several named validation sets (`data.validation` as a list): each evaluated, logged, shown,
plotted, and the same through a preemption; bad lists refused before anything runs."""

from __future__ import annotations

import pytest

from hpctrain.launcher.contract.rundir import metrics_records
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, losses, stop_with_ctrl_c, write_spec

STEPS = 12


def _spec(run, tok, corpus, **over):
    s = clm_spec(run, tok, corpus, training__steps=STEPS, training__eval_every=4, checkpoint__every_steps=4, **over)
    # the domain text's held-out split, and its training split standing in for general text
    s["data"]["validation"] = [{"name": "domain", "path": corpus}, {"name": "general", "path": corpus,
                                                                     "split": "train"}]
    return s


def _evaluations(run) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("val")}
            for r in metrics_records(run) if any(k.startswith("val/") for k in r)}


@pytest.mark.multiproc
def test_every_set_is_evaluated_logged_shown_and_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus):
    ref = tmp_path / "ref"
    r = run_cli("run", str(write_spec(tmp_path / "ref.yaml", _spec(ref, bpe_tokenizer, bpe_corpus))), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want = _evaluations(ref)
    assert sorted(want) == [4, 8, 12]
    for rec in want.values():
        assert set(rec) == {"val/domain/loss", "val/domain/ppl", "val/general/loss", "val/general/ppl"}
        assert rec["val/domain/loss"] != rec["val/general/loss"]  # two sets, two losses
    assert any(line.startswith("  validation: domain loss ") and "; general loss " in line
               for line in r.stdout.splitlines())

    s = run_cli("status", str(ref))
    last = want[12]
    assert (f"validation at step 12: domain loss {last['val/domain/loss']:.4f}; "
            f"general loss {last['val/general/loss']:.4f}") in s.stdout

    p = run_cli("plot", str(ref), "--out", str(tmp_path / "sets.png"))
    assert p.returncode == 0 and (tmp_path / "sets.png").stat().st_size > 0, p.stderr

    cut = tmp_path / "cut"
    path = write_spec(tmp_path / "cut.yaml", _spec(cut, bpe_tokenizer, bpe_corpus))
    stopped = stop_with_ctrl_c(path, cut, at_step=5)
    r = run_cli("run", str(path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = _evaluations(cut)
    assert {s: got[s] for s in want if s > stopped} == {s: want[s] for s in want if s > stopped}
    assert [losses(cut)[s] for s in range(stopped + 1, STEPS + 1)] == [
        losses(ref)[s] for s in range(stopped + 1, STEPS + 1)]


@pytest.mark.parametrize(("sets", "message"), [
    ([{"name": "d", "path": "X"}, {"name": "d", "path": "X"}],
     "data: two validation sets are named 'd' (data.validation.0 and data.validation.1): names must differ"),
    ([{"path": "X"}], "data.validation.0.name: missing (expected the set's name"),
    ([{"name": "a/b", "path": "X"}], "data.validation.0.name: String should match pattern"),
    ([], "data.validation is an empty list"),
    ([{"name": "d", "path": "/nonexistent/corpus"}], "data.validation.0.path"),
])
def test_bad_validation_lists_are_refused_naming_the_field(tmp_path, bpe_tokenizer, bpe_corpus, sets, message):
    s = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)
    s["data"]["validation"] = [{**x, "path": bpe_corpus if x["path"] == "X" else x["path"]} for x in sets]
    spec = write_spec(tmp_path / "s.yaml", s)
    for verb in ("validate", "run"):
        r = run_cli(verb, str(spec))
        assert r.returncode == 2, r.stdout + r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.multiproc
def test_fine_tuning_evaluates_every_named_file_and_keeps_the_best_of_the_one_named(tmp_path, tiny_bert):
    from tests.trainers.helpers import DATA, cls_spec

    s = cls_spec(tmp_path / "run", tiny_bert, merge=False, best_metric="val/heldout/f1",
                 valid_file=[{"name": "heldout", "path": str(DATA / "classify_valid.csv")},
                             {"name": "seen", "path": str(DATA / "classify_train.csv")}])
    s["training"].update(steps=20, eval_every=10)
    s["cluster"]["procs_per_node"] = 1
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", s)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    evals = _evaluations(tmp_path / "run")
    assert sorted(evals) == [10, 20]
    for rec in evals.values():
        assert set(rec) == {f"val/{n}/{k}" for n in ("heldout", "seen") for k in ("loss", "accuracy", "f1")}
    assert any(line.startswith("  validation: heldout val_loss ") and "; seen val_loss " in line
               for line in r.stdout.splitlines())
    best = max(evals, key=lambda step: (evals[step]["val/heldout/f1"], -step))
    assert f"new best val/heldout/f1 {evals[best]['val/heldout/f1']:.4f}" in r.stdout
    assert (tmp_path / "run" / "best" / "adapter_config.json").is_file()


@pytest.mark.parametrize(("finetune", "message"), [
    ({"best_metric": "val/other/f1", "valid_file": [{"name": "a", "path": "V"}]},
     "finetune.best_metric 'val/other/f1' is not a metric of this run (one of val/a/loss, val/a/accuracy, val/a/f1)"),
    ({"valid_file": [{"name": "a", "path": "V"}, {"name": "a", "path": "V"}]}, "two validation files are named 'a'"),
    ({"valid_file": [{"name": "a", "path": "/nonexistent.csv"}]}, "finetune.valid_file.0.path: file not found"),
    ({"best_metric": "accuracy", "kind": "sft"}, "is not a metric of this run (one of val_loss)"),
])
def test_bad_validation_files_are_refused_naming_the_field(tmp_path, finetune, message):
    from tests.trainers.helpers import DATA, cls_spec

    over = {k: ([{**x, "path": str(DATA / "classify_valid.csv") if x["path"] == "V" else x["path"]} for x in v]
                if k == "valid_file" else v) for k, v in finetune.items()}
    s = cls_spec(tmp_path / "run", **over)
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", s)))
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
