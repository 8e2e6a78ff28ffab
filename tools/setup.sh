#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv and install hpctrain into it.
#   bash tools/setup.sh [EXTRAS]      e.g. bash tools/setup.sh dev,qlora,examples
# torch is pinned to the CPU build here (an unpinned torch pulls a multi-GB CUDA
# build); on a GPU machine set HPCTRAIN_TORCH="torch" (or a CUDA pin) before running.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-examples}"
python="${PYTHON:-python3}"
torch_req="${HPCTRAIN_TORCH:-torch==2.13.0}"
venv=".venv"
stamp="$venv/.hpctrain-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $extras $torch_req"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
echo "setup: installing $torch_req and hpctrain[$extras] into $venv (about 2 minutes on a fresh machine)" >&2
"${pip[@]}" "$torch_req"
"${pip[@]}" "$torch_req" -e ".[$extras]"
echo "$want" > "$stamp"
