#!/usr/bin/env bash
# Runs dsno_jax on every worker of a Cloud TPU VM pod slice, recreating the slice and resuming
# from the last checkpoint (kept in GCS) when it is preempted.
#
#   launch/tpu_pod.sh --name dsno-v4 --zone us-central2-b --accelerator v4-32 \
#       --bucket gs://my-bucket --config configs/imagenet64.py --mode pipeline [--spot] \
#       [--max-restarts 20] [--dry-run] [-- --config.train.batch_size=2048 ...]
#
# --dry-run prints every command instead of running it (no gcloud needed).
set -euo pipefail

NAME="" ZONE="" ACCEL="v4-32" VERSION="tpu-ubuntu2204-base" BUCKET="" CONFIG="configs/imagenet64.py"
MODE="pipeline" RUN="" SPOT=0 DRY_RUN=0 MAX_RESTARTS=20 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --bucket) BUCKET="${2%/}"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (see the header of this script)" >&2; exit 2 ;;
  esac
done
for var in NAME ZONE BUCKET; do
  if [[ -z "${!var}" ]]; then
    echo "tpu_pod.sh: --${var,,} is required" >&2; exit 2
  fi
done
if [[ "$BUCKET" != gs://* ]]; then
  echo "tpu_pod.sh: --bucket '$BUCKET' must be a GCS path gs://..." >&2; exit 2
fi
RUN="${RUN:-$(basename "$CONFIG" .py)}"
WORKDIR="$BUCKET/dsno_jax/$RUN"
DATA_DIR="$BUCKET/tensorflow_datasets"
SRC="$(cd "$(dirname "$0")/.." && pwd)"

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"
}

create_and_install() {
  local spot=()
  [[ $SPOT == 1 ]] && spot=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL" \
      --version="$VERSION" "${spot[@]}"
  run gcloud compute tpus tpu-vm scp --recurse "$SRC" "$NAME:~/dsno_jax" --zone="$ZONE" --worker=all
  on_all_workers "pip install -U 'jax[tpu]' && pip install -e ~/dsno_jax"
}

state() {
  if [[ $DRY_RUN == 1 ]]; then echo MISSING; return; fi  # a dry run shows a fresh launch
  gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --format='value(state)' 2>/dev/null \
      || echo MISSING
}

# Every worker runs the same command; jax.distributed.initialize() finds the others by itself.
JOB="cd ~/dsno_jax && python -m dsno_jax.main --config=$CONFIG --workdir=$WORKDIR --mode=$MODE"
JOB+=" --config.data.data_dir=$DATA_DIR"
for arg in "${EXTRA[@]}"; do JOB+=" $(printf '%q' "$arg")"; done

[[ "$(state)" == READY ]] || create_and_install
for ((attempt = 0; attempt <= MAX_RESTARTS; attempt++)); do
  if on_all_workers "$JOB"; then
    echo "tpu_pod.sh: finished; results in $WORKDIR"
    exit 0
  fi
  [[ $DRY_RUN == 1 ]] && exit 0
  current="$(state)"
  case "$current" in
    PREEMPTED|TERMINATED|MISSING)
      echo "tpu_pod.sh: slice is $current; recreating and resuming from $WORKDIR/checkpoints" >&2
      run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet || true
      create_and_install ;;
    *)
      echo "tpu_pod.sh: the job failed on a $current slice (not a preemption); stopping" >&2
      exit 1 ;;
  esac
done
echo "tpu_pod.sh: gave up after $MAX_RESTARTS restarts" >&2
exit 1
