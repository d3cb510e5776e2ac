#!/usr/bin/env bash
# Idempotent single-host Slurm for CI/tests on Debian 12 (slurm-wlm 22.05), run as root.
# Emulates SLURM_NODES nodes on this one host (multiple-slurmd mode: one slurmd per
# NodeName, same NodeHostname, different Port). Optional accounting (MariaDB + slurmdbd)
# so that `sacct` works -- submitit polls sacct for job states.
# Usage:  bash slurm/local/start_slurm.sh ; source "$SLURM_BASE/env.sh"   (exports SLURM_CONF)
# Adapted from the shared one-host recipe: every port is configurable (so two clusters with
# different SLURM_BASE and ports can run side by side), and munged is stopped by stop_slurm.sh
# only if this script started it.
set -euo pipefail

SLURM_BASE=${SLURM_BASE:-${TMPDIR:-/tmp}/hawq-slurm}
SLURM_NODES=${SLURM_NODES:-2}           # emulated nodes n1..nN
CPUS_PER_NODE=${CPUS_PER_NODE:-2}       # each slurmd sees all real cores; must be <= nproc
MEM_PER_NODE=${MEM_PER_NODE:-8000}      # MB, must be <= real memory
WITH_ACCOUNTING=${WITH_ACCOUNTING:-1}   # 1 = MariaDB + slurmdbd (sacct works), 0 = none
CLUSTER=${SLURM_CLUSTER_NAME:-ci}
CTLD_PORT=${SLURMCTLD_PORT:-6817}       # slurmctld; slurmdbd uses DBD_PORT
DBD_PORT=${SLURMDBD_PORT:-6819}
NODE_PORT0=${SLURMD_PORT_BASE:-17000}   # node i listens on NODE_PORT0 + i
DB_PORT=${MARIADB_PORT:-3306}
T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[start_slurm %d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # wait_for SECONDS CMD...
  local n=$(( $1 * 5 )); shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timeout waiting for: $*" >&2; return 1; }

# ---------- 1. packages ----------
PKGS="slurmctld slurmd slurm-client munge"
BINS="slurmctld slurmd sbatch munged"
if [ "$WITH_ACCOUNTING" = 1 ]; then PKGS="$PKGS slurmdbd mariadb-server"; BINS="$BINS slurmdbd mariadbd"; fi
missing=0; for b in $BINS; do command -v "$b" >/dev/null || missing=1; done
if [ $missing = 1 ]; then
  log "apt-get install $PKGS"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
  log "packages installed"
fi

mkdir -p "$SLURM_BASE"/{etc,state,spool,log,run,db}
if [ "$WITH_ACCOUNTING" = 1 ] && ! runuser -u mysql -- test -x "$SLURM_BASE"; then
  echo "start_slurm: user mysql cannot reach $SLURM_BASE (a 0700 parent?); use another SLURM_BASE" >&2
  exit 1
fi
chmod 755 "$SLURM_BASE" "$SLURM_BASE"/{etc,state,spool,log}
chmod 1777 "$SLURM_BASE/run"
export SLURM_CONF="$SLURM_BASE/etc/slurm.conf"

# ---------- 2. munge ----------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
  if [ -s /run/munge/munged.pid ] && ! kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 sh -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$SLURM_BASE/run/munged.pid"   # ours: stop_slurm.sh may stop it
  log "munged started (pid $(cat /run/munge/munged.pid))"
fi

# ---------- 3. slurm.conf ----------
if [ "$WITH_ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
NEWCONF=$(mktemp)
cat > "$NEWCONF" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((NODE_PORT0 + 1))
StateSaveLocation=$SLURM_BASE/state
SlurmdSpoolDir=$SLURM_BASE/spool/%n
SlurmctldPidFile=$SLURM_BASE/run/slurmctld.pid
SlurmdPidFile=$SLURM_BASE/run/slurmd-%n.pid
SlurmctldLogFile=$SLURM_BASE/log/slurmctld.log
SlurmdLogFile=$SLURM_BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmdTimeout=60
$ACCT
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_BASE/log/jobcomp.txt
NodeName=n[1-$SLURM_NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((NODE_PORT0 + 1))-$((NODE_PORT0 + SLURM_NODES)) CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
if ! cmp -s "$NEWCONF" "$SLURM_CONF"; then
  if alive "$SLURM_BASE/run/slurmctld.pid"; then
    log "slurm.conf changed: restarting Slurm daemons"
    for f in "$SLURM_BASE"/run/slurmd-*.pid "$SLURM_BASE/run/slurmctld.pid"; do
      alive "$f" && kill "$(cat "$f")"; done
    for f in "$SLURM_BASE"/run/slurmd-*.pid "$SLURM_BASE/run/slurmctld.pid"; do
      for _ in $(seq 50); do alive "$f" || break; sleep 0.2; done; rm -f "$f"; done
  fi
  mv "$NEWCONF" "$SLURM_CONF"; chmod 644 "$SLURM_CONF"
else
  rm -f "$NEWCONF"
fi
echo "export SLURM_CONF=$SLURM_CONF" > "$SLURM_BASE/env.sh"

# ---------- 4. accounting: MariaDB + slurmdbd ----------
if [ "$WITH_ACCOUNTING" = 1 ]; then
  SOCK="$SLURM_BASE/run/mysqld.sock"
  if ! mariadb-admin --socket="$SOCK" ping >/dev/null 2>&1; then
    chown mysql:mysql "$SLURM_BASE/db"
    if [ ! -d "$SLURM_BASE/db/mysql" ]; then
      mariadb-install-db --user=mysql --datadir="$SLURM_BASE/db" --auth-root-authentication-method=socket --skip-test-db >/dev/null
    fi
    setsid mariadbd --user=mysql --datadir="$SLURM_BASE/db" --socket="$SOCK" \
      --pid-file="$SLURM_BASE/run/mariadbd.pid" --bind-address=127.0.0.1 --port=$DB_PORT \
      --log-error="$SLURM_BASE/db/mariadb.err" --innodb-buffer-pool-size=64M \
      </dev/null >/dev/null 2>&1 &
    wait_for 30 mariadb-admin --socket="$SOCK" ping
    mariadb --socket="$SOCK" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
      FLUSH PRIVILEGES;"
    log "mariadbd started (pid $(cat "$SLURM_BASE/run/mariadbd.pid"))"
  fi
  cat > "$SLURM_BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$SLURM_BASE/log/slurmdbd.log
PidFile=$SLURM_BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$SLURM_BASE/etc/slurmdbd.conf"     # slurmdbd refuses a world-readable file
  if ! alive "$SLURM_BASE/run/slurmdbd.pid"; then
    slurmdbd     # reads slurmdbd.conf from the directory of $SLURM_CONF
    wait_for 60 sacctmgr -n show cluster
    log "slurmdbd started (pid $(cat "$SLURM_BASE/run/slurmdbd.pid"))"
  fi
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    log "cluster $CLUSTER registered in slurmdbd"
  fi
fi

# ---------- 5. slurmctld + slurmd(s) ----------
if ! alive "$SLURM_BASE/run/slurmctld.pid"; then
  slurmctld -f "$SLURM_CONF"
  wait_for 30 sh -c 'scontrol ping | grep -q "is UP"'
  log "slurmctld started (pid $(cat "$SLURM_BASE/run/slurmctld.pid"))"
fi
for i in $(seq 1 "$SLURM_NODES"); do
  if ! alive "$SLURM_BASE/run/slurmd-n$i.pid"; then
    slurmd -f "$SLURM_CONF" -N "n$i"
    wait_for 10 test -s "$SLURM_BASE/run/slurmd-n$i.pid"
    log "slurmd n$i started (pid $(cat "$SLURM_BASE/run/slurmd-n$i.pid"))"
  fi
done

# ---------- 6. wait until every node is idle/allocated ----------
for _ in $(seq 150); do
  states=$(sinfo -h -N -o '%t' | sort -u | tr '\n' ' ')
  case "$states" in *down*|*drain*|*drng*|*unk*|*fail*|*inval*)
    bad=$(sinfo -h -N -t down,drain,drng,fail -o '%N' | sort -u | paste -sd, -)
    [ -n "$bad" ] && scontrol update NodeName="$bad" State=RESUME >/dev/null 2>&1 || true
    sleep 0.2 ;;
  *) break ;;
  esac
done
sinfo -N -o '%10N %8t %4c %m'
log "Slurm ready. Run: source $SLURM_BASE/env.sh"
