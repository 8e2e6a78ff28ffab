#!/usr/bin/env bash
# Start a real three-node Slurm cluster on this machine: munged, slurmctld and
# `slurmd -N n1` / `-N n2` / `-N n3` on their own ports at 127.0.0.1 (two-node jobs, and a
# third node to land on when a job leaves a bad one out).
#   sudo bash slurm/start.sh [STATE_DIR]      (default: /tmp/hpctrain-slurm)
# Idempotent: daemons already running from STATE_DIR are left alone. Installs
# Debian's slurm-wlm and munge when missing (root), and bubblewrap, the stand-in container
# runtime of cluster.container (runtime: bubblewrap). Stop with slurm/stop.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${1:-${HPCTRAIN_SLURM_STATE:-/tmp/hpctrain-slurm}}"
[ "$(id -u)" = 0 ] || { echo "slurm/start.sh: needs root (daemons run as root here)" >&2; exit 2; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v bwrap >/dev/null; then
  echo "slurm/start.sh: installing slurm-wlm, munge and bubblewrap from Debian" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge bubblewrap >/dev/null
fi
nodes="n1 n2 n3"
for n in $nodes; do
  mkdir -p "$state/spool-$n"
  grep -qE "(^|\s)$n(\s|$)" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
done
mkdir -p "$state"/{ctld,run,log,munge}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: its own key and socket under STATE, so nothing system-wide is touched
if [ ! -f "$state/munge/munge.key" ]; then
  dd if=/dev/urandom of="$state/munge/munge.key" bs=1 count=1024 status=none
  chmod 400 "$state/munge/munge.key"
fi
sock=/run/munge/munge.socket.2   # where Slurm's auth/munge looks by default
mkdir -p /run/munge /var/log/munge /var/lib/munge
if ! alive "$state/run/munged.pid"; then
  munged --force --key-file="$state/munge/munge.key" --socket="$sock" \
    --pid-file="$state/run/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/seed"
fi

# process tracking: linuxproc (default) or cgroup (cgroup/v1, nothing constrained: it only
# tracks a job's processes, as on clusters where a signal reaches the node task alone)
proctrack="${HPCTRAIN_SLURM_PROCTRACK:-linuxproc}"
case "$proctrack" in linuxproc|cgroup) ;; *)
  echo "slurm/start.sh: HPCTRAIN_SLURM_PROCTRACK must be linuxproc or cgroup, not '$proctrack'" >&2; exit 2;;
esac
# task placement: affinity (default) binds every task to the CPUs Slurm gave it, as the
# task/affinity and task/cgroup plugins of most clusters do; none binds nothing
taskplugin="${HPCTRAIN_SLURM_TASK_PLUGIN:-affinity}"
case "$taskplugin" in affinity|none) ;; *)
  echo "slurm/start.sh: HPCTRAIN_SLURM_TASK_PLUGIN must be affinity or none, not '$taskplugin'" >&2; exit 2;;
esac
cpus="${HPCTRAIN_SLURM_CPUS:-2}"
layout="proctrack/$proctrack task/$taskplugin cpus=$cpus nodes=$nodes"
if [ "$(cat "$state/layout" 2>/dev/null)" != "$layout" ]; then
  echo "slurm/start.sh: switching to $layout: restarting the Slurm daemons" >&2
  for name in slurmd-n1 slurmd-n2 slurmd-n3 slurmctld; do
    f="$state/run/$name.pid"
    if alive "$f"; then
      pid=$(cat "$f"); kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
fi
echo "$layout" > "$state/layout"
echo "$proctrack" > "$state/proctrack"
if [ "$proctrack" = cgroup ]; then
  cat > "$state/cgroup.conf" <<'CG'
CgroupPlugin=cgroup/v1
CgroupAutomount=yes
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainSwapSpace=no
ConstrainDevices=no
CG
fi

conf="$state/slurm.conf"
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
sed -e "s|@HOST@|$(hostname -s)|" -e "s|@STATE@|$state|g" -e "s|@CTLD_PORT@|${HPCTRAIN_SLURM_PORT:-16817}|" \
    -e "s|@N1_PORT@|17001|" -e "s|@N2_PORT@|17002|" -e "s|@N3_PORT@|17003|" -e "s|@CPUS@|$cpus|g" -e "s|@TASKPLUGIN@|$taskplugin|" -e "s|@MEM@|$mem|g" \
    -e "s|@PROCTRACK@|$proctrack|" \
    "$here/slurm.conf.template" > "$conf.new"
mv "$conf.new" "$conf"
# Slurm's commands read /etc/slurm/slurm.conf; point it at ours unless another cluster owns it.
mkdir -p /etc/slurm
if [ -e /etc/slurm/slurm.conf ] && ! grep -q "hpctrain local development cluster" /etc/slurm/slurm.conf; then
  echo "slurm/start.sh: /etc/slurm/slurm.conf belongs to another cluster; export SLURM_CONF=$conf" >&2
else
  ln -sf "$conf" /etc/slurm/slurm.conf
fi
export SLURM_CONF="$conf"

alive "$state/run/slurmctld.pid" || slurmctld -f "$conf"
for n in $nodes; do
  alive "$state/run/slurmd-$n.pid" || slurmd -f "$conf" -N "$n"
done

for _ in $(seq 1 60); do
  if sinfo -h -o '%n %t' 2>/dev/null | awk '$2 ~ /^idle|^mix|^alloc/ {c++} END {exit !(c==3)}'; then
    scontrol update nodename=n1,n2,n3 state=resume >/dev/null 2>&1 || true
    echo "slurm: cluster up (state $state); nodes:"; sinfo -N -o '  %N %t %c cpus' -h
    exit 0
  fi
  scontrol update nodename=n1,n2,n3 state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm/start.sh: nodes did not come up; see $state/log/" >&2
sinfo -N >&2 || true
exit 1
