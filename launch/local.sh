#!/usr/bin/env bash
# Runs one command as N processes on this machine, joined into one JAX job.
#
#   launch/local.sh [--dry-run] N COMMAND [ARG ...]
#   launch/local.sh 2 resnet-jax train --config=resnet_jax/configs/cifar.py:depth=20 --workdir=runs/r20
#
# Each process gets JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i and JAX_COORDINATOR_ADDRESS, which
# resnet_jax.parallel.initialize_distributed() turns into jax.distributed.initialize (collectives
# over gloo on CPU). This is how tests/test_distributed.py runs a multi-host job on one machine.
#
# Variables (optional):
#   PORT                 coordinator port on localhost (default 12355)
#   DEVICES_PER_PROCESS  CPU only: simulated devices per process (default: JAX's, 1)
#
# Output: process 0 prints to this terminal; process i>0 writes to ${LOG_DIR:-.}/process-i.log.
# If any process fails, one line names it, the others are stopped and the first failure's exit
# status is returned.
# --dry-run, before or after N, prints the commands instead; after COMMAND it is COMMAND's own.
set -euo pipefail

# The header above, up to the first line that is not a comment.
usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2; }

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 2 ]] || usage
N=$1; shift
if [[ "$1" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 1 ]] || usage
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: error: N=$N is not a positive integer: pass the number of processes first" >&2; exit 2; }
PORT=${PORT:-12355}
LOG_DIR=${LOG_DIR:-.}

xla_flags=${XLA_FLAGS:-}
if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
  xla_flags="$xla_flags --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for ((i = 0; i < N; i++)); do
  env_vars=(JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" JAX_COORDINATOR_ADDRESS="localhost:$PORT"
            XLA_FLAGS="${xla_flags# }")
  if ((DRY_RUN)); then
    out=""; ((i > 0)) && out=" > $(printf '%q' "$LOG_DIR/process-$i.log") 2>&1"
    echo "env $(printf '%q ' "${env_vars[@]}" "$@")$out &"
    continue
  fi
  if ((i == 0)); then
    env "${env_vars[@]}" "$@" &
  else
    env "${env_vars[@]}" "$@" > "$LOG_DIR/process-$i.log" 2>&1 &
  fi
  pids+=($!)
done
((DRY_RUN)) && { echo "wait"; exit 0; }

status=0
# Wait for the processes in the order they end (bash >= 5.1); the first failure stops the rest.
running=("${pids[@]}")
while ((${#running[@]})); do
  rc=0
  wait -n -p ended "${running[@]}" || rc=$?
  next=()
  for pid in "${running[@]}"; do [[ "$pid" == "$ended" ]] || next+=("$pid"); done
  running=("${next[@]}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    # Name the one that ended (each peer says it stopped answering: resnet_jax/peers.py).
    for i in "${!pids[@]}"; do [[ "${pids[$i]}" == "$ended" ]] && index=$i; done
    how="with exit status $rc"
    ((rc > 128)) && how="by SIG$(kill -l $((rc - 128))) (exit status $rc)"
    echo "local.sh: process $index of $N (pid $ended) ended $how: stopping the others; see ${LOG_DIR}/process-i.log for process i > 0" >&2
    cleanup
  fi
done
trap - EXIT
exit "$status"
