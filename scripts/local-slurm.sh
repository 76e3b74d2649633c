#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for tests and for trying Slurm locally.
#
#   scripts/local-slurm.sh start    install (if needed), configure and start; waits until usable
#   scripts/local-slurm.sh stop     cancel jobs and stop the daemons this script started
#   scripts/local-slurm.sh status   sinfo and daemon state; exit 0 when up, 1 when not
#
# Needs root on Debian/Ubuntu. Follows docs/LOCAL-SLURM.md (shared docs): munge, MariaDB +
# slurmdbd (so that `sacct` works for submitit), slurmctld and slurmd with the node named
# `localhost`, AuthInfo=cred_expire=5 (fast requeue), and 4 fake GPUs (GRES on character
# devices made with `mknod c 1 3`) so that jobs asking for --gpus-per-node=4 can be scheduled.
#
# State:  /var/lib/effdstl-slurm (MariaDB datadir, slurmctld/slurmd spool, logs)
#         /run/effdstl-slurm     (pid files, MariaDB socket)
# Config: /etc/slurm/{slurm,gres,slurmdbd}.conf (where the Slurm clients look for it)
# Env:    EFFDSTL_SLURM_FAKE_GPUS=N (default 4; 0 = no GRES at all)
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

STATE=/var/lib/effdstl-slurm
RUN=/run/effdstl-slurm
LOG=$STATE/log
ETC=/etc/slurm
DB_PORT=3307          # private MariaDB, not the default 3306
DBD_PORT=6819
DB_PASS=effdstl-local-slurm
FAKE_GPUS=${EFFDSTL_SLURM_FAKE_GPUS:-4}
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

T0=${EPOCHREALTIME/[.,]/}
elapsed() { local t=${EPOCHREALTIME/[.,]/}; printf '%d.%d' $(( (t - T0) / 1000000 )) $(( (t - T0) / 100000 % 10 )); }
say() { printf '[local-slurm %5ss] %s\n' "$(elapsed)" "$*"; }
die() { echo "[local-slurm] ERROR: $*" >&2; exit 1; }

# pid of a daemon from its pid file, if that process is alive
pid_of() {
  local f=$1 p
  [[ -s $f ]] || return 1
  p=$(tr -dc '0-9' <"$f")
  [[ -n $p ]] && kill -0 "$p" 2>/dev/null && echo "$p"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || return 1
    sleep 0.2
  done
}

munge_ok() { munge -n | unmunge; }
db_ok() { mariadb-admin --socket="$RUN/mysql/mysqld.sock" -u root ping; }
dbd_ok() { sacctmgr -n -P show cluster format=cluster; }
ctld_ok() { scontrol ping | grep -q 'is UP'; }
node_state() { sinfo -h -n localhost -o %t 2>/dev/null | head -n1; }
node_idle() { [[ $(node_state) == idle ]]; }
node_usable() { [[ $(node_state) =~ ^(idle|mix|alloc|comp) ]]; }   # up, maybe running jobs
daemon_up() {  # munged counts as up when someone else's munged works
  pid_of "$(pidfile "$1")" >/dev/null || { [[ $1 == munged ]] && munge_ok >/dev/null 2>&1; }
}

DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
pidfile() {
  case $1 in
    munged) echo "$RUN/munge/munged.pid" ;;
    mariadbd) echo "$RUN/mysql/mysqld.pid" ;;
    *) echo "$RUN/$1.pid" ;;
  esac
}

all_up() {
  local d
  for d in "${DAEMONS[@]}"; do daemon_up "$d" || return 1; done
  ctld_ok && node_usable
}

# ------------------------------------------------------------------------------------------
install_packages() {
  local missing=0 c
  for c in munged slurmctld slurmd slurmdbd sbatch sacct mariadbd mariadb-install-db; do
    command -v "$c" >/dev/null 2>&1 || missing=1
  done
  (( missing )) || return 0
  command -v apt-get >/dev/null 2>&1 || die "Slurm/MariaDB not installed and no apt-get here"
  say "installing ${PKGS[*]} (apt-get)"
  # keep the packages' init scripts from starting system daemons (they would fail or
  # compete with ours); Docker images usually have such a policy-rc.d already
  local policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; added=1
  fi
  local rc=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null; } || rc=$?
  (( added )) && rm -f "$policy"
  (( rc == 0 )) || die "apt-get install ${PKGS[*]} failed ($rc)"
  say "packages installed"
}

write_config() {
  local cpus mem gres_node="" gres_types=""
  read -r cpus mem < <(slurmd -C | awk '/^NodeName/ {
      for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      print v["CPUs"], v["RealMemory"] }')
  [[ -n $cpus && -n $mem ]] || die "could not read CPUs/RealMemory from 'slurmd -C'"
  mem=$(( mem * 95 / 100 ))

  mkdir -p "$ETC"
  : >"$ETC/gres.conf.new"
  if (( FAKE_GPUS > 0 )); then
    local i
    for (( i = 0; i < FAKE_GPUS; i++ )); do
      # character devices (like /dev/null); regular files are rejected, count-only drains
      if [[ ! -c /dev/fakegpu$i ]]; then rm -f "/dev/fakegpu$i"; mknod "/dev/fakegpu$i" c 1 3; fi
    done
    gres_types="GresTypes=gpu"
    gres_node="Gres=gpu:$FAKE_GPUS"
    echo "NodeName=localhost Name=gpu File=/dev/fakegpu[0-$(( FAKE_GPUS - 1 ))]" >"$ETC/gres.conf.new"
  fi
  mv "$ETC/gres.conf.new" "$ETC/gres.conf"

  cat >"$ETC/slurm.conf" <<EOF
# written by effdstl scripts/local-slurm.sh
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$gres_types
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

  local old_umask; old_umask=$(umask); umask 077
  cat >"$ETC/slurmdbd.conf" <<EOF
# written by effdstl scripts/local-slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
EOF
  umask "$old_umask"
  chown slurm:slurm "$ETC/slurmdbd.conf"; chmod 600 "$ETC/slurmdbd.conf"

  cat >"$STATE/my.cnf" <<EOF
[mysqld]
user=mysql
datadir=$STATE/mysql
socket=$RUN/mysql/mysqld.sock
pid-file=$RUN/mysql/mysqld.pid
log-error=$LOG/mariadb.log
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
innodb_buffer_pool_size=64M
innodb_log_file_size=16M
EOF
}

prepare_dirs() {
  mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd" "$RUN/munge" "$RUN/mysql"
  chown slurm:slurm "$STATE/slurmctld" "$LOG"
  chown munge:munge "$RUN/munge"; chmod 755 "$RUN/munge"
  chown mysql:mysql "$RUN/mysql"
  touch "$LOG/mariadb.log"; chown mysql:mysql "$LOG/mariadb.log"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
}

start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  if munge_ok >/dev/null 2>&1; then
    pid_of "$(pidfile munged)" >/dev/null || say "munged already running (not ours; left alone)"
    return 0
  fi
  runuser -u munge -- /usr/sbin/munged --force --pid-file="$(pidfile munged)"
  wait_for 20 munge munge_ok || die "munged did not come up (see /var/log/munge/munged.log)"
  say "munged up"
}

start_mariadb() {
  pid_of "$(pidfile mariadbd)" >/dev/null && db_ok >/dev/null 2>&1 && return 0
  local fresh=0
  if [[ ! -d $STATE/mysql/mysql ]]; then
    fresh=1
    rm -rf "$STATE/mysql"; mkdir -p "$STATE/mysql"; chown mysql:mysql "$STATE/mysql"
    mariadb-install-db --defaults-file="$STATE/my.cnf" --user=mysql --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
  fi
  setsid -f mariadbd --defaults-file="$STATE/my.cnf" </dev/null >>"$LOG/mariadb.log" 2>&1
  wait_for 60 mariadb db_ok || die "MariaDB did not come up (see $LOG/mariadb.log)"
  mariadb --socket="$RUN/mysql/mysqld.sock" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  say "mariadb up$( (( fresh )) && echo ' (new datadir)')"
}

start_slurmdbd() {
  pid_of "$(pidfile slurmdbd)" >/dev/null || slurmdbd
  wait_for 60 slurmdbd dbd_ok || die "slurmdbd did not come up (see $LOG/slurmdbd.log)"
  say "slurmdbd up"
}

start_slurm() {
  pid_of "$(pidfile slurmctld)" >/dev/null || slurmctld
  wait_for 30 slurmctld ctld_ok || die "slurmctld did not come up (see $LOG/slurmctld.log)"
  pid_of "$(pidfile slurmd)" >/dev/null || slurmd -N localhost
  say "slurmctld + slurmd started; waiting for the node to be idle"
  local end=$(( $(date +%s) + 60 )) resumed=0 st
  until node_usable; do
    st=$(node_state)
    if [[ $st == *drain* || $st == down* || $st == drng ]] && (( ! resumed )) && pid_of "$(pidfile slurmd)" >/dev/null; then
      sleep 2   # slurmd may just be registering; then clear an old down/drain state
      [[ $(node_state) == "$st" ]] && { scontrol update nodename=localhost state=resume 2>/dev/null || true; resumed=1; }
    fi
    if (( $(date +%s) >= end )); then
      sinfo -R >&2 || true
      die "node not usable after 60 s (state '$(node_state)'; see $LOG/slurmd.log, $LOG/slurmctld.log)"
    fi
    sleep 0.2
  done
  if node_idle; then
    timeout 60 srun -n1 -t 1 true || die "smoke test 'srun -n1 true' failed"
    say "node idle; srun -n1 true works"
  else
    say "node up ($(node_state): jobs from an earlier run); smoke test skipped"
  fi
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "needs root"
  if all_up 2>/dev/null; then
    say "already running"
    return 0
  fi
  install_packages
  prepare_dirs
  write_config
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  if (( FAKE_GPUS > 0 )); then
    scontrol show node localhost | grep -q "Gres=gpu:$FAKE_GPUS" \
      || echo "[local-slurm] WARNING: node does not show Gres=gpu:$FAKE_GPUS" >&2
  fi
  say "Slurm is up (cluster localci, node localhost, partition debug)"
}

stop_pids() {  # stop_pids NAME...: TERM by pid file, wait (up to 15 s), then KILL
  local name f p i pids=() names=()
  for name in "$@"; do
    f=$(pidfile "$name")
    if p=$(pid_of "$f"); then kill -TERM "$p" 2>/dev/null || true; pids+=("$p"); names+=("$name"); fi
    rm -f "$f"
  done
  (( ${#pids[@]} )) || return 0
  alive() { local q; for q in "${pids[@]}"; do kill -0 "$q" 2>/dev/null && return 0; done; return 1; }
  for (( i = 0; i < 150; i++ )); do alive || break; sleep 0.1; done
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2>/dev/null; then say "pid $p ignored TERM for 15 s; killing"; kill -KILL "$p" 2>/dev/null || true; fi
  done
  say "${names[*]} stopped"
}

cmd_stop() {
  [[ $(id -u) == 0 ]] || die "needs root"
  if pid_of "$(pidfile slurmctld)" >/dev/null && ctld_ok 2>/dev/null; then
    # cancel all jobs first so that no slurmstepd/job processes outlive slurmd
    if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
      squeue -h -o %i | xargs -r scancel 2>/dev/null || true
      wait_for 20 jobs-gone bash -c '[[ -z $(squeue -h -t R,CG,S,PD -o %i) ]]' \
        || say "WARNING: some jobs still there after scancel"
    fi
  fi
  stop_pids slurmd slurmctld
  stop_pids slurmdbd            # after slurmctld, which sends it the last job records
  stop_pids mariadbd munged
  say "stopped"
}

cmd_status() {
  local d p rc=0
  for d in "${DAEMONS[@]}"; do
    if p=$(pid_of "$(pidfile "$d")"); then printf '%-10s up (pid %s)\n' "$d" "$p"
    elif daemon_up "$d"; then printf '%-10s up (not started by this script)\n' "$d"
    else printf '%-10s down\n' "$d"; rc=1; fi
  done
  if ! pid_of "$(pidfile slurmctld)" >/dev/null; then
    echo "slurmctld not running (sinfo skipped: it would wait ~9 s for a controller)"
  elif timeout 20 sinfo 2>/dev/null; then
    node_usable || rc=1
  else echo "sinfo: controller not reachable"; rc=1; fi
  return $rc
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
