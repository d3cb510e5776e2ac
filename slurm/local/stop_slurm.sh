#!/usr/bin/env bash
# Stop what start_slurm.sh started, by PID file only. --purge also wipes state, DB and logs.
# Daemons that do not depend on each other are stopped together (about 6 s in all).
set -uo pipefail
SLURM_BASE=${SLURM_BASE:-${TMPDIR:-/tmp}/hawq-slurm}
export SLURM_CONF="$SLURM_BASE/etc/slurm.conf"
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfiles() { # stop_pidfiles FILE... : SIGTERM all, wait up to 15 s, then SIGKILL
  local f p pids=() files=()
  for f in "$@"; do
    if alive "$f"; then p=$(cat "$f"); kill "$p"; pids+=("$p"); files+=("$f"); else rm -f "$f"; fi
  done
  for i in "${!pids[@]}"; do
    p=${pids[$i]}
    for _ in $(seq 75); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && { echo "SIGKILL $(basename "${files[$i]}" .pid) ($p)"; kill -9 "$p"; }
    rm -f "${files[$i]}"; echo "stopped $(basename "${files[$i]}" .pid) (pid $p)"
  done; }

# 1. cancel jobs first: slurmd does not kill running steps when it exits
if alive "$SLURM_BASE/run/slurmctld.pid"; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    scancel $jobs 2>/dev/null
    for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    echo "cancelled jobs: $jobs"
  fi
fi
# 2. daemons: nodes and controller, then accounting, then its database
shopt -s nullglob
stop_pidfiles "$SLURM_BASE"/run/slurmd-*.pid "$SLURM_BASE/run/slurmctld.pid"
stop_pidfiles "$SLURM_BASE/run/slurmdbd.pid"
# munged serves the whole host: stop it only if start_slurm.sh started it
munged=()
if [ -s "$SLURM_BASE/run/munged.pid" ] && [ "$(cat "$SLURM_BASE/run/munged.pid")" = "$(cat /run/munge/munged.pid 2>/dev/null)" ]; then
  munged=(/run/munge/munged.pid)
fi
stop_pidfiles "$SLURM_BASE/run/mariadbd.pid" "${munged[@]}"
rm -f "$SLURM_BASE/run/munged.pid"
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$SLURM_BASE"/{state,spool,log,db,run,etc,env.sh}; echo "purged $SLURM_BASE"
fi
exit 0
