#!/usr/bin/env bash
# Set up the venv with every test extra, make sure the local Slurm cluster runs
# (started here, as root, when Slurm is absent; stopped again at the end), and run
# the whole test suite.
#   bash tools/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh dev,qlora,examples,deepspeed,wandb,plot
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check --quiet .

if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then  # slurm/start.sh installs it with Slurm
  echo "test: installing bubblewrap (the stand-in container runtime of the Slurm tests)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } ||
    echo "test: bubblewrap did not install; the container test will fail" >&2
fi
started_slurm=""
state="${HPCTRAIN_SLURM_STATE:-/tmp/hpctrain-slurm}"
if ! sinfo -h >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "test: starting the local Slurm cluster (slurm/start.sh $state)" >&2
    if bash slurm/start.sh "$state"; then
      started_slurm=1
    else
      echo "test: the local Slurm cluster did not start; Slurm tests will skip (or fail under CI)" >&2
    fi
  else
    echo "test: no Slurm and not root: Slurm tests will skip (or fail under CI)" >&2
  fi
fi
stop_slurm() { [ -n "$started_slurm" ] && bash slurm/stop.sh "$state" >/dev/null || true; }
trap stop_slurm EXIT
# three pytest-xdist workers on the two cores, a test module at a time on each (its module
# fixtures run once; the Slurm modules take turns, tests/slurm/conftest.py). Two workers left
# 15% of the cores idle (383 of 2,589 CPU-s: runs importing, Slurm scheduling, the deadline
# test's idle minute); a third fills most of it: 128 idle (docs/testing.md). Together the
# workers' ranks run more OpenMP threads than there are cores, and a thread that spin-waits
# after each parallel region burns a core another worker needs: passive waiting
# (test_pretrain.py + test_failures.py on two workers: 374 s spinning, 338 s passive)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
.venv/bin/python -m pytest -n 3 --dist loadfile "$@"
