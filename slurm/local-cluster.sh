#!/usr/bin/env bash
# A real one-machine SLURM for tests and trying things out: munged, slurmctld and slurmd on
# this host, configuration and state under one temporary folder.
#
#   bash slurm/local-cluster.sh start    # install if missing, configure, start, wait for "idle"
#   eval "$(bash slurm/local-cluster.sh env)"   # export SLURM_CONF for sbatch/squeue/scontrol
#   bash slurm/local-cluster.sh status   # daemons, node and partition state
#   bash slurm/local-cluster.sh stop     # end exactly the daemons `start` started (pid files)
#
# Needs root (apt-get and the daemons). `start` installs the Debian packages slurm-wlm, munge
# and shellcheck when they are missing, and does nothing if the cluster already runs.
# The node "$(hostname)" has this machine's cores and 8 fake GPUs (empty files in dev/, so jobs
# see SLURM_GPUS_ON_NODE); partition "fake" holds 128 CLOUD nodes x 8 GPUs that only
# `sbatch --test-only` may use (a job really submitted there waits forever).
# SCALETRAIN_SLURM_DIR (default /tmp/scaletrain-slurm) moves the folder.
set -euo pipefail

DIR="${SCALETRAIN_SLURM_DIR:-/tmp/scaletrain-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
PIDS=(munged slurmctld slurmd)

log() { echo "local-cluster: $*" >&2; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache policy slurm-wlm | grep -q 'Candidate: [0-9]'; then
    apt-get update -q >/dev/null
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

pid_alive() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

write_config() {
  local cpus mem_mb
  # nproc obeys OMP_NUM_THREADS: started from a shell that pins it to 1 (as the tests' ranks
  # do), the node would declare 1 CPU and a job asking for 2 would never start.
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
  mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
  mkdir -p "$DIR"/{state,spool,log,munge,dev}
  chmod 700 "$DIR/munge"
  for i in 0 1 2 3 4 5 6 7; do : >"$DIR/dev/nvidia$i"; done
  cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: one machine, controller and compute node on $HOST.
ClusterName=scaletrain
SlurmctldHost=$HOST
SlurmUser=root
SlurmctldPort=${SCALETRAIN_SLURMCTLD_PORT:-6817}
SlurmdPort=${SCALETRAIN_SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to 'scontrol show job' (and 'scaletrain launch status') for a day.
MinJobAge=86400
KillWait=30
InactiveLimit=0
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb Gres=gpu:8 State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
NodeName=fake[001-128] CPUs=96 RealMemory=1000000 Gres=gpu:8 State=CLOUD
PartitionName=fake Nodes=fake[001-128] MaxTime=INFINITE State=UP
EOF
  echo "NodeName=$HOST Name=gpu File=$DIR/dev/nvidia[0-7]" >"$DIR/gres.conf"
}

wait_idle() {
  local state=""
  for _ in $(seq 1 120); do
    state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
    [[ "$state" == "idle" ]] && return 0
    sleep 0.5
  done
  log "node $HOST is '$state', not idle after 60 s; see $DIR/log/"
  return 1
}

start() {
  export SLURM_CONF="$CONF"
  if pid_alive slurmctld && pid_alive slurmd && pid_alive munged; then
    wait_idle
    log "already running (SLURM_CONF=$CONF)"
    return 0
  fi
  install_packages
  stop_daemons quiet
  write_config
  if [[ ! -f "$DIR/munge/munge.key" ]]; then
    mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
  fi
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  slurmctld -c -f "$CONF" # -c: a clean start, no jobs from an earlier cluster
  slurmd -f "$CONF"
  wait_idle
  log "running: node $HOST idle (SLURM_CONF=$CONF)"
}

stop_daemons() {
  local name pid
  for name in slurmd slurmctld munged; do
    [[ -f "$DIR/$name.pid" ]] || continue
    pid="$(cat "$DIR/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      [[ "${1:-}" == quiet ]] || log "stopped $name ($pid)"
    fi
    rm -f "$DIR/$name.pid"
  done
}

status() {
  local name rc=0
  for name in "${PIDS[@]}"; do
    if pid_alive "$name"; then
      echo "$name: running (pid $(cat "$DIR/$name.pid"))"
    else
      echo "$name: not running"
      rc=3
    fi
  done
  if ((rc == 0)); then
    echo "SLURM_CONF=$CONF"
    SLURM_CONF="$CONF" sinfo -o '%P %a %D %T %N %G'
  fi
  return "$rc"
}

case "${1:-}" in
  start) start ;;
  stop) stop_daemons ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
