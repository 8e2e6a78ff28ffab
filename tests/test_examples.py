"""Every shipped example spec validates (a spec in examples/ that rots fails CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.spec import load_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.total_steps > 0


def test_there_are_examples():
    assert EXAMPLES
