#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each driving all of its GPUs;
# the coordinator is the job's first node. Submit with
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh --config configs/imagenet64.py \
#       --workdir /shared/runs/imagenet64 --mode train [-- --config.train.batch_size=2048]
# `DRY_RUN=1 launch/slurm_gpu.sh ...` (or --dry-run) prints each process's command instead;
# outside a job it takes SLURM_JOB_NODELIST / SLURM_NNODES from the environment.
#SBATCH --job-name=dsno_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:TERM@180
#SBATCH --time=48:00:00
set -euo pipefail

CONFIG="configs/imagenet64.py" WORKDIR="" MODE="train" PORT="${DSNO_COORDINATOR_PORT:-12355}"
DRY_RUN="${DRY_RUN:-0}" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "slurm_gpu.sh: unknown argument '$1' (see the header of this script)" >&2; exit 2 ;;
  esac
done
if [[ -z "$WORKDIR" ]]; then
  echo "slurm_gpu.sh: --workdir is required (a directory every node can read and write)" >&2
  exit 2
fi
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
NUM_PROCESSES="${SLURM_NNODES:-${#HOSTS[@]}}"
COORDINATOR="${HOSTS[0]}:$PORT"
GPUS="${SLURM_GPUS_PER_NODE:-8}"

CMD=(python -m dsno_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$MODE" "${EXTRA[@]}")
if [[ $DRY_RUN == 1 ]]; then
  for ((rank = 0; rank < NUM_PROCESSES; rank++)); do
    printf 'host=%s JAX_COORDINATOR_ADDRESS=%s JAX_NUM_PROCESSES=%s JAX_PROCESS_ID=%s CUDA_VISIBLE_DEVICES=%s ' \
        "${HOSTS[$rank]}" "$COORDINATOR" "$NUM_PROCESSES" "$rank" "$(seq -s, 0 $((GPUS - 1)))"
    printf '%q ' "${CMD[@]}"; echo
  done
  exit 0
fi
export JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM_PROCESSES"
# SIGTERM (preemption, or --signal above) reaches python, which saves a checkpoint; a
# requeued job resumes from it.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c \
    'JAX_PROCESS_ID=$SLURM_PROCID exec "$@"' _ "${CMD[@]}"
