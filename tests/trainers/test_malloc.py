"""The trainer keeps the memory a step frees for the next step (`keep_freed_memory`): a step
that allocates and frees the same large tensors again does not fault its pages in again, unless
the user tuned malloc in the environment, which the trainer then leaves alone. Each case runs
in a fresh interpreter (malloc's settings belong to the process)."""

import json
import os
import subprocess
import sys

import pytest

STEPS = r"""
import json, resource, sys, torch
from hpctrain.trainers.entry import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "trainer" else None
faults = []
for _ in range(16):  # a "step": ten 8 MiB tensors (a step's transients), all freed at its end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step = [torch.ones(2 << 20) for _ in range(10)]
    del step
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
PAGES_PER_STEP = 10 * (8 << 20) // 4096  # 20,480 pages of 4 KiB


def _steps(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", STEPS, mode], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc (Linux) only")
def test_later_steps_reuse_the_memory_earlier_steps_freed():
    # (glibc's defaults usually fault 20,448 pages per step here, for good, but not always: its
    # thresholds adapt to the process's history; a fixed small trim threshold always does, below)
    kept = _steps("trainer")
    assert kept["applied"] is True
    # kept: the first steps fault the memory in (the heap grows), later steps only reuse it. The
    # heap can grow for a few steps more, a tensor or three at a time (small blocks left between
    # the large ones; how many differs from run to run: once at the 7th step under CI's load), so
    # the bound is on the last eight steps together: less than half of what a step that faults
    # its transients in again costs alone.
    assert kept["faults"][0] > PAGES_PER_STEP // 2, kept
    assert sum(kept["faults"][8:]) < PAGES_PER_STEP // 2, kept


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc (Linux) only")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_malloc_settings_from_the_environment_win(env):
    out = _steps("trainer", **env)
    assert out["applied"] is False
    assert min(out["faults"][4:]) > PAGES_PER_STEP // 2, out  # the user's small trim threshold holds
