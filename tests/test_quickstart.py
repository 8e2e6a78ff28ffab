"""The quickstart as a new user runs it: `bash tools/quickstart.sh` and the console it prints."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.multiproc


def test_quickstart_console_is_readable(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", "tools/quickstart.sh"], cwd=REPO, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "HPCTRAIN_QUICKSTART_OUT": str(out)})
    console = r.stdout + r.stderr
    assert r.returncode == 0, console
    lines = console.splitlines()
    for noise in ("LOAD REPORT", "Traceback", "Warning", "seem corrupted"):
        assert not [x for x in lines if noise in x], f"{noise!r} on the console:\n{console}"
    for stage in ("pretrain", "classify"):
        assert console.count(f"done: minilm-domain-{stage} trained 40 steps") == 1, console
        assert console.count(f"minilm-domain-{stage}: ") == 1, console  # the stage's start summary
        assert console.count("step 40/40") == 2
    # freshly initialized heads: one line each, saying what and why
    assert console.count("initialized fresh") == 2
    assert "cls.predictions" in console and "classifier" in console
    # every rank's full output stays in its rank log
    logs = sorted((out / "runs/minilm-domain/pretrain/logs").rglob("stderr.log"))
    assert len(logs) == 2
    texts = [p.read_text() for p in logs]
    assert any("LOAD REPORT" in t for t in texts)
    assert any("step 40/40" in t for t in texts)  # rank 0's console lines are echoed into its log
    assert '"accuracy"' in console and '"examples": 60' in console
