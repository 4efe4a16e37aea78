#!/usr/bin/env bash
# A throw-away SLURM 22.05 cluster on one Debian/Ubuntu host: one controller, accounting
# (slurmdbd + MariaDB, so that `sacct` works) and NODES virtual compute nodes (`slurmd -N nK`),
# for CI and for trying `launch: {backend: slurm}` on one machine. Needs root; no systemd,
# no cgroups; /etc/slurm is never touched (everything lives under $LAB, found via SLURM_CONF).
#
#   bash scripts/slurm-lab.sh install   # Debian packages (idempotent; needs the package mirror)
#   bash scripts/slurm-lab.sh start     # munged, mariadbd, slurmdbd, slurmctld, slurmd x NODES; waits until ready
#   bash scripts/slurm-lab.sh status    # daemons, nodes and queue
#   bash scripts/slurm-lab.sh stop      # ends exactly the PIDs `start` recorded (never by name)
#   export SLURM_CONF=/tmp/slurm-lab/cluster/etc/slurm.conf   # printed by `start`
#
# Environment: LAB (state dir, default /tmp/slurm-lab/cluster), NODES (default 3: a 2-node job can lose one and go on),
# CPUS_PER_NODE (default 2; may exceed the real cores), MEM_PER_NODE (MB, default 4000),
# WITH_DBD (1: sacct via slurmdbd + MariaDB, the default; 0: no accounting), ports below.
# Facts behind the settings: ../../shared/notes/slurm.md (tested on Debian 12, Slurm 22.05.8).
set -euo pipefail
LAB=${LAB:-/tmp/slurm-lab/cluster}
WITH_DBD=${WITH_DBD:-1}
NODES=${NODES:-3}
CPUS_PER_NODE=${CPUS_PER_NODE:-2}
MEM_PER_NODE=${MEM_PER_NODE:-4000}
CLUSTER=${CLUSTER:-lab}
PARTITION=${PARTITION:-debug}
CTLD_PORT=${CTLD_PORT:-6817}
DBD_PORT=${DBD_PORT:-6819}
DB_PORT=${DB_PORT:-13306}
NODE_PORT0=${NODE_PORT0:-6820}
export SLURM_CONF=$LAB/etc/slurm.conf

log() { echo "[slurm-lab $(date +%T.%3N)] $*" >&2; }

packages() {
  local pkgs="munge slurmctld slurmd slurm-client"
  [ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  echo "$pkgs"
}

install_pkgs() {
  local pkgs; pkgs=$(packages)
  local want have
  want=$(echo "$pkgs" | wc -w)
  # shellcheck disable=SC2086
  have=$(dpkg-query -W -f='${Status}\n' $pkgs 2>/dev/null | grep -c "install ok installed" || true)
  if [ "$have" = "$want" ]; then log "packages already installed"; return 0; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  # shellcheck disable=SC2086
  dpkg-query -W -f='${Package} ${Version}\n' $pkgs
}

write_configs() {
  mkdir -p "$LAB"/{etc,log,run,state,spool}
  local last=$((NODE_PORT0 + NODES - 1)) nodes="n1" ports="$NODE_PORT0"
  if [ "$NODES" -gt 1 ]; then nodes="n[1-$NODES]"; ports="[$NODE_PORT0-$last]"; fi
  cat > "$SLURM_CONF" <<EOF
# Written by scripts/slurm-lab.sh: a one-host test cluster. Do not use in production.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after cred_expire seconds (default 120).
AuthInfo=cred_expire=10
MailProg=/bin/true
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$LAB/state
SlurmdSpoolDir=$LAB/spool/%n
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd-%n.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups anywhere (works in containers); processes are tracked by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (defaults 60 s / 30 s) so that new and requeued jobs start fast.
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for 5 min (sacct keeps them for good).
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
# Trust the NodeName line below rather than the detected hardware (CPUs may exceed real cores).
SlurmdParameters=config_overrides
JobCompType=jobcomp/filetxt
JobCompLoc=$LAB/log/jobcomp.txt
EOF
  if [ "$WITH_DBD" = 1 ]; then
    printf '%s\n' "AccountingStorageType=accounting_storage/slurmdbd" "AccountingStorageHost=localhost" \
      "AccountingStoragePort=$DBD_PORT" >> "$SLURM_CONF"
  else
    echo "AccountingStorageType=accounting_storage/none" >> "$SLURM_CONF"
  fi
  # The virtual node names do not resolve: NodeAddr carries the address, and the orchestrator
  # asks `scontrol show node` for it (no /etc/hosts entry needed).
  cat >> "$SLURM_CONF" <<EOF
NodeName=$nodes NodeHostname=localhost NodeAddr=127.0.0.1 Port=$ports CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  : > "$LAB/etc/plugstack.conf"
  if [ "$WITH_DBD" = 1 ]; then
    cat > "$LAB/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LAB/log/slurmdbd.log
PidFile=$LAB/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$LAB/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable file
  fi
}

bg() {  # bg NAME cmd... : start in a session of its own and record its PID
  local name=$1; shift
  setsid "$@" > "$LAB/log/$name.stdout" 2>&1 < /dev/null &
  echo $! > "$LAB/run/$name.bgpid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION cmd...
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then log "TIMEOUT waiting for $what (logs: $LAB/log)"; return 1; fi
    sleep 0.2
  done
  log "$what ready"
}

running() {  # true if any daemon recorded by `start` is still alive
  local f
  for f in "$LAB"/run/*.bgpid; do
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && return 0
  done
  return 1
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged          # forks; its pid is in /run/munge/munged.pid
    wait_for 10 munged test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$LAB/run/munged.bgpid"
  fi
  wait_for 10 munge sh -c 'munge -n | unmunge'
}

start_dbd() {
  local db=$LAB/mysql
  mkdir -p "$db/data" "$db/run"; chown -R mysql:mysql "$db"
  if [ ! -d "$db/data/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$db/data" --auth-root-authentication-method=socket \
      --skip-test-db > "$LAB/log/mariadb-install-db.log" 2>&1
  fi
  # Every path mariadbd writes must be writable by user mysql (it drops root).
  bg mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$db/data" \
    --socket="$db/run/mysqld.sock" --pid-file="$db/run/mysqld.pid" --log-error="$db/run/mariadb.err" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
  wait_for 60 mariadb mariadb --socket="$db/run/mysqld.sock" -e 'select 1'
  mariadb --socket="$db/run/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  bg slurmdbd /usr/sbin/slurmdbd -D        # reads slurmdbd.conf next to $SLURM_CONF
  wait_for 60 slurmdbd sacctmgr -n list cluster
}

start() {
  if running; then log "already running; export SLURM_CONF=$SLURM_CONF"; echo "export SLURM_CONF=$SLURM_CONF"; return 0; fi
  command -v slurmctld >/dev/null || { log "SLURM is not installed: run '$0 install' first"; return 1; }
  write_configs
  start_munge
  [ "$WITH_DBD" = 1 ] && start_dbd
  bg slurmctld /usr/sbin/slurmctld -D -f "$SLURM_CONF"
  local i
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$LAB/spool/n$i"
    bg "slurmd-n$i" /usr/sbin/slurmd -D -N "n$i" -f "$SLURM_CONF"
  done
  wait_for 60 "all $NODES nodes idle" sh -c "[ \"\$(sinfo -h -N -t idle -o %N | sort -u | wc -l)\" = $NODES ]"
  if [ "$WITH_DBD" = 1 ]; then
    wait_for 60 "cluster registered in slurmdbd" \
      sh -c "sacctmgr -n -P list cluster format=cluster,controlport | grep -q '^$CLUSTER|[1-9]'"
  fi
  log "cluster '$CLUSTER' up ($NODES nodes, partition $PARTITION)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

kill_recorded() {  # kill_recorded PATTERN... : TERM the recorded PIDs together, wait <= 10 s, then KILL
  local n f p pids=""
  for n in "$@"; do
    for f in "$LAB"/run/$n.bgpid; do
      [ -f "$f" ] || continue
      p=$(cat "$f"); kill -TERM "$p" 2>/dev/null && pids="$pids $p"; rm -f "$f"
    done
  done
  for _ in $(seq 1 100); do
    local alive=""
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
    [ -z "$alive" ] && break; sleep 0.1
  done
  for p in $pids; do
    if kill -0 "$p" 2>/dev/null; then log "PID $p still alive, SIGKILL"; kill -KILL "$p" 2>/dev/null || true; fi
  done
  [ -n "$pids" ] && log "stopped $*:$pids"
  return 0
}

stop() {  # only the PIDs this script recorded; never by name
  kill_recorded 'slurmd-n*' slurmctld slurmdbd
  kill_recorded mariadbd munged
}

status() {
  local f name state
  for f in "$LAB"/run/*.bgpid; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .bgpid); state=dead
    kill -0 "$(cat "$f")" 2>/dev/null && state="running (pid $(cat "$f"))"
    echo "$name: $state"
  done
  running || { echo "cluster not running (start it with: $0 start)"; return 1; }
  echo "SLURM_CONF=$SLURM_CONF"
  sinfo -N -o '%N %T %c %m %P'
  squeue -o '%i %j %T %M %l %D %R'
}

case "${1:-}" in
  install) install_pkgs ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
