#!/usr/bin/env bash
# Refresh tools/constraints.txt: install hpctrain with every extra, unpinned, into a
# fresh venv and record the exact versions that resolved. Run the test suite after it
# (bash tools/test.sh) and commit the new file only when the suite passes.
#   bash tools/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
torch_req="${HPCTRAIN_TORCH:-torch==2.13.0}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install --disable-pip-version-check -q)
echo "lock: resolving hpctrain[dev,qlora,examples,deepspeed,wandb,plot] unpinned (about 2 minutes)" >&2
"${pip[@]}" "$torch_req"
"${pip[@]}" --no-build-isolation "$torch_req" "deepspeed>=0.19,<0.20"
"${pip[@]}" "$torch_req" ".[dev,qlora,examples,deepspeed,wandb,plot]"
{
  echo "# Exact versions CI tested (Python 3.11, CPU): tools/setup.sh installs with '-c' this file."
  echo "# Refresh: bash tools/lock.sh   (a fresh unpinned install of every extra, then pip freeze)."
  echo "# torch is pinned by tools/setup.sh itself (HPCTRAIN_TORCH), so it is not listed here."
  { "$tmp/venv/bin/python" -m pip freeze --disable-pip-version-check; echo "uv==$("$tmp/venv/bin/python" -m pip install -q uv && "$tmp/venv/bin/uv" --version | cut -d" " -f2)"; } | grep -v -i -E '^(hpctrain|torch)(==| @)'
} > tools/constraints.txt.new
mv tools/constraints.txt.new tools/constraints.txt
echo "lock: wrote tools/constraints.txt ($(grep -vc '^#' tools/constraints.txt) packages); now run bash tools/test.sh" >&2
