#!/usr/bin/env bash
# Cloud TPU VM pod slices with gcloud: the same code as on a laptop, one process per TPU host.
#
#   launch/tpu.sh [--dry-run] create                 # the slice (add SPOT=1 for spot capacity)
#   launch/tpu.sh [--dry-run] setup                  # this checkout + jax[tpu] on every worker
#   launch/tpu.sh [--dry-run] run CONFIG[:ARGS] [--config.KEY=VALUE ...]   # one run, all workers
#   launch/tpu.sh [--dry-run] sweep SWEEP_ARGS...     # any sweep, each run over the whole slice
#   launch/tpu.sh [--dry-run] sweep-per-chip SWEEP_ARGS...   # one run per chip (WORKERS hosts)
#   launch/tpu.sh [--dry-run] copy DEST              # WORKDIR from worker 0 to DEST here
#                                                    # (WORKDIR without blanks or shell characters)
#   launch/tpu.sh [--dry-run] delete                 # the slice
#
# Required variables:
#   TPU_NAME          name of the slice, e.g. resnet-v4-32
#   ZONE              e.g. us-central2-b
#   ACCELERATOR_TYPE  e.g. v4-32 (create only)
#   WORKDIR           run directory on a file system every worker shares (a Filestore/NFS or
#                     gcsfuse mount at the same path on every worker; run and sweeps only)
#   WORKERS           hosts of the slice, e.g. 4 for a v4-32 (sweep-per-chip only)
# Optional: PROJECT (gcloud's default otherwise), RUNTIME_VERSION (default tpu-ubuntu2204-base),
#   SPOT=1, REPO_DIR on the workers (default resnet_jax).
#
# Every worker runs the same command with RESNET_JAX_DISTRIBUTED=1; jax.distributed.initialize()
# finds the other workers itself, the mesh spans all chips, process 0 writes logs and every
# process writes its part of each Orbax checkpoint. SWEEP_ARGS are experiments.sweep's
# (--sweep=FILE[:ARG] or --grid=..., --config.KEY=VALUE; WORKDIR is the root). Which way to run a
# sweep: `sweep` trains one run at a time on every chip of the slice (one JAX job: big runs, e.g.
# the paper preset's ImageNet-sized or 1202-layer nets); `sweep-per-chip` runs one run per chip,
# each worker its share of the runs (--shard=W/WORKERS) on its own chips (--devices-per-run=1:
# TPU_VISIBLE_CHIPS), then writes the report from worker 0 (small CIFAR nets, which one chip
# trains as fast as many). --dry-run (anywhere on the line) prints the commands instead.
set -euo pipefail

# The header above, up to the first line that is not a comment.
usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2; }
need() {
  for var in "$@"; do
    if [[ -z "${!var:-}" ]]; then
      echo "tpu.sh: error: $var is not set: export $var=... (see launch/tpu.sh --help)" >&2
      exit 2
    fi
  done
}

# --dry-run counts wherever it is, since a dry run must never act (resnet_jax.main has no flag of
# that name; experiments.sweep's own --dry-run prints a local plan instead).
DRY_RUN=0
args=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else args+=("$arg"); fi
done
set -- "${args[@]}"
[[ $# -ge 1 && "$1" != "--help" && "$1" != "-h" ]] || usage
cmd=$1; shift

# Prints the command under --dry-run, runs it otherwise.
run() {
  if ((DRY_RUN)); then printf '%q ' "$@"; echo; else "$@"; fi
}

# Its arguments as words for a shell, each quoted: each worker's shell splits the --command string,
# and paths and values may hold blanks, parentheses, quotes or ';'.
words() {
  local quoted
  printf -v quoted '%q ' "$@"
  echo "${quoted% }"
}

need TPU_NAME ZONE
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REPO_DIR=${REPO_DIR:-resnet_jax}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")
on_all_workers() { run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"; }

case "$cmd" in
  create)
    need ACCELERATOR_TYPE
    extra=()
    [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
    run "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
    ;;
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp -u /tmp/resnet_jax-XXXXXX).tar.gz
    run git -C "$here" archive --format=tar.gz --prefix="$REPO_DIR/" -o "$archive" HEAD
    run "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME":resnet_jax.tar.gz "${where[@]}" --worker=all
    on_all_workers "tar xzf resnet_jax.tar.gz && python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e $(words "$REPO_DIR")"
    ;;
  run)
    need WORKDIR
    [[ $# -ge 1 ]] || { echo "tpu.sh: error: run needs CONFIG[:ARGS], e.g. resnet_jax/configs/imagenet.py:depth=50" >&2; exit 2; }
    config=$1; shift
    train=(python3 -m resnet_jax.main train "--config=$config" "--workdir=$WORKDIR" "$@")
    on_all_workers "cd $(words "$REPO_DIR") && RESNET_JAX_DISTRIBUTED=1 $(words "${train[@]}")"
    ;;
  sweep|sweep-per-chip)
    need WORKDIR
    [[ $# -ge 1 ]] || { echo "tpu.sh: error: $cmd needs a sweep, e.g. --sweep=experiments/sweeps/degradation.py:preset=paper" >&2; exit 2; }
    for arg in "$@"; do
      [[ "$arg" == --root=* ]] && { echo "tpu.sh: error: $arg: WORKDIR is the sweep's root; drop --root" >&2; exit 2; }
    done
    sweep=(python3 -m experiments.sweep "$@" "--root=$WORKDIR")
    if [[ "$cmd" == sweep ]]; then
      on_all_workers "cd $(words "$REPO_DIR") && RESNET_JAX_DISTRIBUTED=1 $(words "${sweep[@]}")"
    else
      need WORKERS
      [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "tpu.sh: error: WORKERS=$WORKERS is not a positive integer: export WORKERS=<hosts of the slice>" >&2; exit 2; }
      pids=()
      for ((w = 0; w < WORKERS; w++)); do
        share=("${sweep[@]}" --devices-per-run=1 --platform=tpu "--shard=$w/$WORKERS" --no-report)
        command="cd $(words "$REPO_DIR") && $(words "${share[@]}")"
        if ((DRY_RUN)); then
          run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" "--worker=$w" "--command=$command"
        else
          "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" "--worker=$w" "--command=$command" &
          pids+=($!)
        fi
      done
      status=0
      for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
      report=(python3 -m experiments.report "--root=$WORKDIR")
      run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 \
        "--command=cd $(words "$REPO_DIR") && $(words "${report[@]}")"
      exit "$status"
    fi
    ;;
  copy)
    need WORKDIR
    [[ $# -ge 1 ]] || { echo "tpu.sh: error: copy needs a DEST directory here" >&2; exit 2; }
    # scp hands a remote path to the worker's shell, or since OpenSSH 9.0 reads it as it is: no
    # quoting suits both, so copy takes only paths that neither would change.
    if [[ ! "$WORKDIR" =~ ^[A-Za-z0-9_./+,:=@%-]+$ ]]; then
      echo "tpu.sh: error: copy cannot hand WORKDIR=$WORKDIR to scp intact (it holds blanks or" \
        "shell characters): copy it with gcloud compute tpus tpu-vm scp, quoted as your scp" \
        "needs, or use a WORKDIR without them" >&2
      exit 2
    fi
    run "${gcloud_tpu[@]}" scp --recurse "$TPU_NAME:$WORKDIR" "$1" "${where[@]}" --worker=0
    ;;
  delete)
    run "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    echo "tpu.sh: error: unknown command '$cmd': use create, setup, run, sweep, sweep-per-chip, copy or delete" >&2
    exit 2
    ;;
esac
