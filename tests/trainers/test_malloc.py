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
for _ in range(24):  # a "step": ten 8 MiB tensors (a step's transients), all freed at its end
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
    # kept: the first steps fault the memory in (the heap grows), later steps mostly reuse it.
    # The heap still grows now and then by a few tensors (small blocks left between the large
    # ones; measured: up to 14,336 pages in steps 9-16 inside the suite, 12,288 in steps 9-24
    # beside two allocating processes), so the bound is on the last sixteen steps together:
    # less than four steps' worth, where an allocator that gives the memory back faults all
    # sixteen steps' worth in again (the environment test below: 20,490 pages every step).
    assert kept["faults"][0] > PAGES_PER_STEP // 2, kept
    assert sum(kept["faults"][8:]) < 4 * PAGES_PER_STEP, kept


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc (Linux) only")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_malloc_settings_from_the_environment_win(env):
    out = _steps("trainer", **env)
    assert out["applied"] is False
    assert min(out["faults"][4:]) > PAGES_PER_STEP // 2, out  # the user's small trim threshold holds
