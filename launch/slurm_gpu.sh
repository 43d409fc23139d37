#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one JAX process per GPU (8 tasks a node, each on the GPU
# numbered by its SLURM_LOCALID), the coordinator on the job's first node at a fixed port
# (12355, --port). The job checkpoints and requeues itself before its time limit and when it is
# preempted, and resumes from WORKDIR's checkpoints. Submit from the repository root (config
# paths are relative to it) in the Python environment where dsno_jax is installed
# (`pip install -e ".[cuda]"`): sbatch hands that environment to the job.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config configs/imagenet64.py \
#       --workdir /shared/runs/imagenet64 --mode train [-- --config.train.batch_size=2048]
#
# Nodes with 4 GPUs: `sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 ...`. Another time
# limit: `sbatch --time=24:00:00 ...`; the TERM comes 180 s before it (--signal=TERM@300 for
# slower checkpoints).
# Exit statuses of `python3 -m dsno_jax.main`: 0 done; 75 stopped for a preemption after saving
# a checkpoint; anything else a real failure (not requeued).
# `DRY_RUN=1 launch/slurm_gpu.sh ...` (or --dry-run) prints the srun command and the environment
# of every process, for SLURM_JOB_NODELIST, SLURM_NNODES and SLURM_NTASKS_PER_NODE (or
# SLURM_GPUS_PER_NODE; default 8) taken from the environment: no SLURM needed.
#
# --signal=TERM@180, without "B:": 180 s before the time limit SLURM sends SIGTERM to every
# process of the job's steps, i.e. to the python processes srun started (not to this batch
# shell). "B:TERM" would signal only this shell and nothing would reach python. Each process
# saves a checkpoint and exits with 75; srun returns, and this script requeues the job
# (`scontrol requeue`, allowed by --requeue; SLURM does not requeue a job for reaching its time
# limit by itself). On preemption SLURM sends SIGTERM to all of the job's processes (this shell
# too, which traps it and goes on waiting for srun) and SIGKILL after the partition's GraceTime.
# Every process gets DSNO_JAX_JOB_ID=slurm:SLURM_JOB_ID: a requeued job keeps its id, so after a
# hard kill (a node failure, a SIGKILL) its next run takes over the workdir lock the killed run
# left, on whichever nodes it lands; another job is still refused.
#SBATCH --job-name=dsno_jax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=TERM@180
#SBATCH --time=48:00:00
set -euo pipefail

# One srun task: its GPU, the JAX cluster description, then the command. srun runs it as
# `bash -c "$(declare -f dsno_task); dsno_task \"\$@\"" dsno_task COMMAND...` on every node
# (this script itself exists only on the first node under sbatch).
dsno_task() {
  local gpus=() local_id
  IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
  # SLURM gives every task of a node all of the node's GPUs (--gpus-per-node), so each process
  # takes the one at its SLURM_LOCALID. Where a site binds one GPU to each task, that GPU is
  # device 0. JAX_LOCAL_DEVICE_IDS is what jax.distributed.initialize() restricts the process
  # to (left unset, JAX's SLURM detection would use SLURM_LOCALID itself, wrong in the bound
  # case).
  if ((${#gpus[@]} == 1)); then
    local_id=0
  elif ((${#gpus[@]} == 0 || SLURM_LOCALID < ${#gpus[@]})); then
    local_id="$SLURM_LOCALID"
  else
    echo "slurm_gpu.sh: task $SLURM_PROCID (local $SLURM_LOCALID) sees the GPUs" \
         "'$CUDA_VISIBLE_DEVICES': cannot tell which one is its own" >&2
    return 2
  fi
  # JAX_COORDINATOR_ADDRESS comes from the batch script (srun passes its environment on).
  export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"
  export JAX_LOCAL_DEVICE_IDS="$local_id"
  if [[ "${DSNO_TASK_DRY_RUN:-0}" == 1 ]]; then
    printf 'host=%s gpu=%s SLURM_PROCID=%s SLURM_LOCALID=%s CUDA_VISIBLE_DEVICES=%s ' \
        "${SLURMD_NODENAME:-$(hostname)}" "${gpus[$local_id]:-$local_id}" "$SLURM_PROCID" \
        "$SLURM_LOCALID" "${CUDA_VISIBLE_DEVICES:-}"
    printf 'JAX_LOCAL_DEVICE_IDS=%s JAX_COORDINATOR_ADDRESS=%s JAX_NUM_PROCESSES=%s JAX_PROCESS_ID=%s ' \
        "$JAX_LOCAL_DEVICE_IDS" "$JAX_COORDINATOR_ADDRESS" "$JAX_NUM_PROCESSES" "$JAX_PROCESS_ID"
    printf 'DSNO_JAX_JOB_ID=%s ' "${DSNO_JAX_JOB_ID:-}"
    printf '%q ' "$@"
    echo
    return 0
  fi
  "$@" &
  local child=$! rc=0
  # SLURM signals every process of the step (the time-limit TERM, a preemption, scancel), so
  # python gets the TERM itself; this wrapper ignores it (set after the fork: python keeps its
  # own handler) and outlives python to report its status.
  trap '' TERM
  wait "$child" || rc=$?
  # srun returns the highest status of its tasks: real failures are mapped above 75, so 75
  # means "no process failed, and they stopped for a preemption".
  case "$rc" in
    0|75) ;;
    *) echo "slurm_gpu.sh: process $SLURM_PROCID on ${SLURMD_NODENAME:-$(hostname)} failed" \
            "with exit status $rc" >&2
       ((rc > 75)) || rc=$((rc + 100)) ;;
  esac
  return "$rc"
}
TASK_SH="$(declare -f dsno_task); dsno_task \"\$@\""

CONFIG="configs/imagenet64.py" WORKDIR="" MODE="train" PORT="${DSNO_COORDINATOR_PORT:-12355}"
DRY_RUN="${DRY_RUN:-0}" TASK=0 TRAIN_TEACHER=0 MAX_REQUEUES=100 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --train-teacher) TRAIN_TEACHER=1; shift ;;
    --max-requeues) MAX_REQUEUES="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --task) TASK=1; shift ;;  # run one task as srun would (tests, debugging): --task -- COMMAND
    --) shift; EXTRA=("$@"); break ;;
    *) echo "slurm_gpu.sh: unknown argument '$1' (see the header of this script)" >&2; exit 2 ;;
  esac
done
if [[ $TASK == 1 ]]; then
  exec bash -c "$TASK_SH" dsno_task "${EXTRA[@]}"
fi
if [[ -z "$WORKDIR" ]]; then
  echo "slurm_gpu.sh: --workdir is required (a directory every node can read and write)" >&2
  exit 2
fi
teacher_given() {
  local i
  for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    case "${EXTRA[$i]}" in
      --config.teacher.checkpoint=?*) return 0 ;;
      --config.teacher.checkpoint) [[ -n "${EXTRA[$((i + 1))]:-}" ]] && return 0 ;;
    esac
  done
  return 1
}
case "$(basename "$CONFIG")" in
  cifar10.py|imagenet64.py)
    if [[ "$MODE" == pipeline || "$MODE" == train_teacher ]] && [[ $TRAIN_TEACHER == 0 ]] \
        && ! teacher_given; then
      echo "slurm_gpu.sh: --config $CONFIG --mode $MODE would first train the teacher from" \
           "scratch (800k steps): give -- --config.teacher.checkpoint=..., or --train-teacher" >&2
      exit 2
    fi ;;
esac
if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
  echo "slurm_gpu.sh: SLURM_JOB_NODELIST is not set: submit with sbatch, or set it for a dry run" >&2
  exit 2
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
if command -v scontrol >/dev/null 2>&1; then
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  mapfile -t HOSTS < <(python3 "$HERE/slurm_hosts.py" "$SLURM_JOB_NODELIST")
fi
NODES="${SLURM_NNODES:-${#HOSTS[@]}}"
GPUS_PER_NODE="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # "h100:8" -> 8
TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-${GPUS_PER_NODE:-8}}"
if [[ -n "$GPUS_PER_NODE" && "$GPUS_PER_NODE" != "$TASKS_PER_NODE" ]]; then
  echo "slurm_gpu.sh: $TASKS_PER_NODE tasks but $GPUS_PER_NODE GPUs a node: one process per GPU" \
       "needs --ntasks-per-node equal to --gpus-per-node" >&2
  exit 2
fi
NUM_PROCESSES=$((NODES * TASKS_PER_NODE))
# Process 0 (srun's block distribution puts tasks 0..TASKS_PER_NODE-1 on the first node) runs
# the coordinator there.
export JAX_COORDINATOR_ADDRESS="${HOSTS[0]}:$PORT"
# The workdir lock's job (dsno_jax/lock.py); srun passes it on with the rest of the environment.
[[ -z "${SLURM_JOB_ID:-}" ]] || export DSNO_JAX_JOB_ID="slurm:$SLURM_JOB_ID"

CMD=(python3 -m dsno_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$MODE" "${EXTRA[@]}")
SRUN=(srun "--ntasks-per-node=$TASKS_PER_NODE" --distribution=block --kill-on-bad-exit=0)
# srun's tasks get one CPU each unless told otherwise: share the node's CPUs among them (data
# loading runs on them).
CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-}"
if [[ -z "$CPUS_PER_TASK" && -n "${SLURM_CPUS_ON_NODE:-}" ]]; then
  CPUS_PER_TASK=$((SLURM_CPUS_ON_NODE / TASKS_PER_NODE))
fi
((${CPUS_PER_TASK:-0} > 0)) && SRUN+=("--cpus-per-task=$CPUS_PER_TASK")

if [[ $DRY_RUN == 1 ]]; then
  echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS DSNO_JAX_JOB_ID=${DSNO_JAX_JOB_ID:-}" \
       "$(printf '%q ' "${SRUN[@]}")bash -c" \
       "'<dsno_task of launch/slurm_gpu.sh>' dsno_task $(printf '%q ' "${CMD[@]}")"
  visible="$(seq -s, 0 $((TASKS_PER_NODE - 1)))"
  for ((node = 0; node < NODES; node++)); do
    for ((lid = 0; lid < TASKS_PER_NODE; lid++)); do
      SLURMD_NODENAME="${HOSTS[$node]}" SLURM_PROCID=$((node * TASKS_PER_NODE + lid)) \
          SLURM_LOCALID=$lid SLURM_NTASKS=$NUM_PROCESSES CUDA_VISIBLE_DEVICES="$visible" \
          DSNO_TASK_DRY_RUN=1 bash -c "$TASK_SH" dsno_task "${CMD[@]}"
    done
  done
  exit 0
fi

echo "slurm_gpu.sh: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $NUM_PROCESSES" \
     "processes on ${HOSTS[*]}, coordinator $JAX_COORDINATOR_ADDRESS: ${CMD[*]}"
trap 'echo "slurm_gpu.sh: SIGTERM: waiting for the processes to save a checkpoint" >&2' TERM
rc=0
"${SRUN[@]}" bash -c "$TASK_SH" dsno_task "${CMD[@]}" || rc=$?
case "$rc" in
  0)
    echo "slurm_gpu.sh: done; results in $WORKDIR"
    exit 0 ;;
  75)
    if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
      echo "slurm_gpu.sh: stopped for a preemption, but the job was already requeued" \
           "${SLURM_RESTART_COUNT} times (--max-requeues); resubmit to resume" >&2
      exit 75
    fi
    echo "slurm_gpu.sh: the processes saved a checkpoint and stopped (preemption or time limit):" \
         "requeueing job $SLURM_JOB_ID; it resumes from $WORKDIR"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
      echo "slurm_gpu.sh: scontrol requeue failed (SLURM may be requeueing a preempted job" \
           "itself); otherwise resubmit the same command to resume" >&2
      exit 75
    fi
    exit 0 ;;
  *)
    echo "slurm_gpu.sh: failed with exit status $rc (not a preemption); not requeued" >&2
    exit "$rc" ;;
esac
