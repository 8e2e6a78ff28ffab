#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv and install hpctrain into it.
#   bash tools/setup.sh [EXTRAS]      e.g. bash tools/setup.sh dev,qlora,examples
# Versions: the exact ones CI tested, from tools/constraints.txt (refresh it with
# bash tools/lock.sh); HPCTRAIN_UNPINNED=1 installs the newest that pyproject.toml allows.
# torch is pinned to the CPU build here (an unpinned torch pulls a multi-GB CUDA
# build); on a GPU machine set HPCTRAIN_TORCH="torch" (or a CUDA pin) before running.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-examples}"
python="${PYTHON:-python3}"
torch_req="${HPCTRAIN_TORCH:-torch==2.13.0}"
venv=".venv"
stamp="$venv/.hpctrain-installed"
pins="pinned"
[ -n "${HPCTRAIN_UNPINNED:-}" ] && pins="unpinned"
key="$(cat pyproject.toml tools/constraints.txt | sha256sum | cut -c1-16) $pins $torch_req"
# Bytecode, written once here: where PYTHONDONTWRITEBYTECODE is set no process writes it, and
# every process would compile its imports from source at each start (docs/install.md)
compile_own() {  # best effort: a read-only checkout still runs, compiling at each start
  "$venv/bin/python" -m compileall -q -j 0 launcher trainers tools >/dev/null 2>&1 \
    || echo "setup: could not write the project's bytecode (read-only checkout?): modules compile at each start" >&2
}
# DeepSpeed's CPU Adam (ZeRO-Offload's optimizer) is a C++ kernel DeepSpeed compiles at its first
# use: built here once, into .venv/torch_extensions, so no run (and no test) stalls on it
build_ops() {
  case ",$extras," in *,deepspeed,*) ;; *) return 0 ;; esac
  ls "$venv"/torch_extensions/cpu_adam/cpu_adam*.so >/dev/null 2>&1 && return 0
  echo "setup: building DeepSpeed's CPU Adam kernel into $venv/torch_extensions (about 2 minutes, once)" >&2
  "$venv/bin/python" -c "from hpctrain.trainers.engines.deepspeed import build_cpu_adam; build_cpu_adam()" >/dev/null 2>&1 \
    || echo "setup: DeepSpeed's CPU Adam did not build here (a compiler missing?): a ZeRO-Offload run builds it at its first step" >&2
}
# a venv already holding these extras (or more) for the same pyproject and lock is reused
if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$key" ]; then
  have="$(sed -n 2p "$stamp")"
  missing=""
  for e in ${extras//,/ }; do
    case ",$have," in *",$e,"*) ;; *) missing=1 ;; esac
  done
  [ -z "$missing" ] && { compile_own; extras="$have"; build_ops; exit 0; }
  extras="$have,$extras"
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
constraints=()
if [ "$pins" = pinned ]; then
  constraints=(-c tools/constraints.txt)
fi
echo "setup: installing $torch_req and hpctrain[$extras] ($pins) into $venv (about 1.5 minutes on a fresh machine)" >&2
# torch through pip: it takes the CPU wheel this machine keeps on disk (uv would download a CUDA build)
"${pip[@]}" "$torch_req"
# the rest through uv (measured: 80 s against pip's 172 s for the same locked set);
# HPCTRAIN_INSTALLER=pip uses pip for everything
if [ "${HPCTRAIN_INSTALLER:-uv}" = uv ] && "${pip[@]}" "$(grep -E '^uv==' tools/constraints.txt || echo uv)"; then
  install=("$venv/bin/uv" pip install -q --compile-bytecode --python "$venv/bin/python")  # pip compiles by default
else
  install=("${pip[@]}")
fi
case ",$extras," in *,deepspeed,*)
  # DeepSpeed's sdist imports torch to build: against this venv's torch, not a downloaded one
  "${install[@]}" --no-build-isolation "${constraints[@]}" "$torch_req" "deepspeed>=0.19,<0.20" ;;
esac
"${install[@]}" "${constraints[@]}" "$torch_req" -e ".[$extras]"
printf '%s\n%s\n' "$key" "$extras" > "$stamp"
compile_own
build_ops
