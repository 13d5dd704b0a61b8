#!/usr/bin/env bash
# A throw-away single-node Slurm on this machine (Debian 12: packages slurm-wlm and munge,
# `bash scripts/setup.sh slurm`), for tests/python/test_slurm.py and for trying the recipes
# of docs/scale-out.md.
#
#   bash scripts/slurm-local.sh start    # starts munged, slurmctld, slurmd; waits until the node is idle
#   bash scripts/slurm-local.sh status   # sinfo/squeue; exit 0 when running, 1 when not
#   bash scripts/slurm-local.sh stop     # cancels jobs, stops the daemons, removes the folder
#
# Everything lives in one folder, $SLURM_LOCAL_DIR (default /tmp/gstvae-slurm): slurm.conf, the
# munge key, sockets, pid files, logs, state and spool. Nothing under /etc is read or written.
# The daemons run as root (sudo when not root). One node (this host, `hostname -s`, CPUs from
# nproc), one default partition, no accounting, no cgroups (containers often lack them).
#
# Clients need SLURM_CONF. `start` prints `export SLURM_CONF=...` on stdout (its log goes to
# stderr) and writes the same line to $SLURM_LOCAL_DIR/env:
#
#   eval "$(bash scripts/slurm-local.sh start)"      # or: . /tmp/gstvae-slurm/env
#   sbatch --wait --wrap hostname
#
# Both `start` and `stop` may be run twice: `start` on a running instance only waits for the node
# and prints the line again; `stop` with nothing running only cleans up.
#
# Environment:
#   SLURM_LOCAL_DIR      the folder (default /tmp/gstvae-slurm)
#   SLURM_LOCAL_PORT     slurmctld port (default 16817; slurmd uses the next one). Not 6817/6818,
#                        so a system Slurm on the same machine is not disturbed.
#   SLURM_LOCAL_TIMEOUT  seconds `start` waits for the node to be idle (default 60)
#   SLURM_LOCAL_MEMORY   RealMemory of the node in MB (default 1024, or less when the machine has less)
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/gstvae-slurm}"
PORT="${SLURM_LOCAL_PORT:-16817}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/sock/munge.socket"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "$DIR" in
  /*) ;;
  *) die "SLURM_LOCAL_DIR must be an absolute path (got '$DIR')" ;;
esac
if [ "$DIR" = "/" ]; then die "SLURM_LOCAL_DIR must not be /"; fi

export SLURM_CONF="$CONF"

# ------------------------------------------------------------------ helpers

# The pid in a pid file if that process is alive and is the named program, else nothing (and
# status 1). A zombie counts as dead: in a container, PID 1 may not reap daemons.
live_pid() {
  local f="$1" name="$2" pid state comm
  [ -f "$f" ] || return 1
  pid="$($SUDO cat "$f" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/stat" ] || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  [ "$comm" = "$name" ] || return 1
  state="$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1 || true)"
  case "$state" in Z | X | x | "") return 1 ;; esac
  echo "$pid"
}

munged_pid() { live_pid "$DIR/run/munged.pid" munged; }
slurmctld_pid() { live_pid "$DIR/run/slurmctld.pid" slurmctld; }
slurmd_pid() { live_pid "$DIR/run/slurmd.pid" slurmd; }

node_name() { hostname -s; }

node_state() {
  sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n 1 || true
}

print_logs() {
  local f
  for f in "$DIR/log/munged.log" "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log"; do
    if [ -f "$f" ]; then
      echo "----- $f (last 40 lines) -----" >&2
      $SUDO tail -n 40 "$f" >&2 || true
    else
      echo "----- $f: not written -----" >&2
    fi
  done
  if [ -f "$CONF" ]; then
    echo "----- sinfo -R -----" >&2
    sinfo -R >&2 2>&1 || true
  fi
}

# True when a process has exited (or is a zombie).
gone() {
  local state
  state="$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1 || true)"
  case "$state" in Z | X | x | "") return 0 ;; esac
  return 1
}

# Sends a signal to a pid from a pid file and waits up to $3 seconds for it to exit; SIGKILL after.
stop_pid() {
  local name="$1" pid="$2" wait_s="${3:-10}" i
  log "stopping $name (pid $pid)"
  $SUDO kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < wait_s * 10; i++)); do
    gone "$pid" && return 0
    sleep 0.1
  done
  log "$name (pid $pid) did not exit in ${wait_s} s; SIGKILL"
  $SUDO kill -KILL "$pid" 2>/dev/null || true
}

# slurmstepd processes of this instance only: named slurmstepd and started with our SLURM_CONF
# (slurmd passes its environment on). They outlive slurmd when a job is still running.
our_stepds() {
  local p comm
  for p in /proc/[0-9]*; do
    comm="$(cat "$p/comm" 2>/dev/null || true)"
    [ "$comm" = "slurmstepd" ] || continue
    if $SUDO tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
      echo "${p#/proc/}"
    fi
  done
}

is_running() {
  [ -f "$CONF" ] && munged_pid >/dev/null && slurmctld_pid >/dev/null && slurmd_pid >/dev/null
}

print_env() {
  echo "export SLURM_CONF=$CONF"
}

# ------------------------------------------------------------------ stop

do_stop() {
  local pid i
  if [ -f "$CONF" ] && slurmctld_pid >/dev/null; then
    # Cancel this instance's jobs first, so that their processes end with them.
    if [ -n "$(squeue -h -o %i 2>/dev/null || true)" ]; then
      log "cancelling running jobs"
      $SUDO env SLURM_CONF="$CONF" scancel --full --signal=KILL --state=RUNNING 2>/dev/null || true
      $SUDO env SLURM_CONF="$CONF" scancel --state=PENDING 2>/dev/null || true
      $SUDO env SLURM_CONF="$CONF" scancel --full 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do
        [ -z "$(squeue -h -o %i 2>/dev/null || true)" ] && break
        sleep 0.1
      done
    fi
  fi
  if pid="$(slurmd_pid)"; then stop_pid slurmd "$pid" 10; fi
  if pid="$(slurmctld_pid)"; then stop_pid slurmctld "$pid" 10; fi
  for pid in $(our_stepds); do
    log "killing leftover slurmstepd $pid"
    $SUDO kill -KILL "$pid" 2>/dev/null || true
  done
  if pid="$(munged_pid)"; then stop_pid munged "$pid" 10; fi
  if [ -d "$DIR" ]; then
    log "removing $DIR"
    $SUDO rm -rf -- "$DIR"
  fi
}

# ------------------------------------------------------------------ start

write_config() {
  local node cpus mem_total mem
  node="$(node_name)"
  cpus="$(nproc)"
  mem_total="$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)"
  mem="${SLURM_LOCAL_MEMORY:-1024}"
  if [ "$mem_total" -gt 0 ] && [ "$mem" -gt "$mem_total" ]; then mem="$mem_total"; fi

  $SUDO tee "$CONF" >/dev/null <<EOF
# Written by scripts/slurm-local.sh: a single-node Slurm for tests (no accounting, no cgroups).
ClusterName=gstvae
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
MaxArraySize=10001
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  $SUDO mkdir -p "$DIR/munge/sock"
  if [ ! -f "$DIR/munge/munge.key" ]; then
    $SUDO mungekey --create --keyfile="$DIR/munge/munge.key" >&2
  fi
  $SUDO chmod 0600 "$DIR/munge/munge.key"
  # The socket's folder must be reachable by the clients (sbatch as a non-root user).
  $SUDO chmod 0755 "$DIR/munge" "$DIR/munge/sock"
  log "starting munged (socket $MUNGE_SOCKET)"
  # --force: /tmp is world-writable (sticky), which munged otherwise refuses for its socket path.
  $SUDO munged --force \
    --socket="$MUNGE_SOCKET" \
    --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" \
    >&2 9>&- || { print_logs; do_stop; die "munged did not start"; }
  local i
  for ((i = 0; i < 50; i++)); do
    [ -S "$MUNGE_SOCKET" ] && return 0
    sleep 0.1
  done
  print_logs
  do_stop
  die "munged did not create $MUNGE_SOCKET"
}

do_start() {
  local tool
  for tool in munged mungekey slurmctld slurmd sinfo sbatch squeue scancel; do
    command -v "$tool" >/dev/null || die "$tool not found; install with: bash scripts/setup.sh slurm"
  done

  if is_running; then
    log "already running in $DIR"
  else
    # A half-started or stale instance (e.g. after a crash): clean it up first.
    if [ -d "$DIR" ] || munged_pid >/dev/null || slurmctld_pid >/dev/null || slurmd_pid >/dev/null; then
      log "cleaning up a previous instance in $DIR"
      do_stop
    fi
    $SUDO mkdir -p "$DIR" "$DIR/run" "$DIR/log" "$DIR/state" "$DIR/spool/slurmd"
    $SUDO chmod 0755 "$DIR" "$DIR/run" "$DIR/log"
    start_munged
    write_config
    $SUDO chmod 0644 "$CONF"
    printf 'export SLURM_CONF=%s\n' "$CONF" | $SUDO tee "$DIR/env" >/dev/null

    log "starting slurmctld (port $PORT)"
    # -c: no state to recover (fresh folder); -i: ignore unreadable state files.
    $SUDO env SLURM_CONF="$CONF" slurmctld -f "$CONF" -c -i >&2 9>&- \
      || { print_logs; do_stop; die "slurmctld did not start"; }
    log "starting slurmd (node $(node_name), $(nproc) CPUs)"
    $SUDO env SLURM_CONF="$CONF" slurmd -f "$CONF" -N "$(node_name)" >&2 9>&- \
      || { print_logs; do_stop; die "slurmd did not start"; }
  fi

  local state="" i
  for ((i = 0; i < TIMEOUT * 2; i++)); do
    state="$(node_state)"
    case "$state" in
      idle | mixed | allocated | completing) break ;;
    esac
    if ! is_running; then
      print_logs
      do_stop
      die "a daemon exited during start-up (logs above)"
    fi
    sleep 0.5
  done
  case "$state" in
    idle | mixed | allocated | completing) ;;
    *)
      log "error: node $(node_name) is not idle after ${TIMEOUT} s (state: '${state:-no answer from slurmctld}')"
      print_logs
      do_stop
      exit 1
      ;;
  esac
  log "node $(node_name) is $state; SLURM_CONF=$CONF (also in $DIR/env)"
  print_env
}

# ------------------------------------------------------------------ status

do_status() {
  if ! [ -f "$CONF" ]; then
    log "not running (no $CONF)"
    return 1
  fi
  local p
  for p in munged slurmctld slurmd; do
    if pid="$(${p}_pid)"; then log "$p: running (pid $pid)"; else log "$p: not running"; fi
  done
  if ! is_running; then return 1; fi
  sinfo >&2 || return 1
  squeue >&2 || true
  print_env
}

# One start/stop at a time per folder (the lock file sits next to the folder, which stop removes).
# The daemons are started with fd 9 closed, so that they do not hold the lock.
lock_commands() {
  exec 9>>"$DIR.lock" || die "cannot open $DIR.lock"
  flock -w 180 9 || die "another slurm-local.sh is still running on $DIR (lock $DIR.lock)"
}

case "${1:-}" in
  start) lock_commands; do_start ;;
  stop) lock_commands; do_stop ;;
  status) do_status ;;
  *)
    echo "usage: $0 start|stop|status   (folder: \$SLURM_LOCAL_DIR, default /tmp/gstvae-slurm)" >&2
    exit 2
    ;;
esac
