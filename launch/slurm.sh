#!/usr/bin/env bash
# SLURM clusters, GPU or CPU partitions: one multi-node run with srun, or a sweep as a job array.
#
#   launch/slurm.sh [--dry-run] run CONFIG[:ARGS] [--config.KEY=VALUE ...]
#       one run over NODES x TASKS_PER_NODE processes (one per GPU), as one JAX job
#   launch/slurm.sh [--dry-run] sweep SWEEP_ARGS...
#       any sweep (experiments.sweep's --sweep=FILE[:ARG], or --grid=KEY=V1,V2 ... --seeds=N,
#       and --config.KEY=VALUE) as a job array, one task (and one GPU, unless GPUS_PER_NODE=0)
#       a run, then a job that writes the report once every run has finished, e.g.
#       launch/slurm.sh sweep --sweep=experiments/sweeps/degradation.py:preset=paper
#     Each prints its job ids, one a line (sweep: the array's, then the report's): scancel them to
#     stop the jobs; the same command again continues where they stopped.
#
# Required variables:
#   WORKDIR        run directory (sweep: the sweep's root) on a file system every node shares
# Optional: NODES (default 1), GPUS_PER_NODE (default 8; 0 on a CPU partition: no GPU request),
#   TASKS_PER_NODE (processes per node, default GPUS_PER_NODE, or 1 with GPUS_PER_NODE=0; on GPUs
#   it must equal GPUS_PER_NODE, since JAX gives each SLURM task one GPU), TIME (default
#   24:00:00), PARTITION, ACCOUNT, VENV (a virtual environment to activate on the nodes; its
#   python3 also lists a sweep's runs here), PARALLEL (array tasks at once, default 16),
#   TERM_BEFORE_LIMIT (seconds, default 120).
#
# Jobs get SIGTERM TERM_BEFORE_LIMIT seconds before their time limit (SLURM checks its clocks about
# every 30 s, and sends it up to that much early) and are requeued when preempted: training
# checkpoints on SIGTERM (exit status 143) and the requeued job, or the same command run again,
# resumes from it.
# --dry-run (anywhere on the line) prints the batch scripts and the sbatch commands instead of
# submitting them.
set -euo pipefail

# The header above, up to the first line that is not a comment.
usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2; }

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
if [[ -z "${WORKDIR:-}" ]]; then
  echo "slurm.sh: error: WORKDIR is not set: export WORKDIR=/shared/path (see launch/slurm.sh --help)" >&2
  exit 2
fi
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TIME=${TIME:-24:00:00}
PARALLEL=${PARALLEL:-16}
TERM_BEFORE_LIMIT=${TERM_BEFORE_LIMIT:-120}
REPO=$(cd "$(dirname "$0")/.." && pwd)
for var in WORKDIR TIME PARTITION ACCOUNT; do
  if [[ "${!var:-}" == *$'\n'* ]]; then
    echo "slurm.sh: error: $var holds a line break, which no #SBATCH line can carry: remove it" >&2
    exit 2
  fi
done
# $1 = a variable's name, $2 = its least value.
need_integer() {
  if [[ ! "${!1}" =~ ^[0-9]+$ ]] || ((10#${!1} < $2)); then
    echo "slurm.sh: error: $1=${!1}: set it to an integer of at least $2" >&2
    exit 2
  fi
}
need_integer GPUS_PER_NODE 0
TASKS_PER_NODE=${TASKS_PER_NODE:-$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))}
for var in NODES TASKS_PER_NODE PARALLEL TERM_BEFORE_LIMIT; do need_integer "$var" 1; done
if ((GPUS_PER_NODE > 0 && TASKS_PER_NODE != GPUS_PER_NODE)); then
  echo "slurm.sh: error: TASKS_PER_NODE=$TASKS_PER_NODE with GPUS_PER_NODE=$GPUS_PER_NODE: JAX gives each SLURM task one GPU: unset TASKS_PER_NODE, or set GPUS_PER_NODE=0 on a CPU partition" >&2
  exit 2
fi
# Made absolute here, once: the jobs start in the repository, not in this directory.
[[ "$WORKDIR" == /* ]] || WORKDIR=$PWD/$WORKDIR
# A node may have python3 and no python; a venv has both.
PYTHON=${VENV:+$VENV/bin/}python3
# One GPU a task, or none on a CPU partition.
GPUS=()
((GPUS_PER_NODE > 0)) && GPUS=("--gpus-per-task=1")

# One #SBATCH line. sbatch splits these lines at blanks (escaped ones too) and ends them at '#', so
# an argument holding anything but these characters goes in double quotes, where \ escapes.
sbatch_line() {
  local arg=$1
  if [[ ! "$arg" =~ ^[A-Za-z0-9_./:=%@+,-]+$ ]]; then
    arg=${arg//\\/\\\\}
    arg="\"${arg//\"/\\\"}\""
  fi
  echo "#SBATCH $arg"
}

# The arguments, each quoted for bash and preceded by a blank (nothing for none).
quoted() { (($#)) && printf ' %q' "$@"; return 0; }

# --output=WORKDIR/$1. sbatch replaces %j, %A, %a, ... in that path, and %% by %.
output_in_workdir() { echo "--output=${WORKDIR//%/%%}/$1"; }

# The #SBATCH header shared by both kinds of job; $1 = job name, then extra sbatch arguments.
header() {
  local name=$1; shift
  # --open-mode=append: a requeued job's log goes on after the first start's, not over it.
  local args=("--job-name=$name" "--time=$TIME" "--signal=TERM@$TERM_BEFORE_LIMIT" "--requeue"
              "--open-mode=append")
  [[ -n "${PARTITION:-}" ]] && args+=("--partition=$PARTITION")
  [[ -n "${ACCOUNT:-}" ]] && args+=("--account=$ACCOUNT")
  echo "#!/usr/bin/env bash"
  for arg in "${args[@]}" "$@"; do sbatch_line "$arg"; done
  echo "set -euo pipefail"
  echo "cd $(printf '%q' "$REPO")"
  [[ -n "${VENV:-}" ]] && echo "source $(printf '%q' "$VENV")/bin/activate"
  return 0
}

# Prints (dry run) or submits a batch script read from stdin; echoes the job id.
submit() {
  local script
  script=$(cat)
  if ((DRY_RUN)); then
    echo "# --- batch script ---"
    echo "$script"
    echo "# --- submitted with ---"
    printf '%q ' sbatch --parsable "$@"; echo
    echo "JOBID"
  else
    mkdir -p "$WORKDIR"
    sbatch --parsable "$@" <<< "$script"
  fi
}

case "$cmd" in
  run)
    [[ $# -ge 1 ]] || { echo "slurm.sh: error: run needs CONFIG[:ARGS], e.g. resnet_jax/configs/imagenet.py:depth=50" >&2; exit 2; }
    config=$1; shift
    {
      header resnet_jax "--nodes=$NODES" "--ntasks-per-node=$TASKS_PER_NODE" ${GPUS[@]+"${GPUS[@]}"} \
        "$(output_in_workdir 'slurm-%j.out')"
      echo "export RESNET_JAX_DISTRIBUTED=1  # jax.distributed.initialize() reads SLURM's variables"
      echo "srun python3 -m resnet_jax.main train$(quoted "--config=$config" "--workdir=$WORKDIR" "$@")"
    } | submit
    ;;
  sweep)
    [[ $# -ge 1 ]] || { echo "slurm.sh: error: sweep needs a sweep, e.g. --sweep=experiments/sweeps/degradation.py:preset=paper" >&2; exit 2; }
    for arg in "$@"; do
      [[ "$arg" == --root=* ]] && { echo "slurm.sh: error: $arg: WORKDIR is the sweep's root; drop --root" >&2; exit 2; }
    done
    # The runs, as the sweep lists them (a bad sweep ends here, in its own one line).
    names=$(cd "$REPO" && "$PYTHON" -m experiments.sweep "$@" --list)
    count=$(wc -l <<< "$names")
    array_job=$({
      header "resnet_jax-sweep" "--array=0-$((count - 1))%$PARALLEL" "--ntasks=1" \
        ${GPUS[@]+"${GPUS[@]}"} "$(output_in_workdir 'slurm-%A_%a.out')"
      # srun: SLURM sends the SIGTERM before the time limit to job steps, not to the batch script.
      echo "srun python3 -m experiments.sweep$(quoted "$@" "--root=$WORKDIR") --index=\$SLURM_ARRAY_TASK_ID --no-report"
    } | submit)
    echo "$array_job"
    array_id=$(tail -n 1 <<< "$array_job")
    {
      header "resnet_jax-sweep-report" "--ntasks=1" "$(output_in_workdir 'slurm-%j.out')"
      echo "python3 -m experiments.report$(quoted "--root=$WORKDIR")"
    } | submit "--dependency=afterok:$array_id"
    ;;
  *)
    echo "slurm.sh: error: unknown command '$cmd': use run or sweep" >&2
    exit 2
    ;;
esac
