"""`hpctrain sweep`: one run per grid point, each resumable; the report against the runs' own
metrics; bad points refused before anything runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.rundir import metrics_records
from hpctrain.launcher.sweep import grid, parse_over
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, losses, wait_for, write_spec

WEIGHTS = "data.corpora.0.weight=0.2,0.5,0.8"
POINTS = ["weight=0.2", "weight=0.5", "weight=0.8"]


def test_the_grid_names_each_point_by_its_values():
    over = parse_over(["data.corpora.0.weight=0.2,0.5", "training.lr=1e-3,3e-4"])
    points = grid(over)
    assert [p.name for p in points] == ["weight=0.2,lr=1e-3", "weight=0.2,lr=3e-4", "weight=0.5,lr=1e-3",
                                        "weight=0.5,lr=3e-4"]
    assert points[1].values == {"data.corpora.0.weight": 0.2, "training.lr": 3e-4}
    # two keys ending alike: the whole keys name the point
    both = grid(parse_over(["data.corpora.0.weight=1", "data.corpora.1.weight=2"]))
    assert both[0].name == "data.corpora.0.weight=1,data.corpora.1.weight=2"


@pytest.mark.parametrize(("texts", "message"), [
    ([], "no --over given"),
    (["training.lr"], "bad --over 'training.lr'"),
    (["training.lr=1,,2"], "bad --over"),
    (["training.lr=1,1"], "repeats a value"),
    (["training.lr=1", "training.lr=2"], "names training.lr twice"),
])
def test_bad_over_texts(texts, message):
    with pytest.raises(UserError, match=message):
        parse_over(texts)


def _spec(tmp_path, tok, corpus, **over):
    s = clm_spec(tmp_path / "sweep", tok, corpus, training__steps=8, training__eval_every=4,
                 checkpoint__every_steps=2, cluster__procs_per_node=1, **over)
    s["name"] = "ratio"
    # the domain text's held-out split, and its training split standing in for general text
    s["data"]["corpora"] = [{"path": corpus, "weight": 0.5}, {"path": corpus, "split": "train", "weight": 0.5}]
    s["data"]["validation"] = [{"name": "domain", "path": corpus}, {"name": "general", "path": corpus,
                                                                     "split": "train"}]
    s["monitor"] = {"wandb": {"mode": "disabled"}}
    return write_spec(tmp_path / "sweep.yaml", s)


def _best_and_final(run_dir, name: str) -> tuple[float, int, float]:
    vals = [(r["step"], r[f"val/{name}/loss"]) for r in metrics_records(run_dir) if f"val/{name}/loss" in r]
    best = min(vals, key=lambda x: (x[1], x[0]))
    return best[1], best[0], vals[-1][1]


@pytest.mark.multiproc
def test_a_sweep_of_three_points_reports_the_runs_own_metrics_and_resumes_bitwise(tmp_path, bpe_tokenizer,
                                                                                   bpe_corpus):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    spec = _spec(ref_dir, bpe_tokenizer, bpe_corpus)
    r = run_cli("sweep", str(spec), "--over", WEIGHTS, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    root = ref_dir / "sweep"
    sweep = json.loads((root / "sweep.json").read_text())
    assert [p["name"] for p in sweep["points"]] == POINTS
    assert [p["values"] for p in sweep["points"]] == [{"data.corpora.0.weight": w} for w in (0.2, 0.5, 0.8)]
    for name in POINTS:  # each an ordinary run in its own run dir, sharing a W&B project and group
        frozen = yaml.safe_load((root / name / "spec.yaml").read_text())
        assert frozen["data"]["corpora"][0]["weight"] == float(name.split("=")[1])
        assert frozen["monitor"]["wandb"]["group"] == "ratio" and frozen["monitor"]["wandb"]["project"] == "ratio"
        assert json.loads((root / name / "status.json").read_text())["state"] == "finished"
    assert len({tuple(losses(root / n).values()) for n in POINTS}) == 3  # three blends, three runs

    # the report: every cell from the point's own metrics.jsonl, the best point on each set
    rep = run_cli("sweep", str(spec), "--report")
    assert rep.returncode == 0, rep.stderr
    rows = {line.split()[0]: line.split() for line in rep.stdout.splitlines() if line.startswith("weight=")}
    assert list(rows) == POINTS
    for name in POINTS:
        cells = rows[name]
        assert cells[1:4] == ["finished", "8/8", f"{8 * 8 * 32:,}"]
        for i, vset in enumerate(("domain", "general")):
            best, step, final = _best_and_final(root / name, vset)
            assert cells[4 + 3 * i: 7 + 3 * i] == [f"{best:.4f}", f"({step})", f"{final:.4f}"]
    for vset in ("domain", "general"):
        winner = min(POINTS, key=lambda n: _best_and_final(root / n, vset)[0])
        assert f"best on {vset}: {winner} (loss" in rep.stdout
    assert run_cli("status", str(root)).stdout == rep.stdout  # status of the sweep dir: the same table
    p = run_cli("plot", str(root))
    assert p.returncode == 0 and (root / "plot.png").stat().st_size > 0, p.stderr
    again = run_cli("sweep", str(spec), "--over", WEIGHTS)  # finished points are not run again
    assert again.returncode == 0 and again.stdout.count("already finished") == 3

    # Ctrl-C inside the second point, then the same command: every point as in the uninterrupted sweep
    cut_dir = tmp_path / "cut"
    cut_dir.mkdir()
    spec = _spec(cut_dir, bpe_tokenizer, bpe_corpus)
    cut = cut_dir / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "hpctrain.launcher.cli", "sweep", str(spec), "--over", WEIGHTS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(r.get("step", 0) >= 3 for r in metrics_records(cut / POINTS[1]) if "loss" in r),
             timeout=600, what="step 3 of the second point")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert f"sweep stopped at point {POINTS[1]}: the same command resumes it" in out
    assert not (cut / POINTS[2]).exists()
    r = run_cli("sweep", str(spec), "--over", WEIGHTS, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout
    for name in POINTS:
        assert losses(cut / name) == losses(root / name), name


@pytest.mark.parametrize(("over", "message"), [
    ("data.corpora.0.wieght=0.2,0.5", "point wieght=0.2: data.corpora.0.wieght: unknown key\n  hint: did you mean 'weight'?"),
    ("data.corpora.0.weight=0.2,lots", "point weight=lots: data.corpora.0.weight: Input should be a valid number"),
    ("training.micro_batch=2,3", "point micro_batch=3: training.micro_batch"),
    ("data.corpora.5.weight=1,2", "--over data.corpora.5.weight: no item 5 in a list of 2"),
])
def test_a_bad_point_stops_the_sweep_before_anything_runs(tmp_path, bpe_tokenizer, bpe_corpus, over, message):
    spec = _spec(tmp_path, bpe_tokenizer, bpe_corpus)
    r = run_cli("sweep", str(spec), "--over", over)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("unknown key") <= 1  # said once, not once per point
    assert not (tmp_path / "sweep").exists()


@pytest.mark.multiproc
def test_the_ratio_sweep_example_runs_as_its_comments_say(tmp_path):
    """examples/ratio_sweep.yaml on the shipped domain and general text (shortened to 6 steps)."""
    from tests.conftest import REPO

    data = REPO / "examples" / "data"
    tok, dom, gen = tmp_path / "tok", tmp_path / "corpus-domain", tmp_path / "corpus-general"
    r = run_cli("tokenizer", "train", str(data / "domain.txt"), str(data / "general.txt"), "--vocab-size", "2000",
                "--out", str(tok))
    assert r.returncode == 0, r.stderr
    for text, out in (("domain.txt", dom), ("general.txt", gen)):
        r = run_cli("prepare", str(data / text), "--tokenizer", str(tok), "--out", str(out), "--valid-fraction", "0.1",
                    "--quiet")
        assert r.returncode == 0, r.stderr
    paths = ["--set", f"run_dir={tmp_path / 'runs'}", "--set", f"model.tokenizer={tok}",
             "--set", f"data.corpora.0.path={dom}", "--set", f"data.corpora.1.path={gen}",
             "--set", f"data.validation.0.path={dom}", "--set", f"data.validation.1.path={gen}",
             "--set", "training.steps=6", "--set", "training.eval_every=3"]
    spec = str(REPO / "examples" / "ratio_sweep.yaml")
    r = run_cli("sweep", spec, *paths, "--over", "data.corpora.0.weight=0.2,0.35,0.5", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = run_cli("sweep", spec, *paths, "--report").stdout
    assert [line.split()[1] for line in rep.splitlines() if line.startswith("weight=")] == ["finished"] * 3
    assert "best on domain: weight=" in rep and "best on general: weight=" in rep
