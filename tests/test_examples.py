"""Every shipped example spec validates (a spec in examples/ that rots fails CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpctrain.launcher.contract.spec import load_spec, load_spec_dict
from hpctrain.launcher.pipeline import is_pipeline, load_pipeline

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_spec_is_valid(path):
    data = load_spec_dict(path)
    specs = [s for _, s in load_pipeline(data, str(path), [])] if is_pipeline(data) else [load_spec(path)]
    assert specs and all(s.total_steps > 0 for s in specs)


def test_there_are_examples():
    assert len(EXAMPLES) >= 3
