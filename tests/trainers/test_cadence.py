"""`checkpoint.every_minutes: auto`: the Young-Daly interval sqrt(2 C MTBF) from what a save
measured to cost and the run's interruptions. A real 1-rank run saves after its first step to
measure C, then on the interval it logs with its inputs; stopped and resumed, it counts the
interruption and takes C from its last logged save."""

from __future__ import annotations

import json
import math

from hpctrain.launcher.contract.spec import spec_from_dict
from hpctrain.trainers.cadence import Cadence, last_logged_save_s
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, metrics_records, stop_with_ctrl_c, write_spec

SLOW = {"HPCTRAIN_FAULT_SLOW_STEP_S": "0.25"}


def auto_spec(run, tok, corpus) -> dict:
    return clm_spec(run, tok, corpus, training__steps=24, training__log_every=1, training__eval_every=None,
                    checkpoint__every_steps=None, checkpoint__every_minutes="auto", checkpoint__mtbf_hours=0.03,
                    cluster__procs_per_node=1)


def test_the_interval_is_young_daly_and_only_rank_0_decides(tmp_path):
    cfg = spec_from_dict(auto_spec(tmp_path, "t", "c")).checkpoint
    main, other = Cadence(cfg, deciding=True), Cadence(cfg, deciding=False)
    assert main.due(1, last_save=0.0) and not other.due(1, last_save=0.0)  # nothing measured: save to measure
    assert "(1 + 0 interruption(s))" in main.saved(1, cost_s=2.0)
    assert math.isclose(main.interval_s, math.sqrt(2 * 2.0 * 0.03 * 3600))
    main.interruptions = 3
    main.saved(1, cost_s=2.0)
    assert math.isclose(main.interval_s, math.sqrt(2 * 2.0 * 0.03 * 3600 / 4))
    metrics = tmp_path / "metrics.jsonl"
    assert last_logged_save_s(metrics) is None
    metrics.write_text('{"step": 3, "ckpt_save_s": 0.5}\n{"step": 4, "loss": 1.0}\nnot json\n')
    assert last_logged_save_s(metrics) == 0.5


def test_a_run_saves_on_the_interval_it_logs_and_counts_its_interruptions(tmp_path, bpe_tokenizer, bpe_corpus):
    run = tmp_path / "run"
    path = write_spec(tmp_path / "s.yaml", auto_spec(run, bpe_tokenizer, bpe_corpus))
    r = run_cli("run", str(path), env=SLOW)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checkpoint cadence: every " in r.stdout and "(1 + 0 interruption(s))" in r.stdout, r.stdout
    recs = metrics_records(run)
    saves = {x["step"]: x["ckpt_save_s"] for x in recs if "ckpt_save_s" in x}
    chosen = [x for x in recs if "ckpt_interval_s" in x]
    assert min(saves) == 1 and 3 <= len(saves) < 20, saves  # 24 steps of >= 0.25 s, an interval of seconds
    for x in chosen:
        assert x["ckpt_cost_s"] == saves[max(s for s in saves if s <= x["step"])]
        assert math.isclose(x["ckpt_interval_s"], math.sqrt(2 * x["ckpt_cost_s"] * x["mtbf_h"] * 3600), rel_tol=1e-2)
        assert x["interruptions"] == 0 and x["mtbf_h"] >= 0.03

    again = tmp_path / "again"
    path = write_spec(tmp_path / "again.yaml", auto_spec(again, bpe_tokenizer, bpe_corpus))
    stopped = stop_with_ctrl_c(path, again, 6)
    last_cost = [x["ckpt_save_s"] for x in metrics_records(again) if "ckpt_save_s" in x][-1]
    r = run_cli("run", str(path), env=SLOW)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    assert "(1 + 1 interruption(s))" in r.stdout, r.stdout
    resumed = [x for x in metrics_records(again) if "ckpt_interval_s" in x and x["interruptions"] == 1]
    # chosen at the first step after the resume, from the save the stop wrote: none needed to measure C
    assert resumed and resumed[0]["step"] == stopped + 1 and resumed[0]["ckpt_cost_s"] == last_cost
    x = resumed[0]
    assert math.isclose(x["ckpt_interval_s"], math.sqrt(2 * x["ckpt_cost_s"] * x["mtbf_h"] * 3600), rel_tol=1e-2)
    assert json.loads((again / "status.json").read_text())["attempts"] == 2
