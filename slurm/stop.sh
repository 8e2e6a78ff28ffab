#!/usr/bin/env bash
# Stop only the daemons slurm/start.sh started (by their pid files in STATE_DIR).
#   bash slurm/stop.sh [STATE_DIR]
set -uo pipefail
state="${1:-${HPCTRAIN_SLURM_STATE:-/tmp/hpctrain-slurm}}"
for name in slurmd-n1 slurmd-n2 slurmd-n3 slurmctld munged; do
  f="$state/run/$name.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$f"
done
echo "slurm: stopped (state kept in $state)"
