"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.trainers.helpers import write_spec


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, bpe_tokenizer, bpe_corpus) -> str:
    """A tiny decoder after a short clm pretraining (the export: weights + tokenizer): the SFT base."""
    from tests.trainers.helpers import clm_spec

    d = tmp_path_factory.mktemp("tiny-llama")
    spec = clm_spec(d / "run", bpe_tokenizer, bpe_corpus, training__steps=60, cluster__procs_per_node=1)
    # bitsandbytes' 4-bit CPU kernels want inner dimensions of at least 64
    spec["model"]["config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    r = run_cli("run", str(write_spec(d / "s.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    return str(d / "run" / "export")
