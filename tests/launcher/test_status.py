"""`hpctrain status` while a run writes its files."""

from __future__ import annotations

import json
import time

from tests.conftest import run_cli


def test_status_reads_metrics_while_the_last_line_is_being_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text("name: x\n")
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 2, "total_steps": 9}))
    done = [json.dumps({"step": s, "loss": 5.0 - s, "time": time.time()}) for s in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(done) + '\n{"step": 3, "loss": 2.')  # mid-write
    r = run_cli("status", str(run))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "last loss: 3.0000 at step 2" in r.stdout, r.stdout
