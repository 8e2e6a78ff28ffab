"""Every trainer process turns on deterministic algorithms (what makes resume bitwise) with
the cuBLAS workspace setting they need on a GPU (without it PyTorch warns on every cuBLAS call
and matrix products may differ between runs); a value the user set is kept. Each case runs in a
fresh interpreter (the setting belongs to the process and must precede any CUDA work)."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, torch
import torch.utils.deterministic
from hpctrain.trainers.entry import deterministic_algorithms
deterministic_algorithms()
print(json.dumps({
    "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    "deterministic": torch.are_deterministic_algorithms_enabled(),
    "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    "fill": torch.utils.deterministic.fill_uninitialized_memory,
}))
"""


def _probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_trainer_sets_deterministic_algorithms_and_the_cublas_workspace():
    out = _probe()
    assert out == {"cublas": ":4096:8", "deterministic": True, "warn_only": True, "fill": False}


@pytest.mark.parametrize("value", [":16:8", ":0:0"])
def test_a_cublas_workspace_the_user_set_is_kept(value):
    out = _probe(CUBLAS_WORKSPACE_CONFIG=value)
    assert out["cublas"] == value
    assert out["deterministic"] is True
