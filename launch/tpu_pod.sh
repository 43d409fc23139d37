#!/usr/bin/env bash
# Runs dsno_jax on every worker of a Cloud TPU VM slice and sees it through to the end:
#   1. requests the slice as a queued resource (on-demand by default, --spot or --reserved), with
#      Autocheckpoint where Cloud TPU offers it (v2-v4, v5e: a SIGTERM and up to 5 minutes to save
#      before a maintenance event), and waits until it is ACTIVE (a queued request waits for
#      capacity instead of failing at once);
#   2. copies this source tree to the bucket (WORKDIR/launch/src.tgz) and, on every worker,
#      unpacks it to ~/dsno_jax and installs a Python 3.11 virtual environment (~/dsno_venv) with
#      `pip install -e ".[tpu]"` (see worker_setup for why uv);
#   3. starts `python3 -m dsno_jax.main ...` on every worker detached from the SSH session, with
#      DSNO_JAX_JOB_ID=tpu:NAME/RUN (so a relaunch takes over the workdir lock its run left)
#      (setsid + nohup): the log is ~/dsno_run/job.log on the worker and is copied every minute
#      to WORKDIR/launch/logs/worker-N.log, the exit status to ~/dsno_run/status and
#      WORKDIR/launch/logs/worker-N.status;
#   4. polls: the queued resource's state, and every worker (is the job alive, which exit status
#      did it leave, did its VM reboot under it). Status 0 on every worker: done (the slice is
#      deleted unless --keep). Status 75 (the job saved a checkpoint and stopped for a
#      preemption) or a restarted VM, even when the other workers then died with another status
#      (JAX's distributed service stops every process once one is lost): relaunched in place.
#      The queued resource SUSPENDED/FAILED/gone, or its TPU VMs PREEMPTED/TERMINATED (a
#      preempted slice): deleted, requested again, reinstalled from the bucket and the same
#      command relaunched; it resumes from the checkpoints in WORKDIR = BUCKET/dsno_jax/RUN.
#      Workers that do not answer (a failed ssh) never count as a lost slice: only the API's
#      state does. Any other status is a real failure: the launcher stops and shows the
#      worker's log (the slice is kept).
# The launcher only watches: if it dies (a closed laptop), the job goes on; run the same command
# again to reattach (a running job is not started twice). Long runs: start it under nohup/tmux.
#
#   launch/tpu_pod.sh --name dsno --zone us-central2-b --accelerator v4-32 --bucket gs://B \
#       --config configs/imagenet64.py --mode pipeline [--spot | --reserved] [--version V] \
#       [--run NAME] [--train-teacher] [--python 3.11] [--poll 300] [--wait 60] [--log-sync 60] \
#       [--max-restarts 20] [--keep] [--no-autocheckpoint | --autocheckpoint] \
#       [--dry-run [--dry-run-preempt]] \
#       [-- --config.teacher.checkpoint=gs://B/teachers/imagenet64 ...more config overrides]
# --poll: seconds between status polls; --wait: between state queries while the queued resource
# is not ACTIVE; --log-sync: between copies of each worker's log to the bucket.
# --no-autocheckpoint: request the slice without Autocheckpoint (which needs `gcloud alpha`);
# --autocheckpoint: ask for it on a generation not listed above.
#
# Runtime version (--version overrides): v2/v3/v4 tpu-ubuntu2204-base, v5e (v5litepod-N; the
# API has no v5e-N) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
# A CIFAR-10/ImageNet-64 pipeline (or train_teacher) would first train the teacher from scratch
# (800k steps): it is refused unless -- --config.teacher.checkpoint=... or --train-teacher is given.
# --dry-run prints every gcloud/gsutil command (and what each worker runs) and runs none,
# simulating a launch that finishes; --dry-run-preempt adds one preemption: delete, recreate,
# reinstall, relaunch. Exit status: 0 done, 1 the job failed or too many restarts, 2 bad usage.
set -euo pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
# Paths on a worker, kept unexpanded: they are shown as such by --dry-run and expanded there.
# shellcheck disable=SC2016
W_SRC='$HOME/dsno_jax' W_VENV='$HOME/dsno_venv' W_RUN='$HOME/dsno_run'
DRY_RUN=0

# ------------------------------------------------------------------------------------------
# The worker side: `bash ~/dsno_jax/launch/tpu_pod.sh --worker setup|start|run|status ...`,
# run on every worker through `gcloud compute tpus tpu-vm ssh --worker=all`.

w() {  # one shell command line on this worker, or printed in a dry run
  if [[ $DRY_RUN == 1 ]]; then echo "$1"; else eval "$1"; fi
}

worker_id() {  # this VM's index in the slice, from the metadata server (as JAX reads it)
  if [[ $DRY_RUN == 1 ]]; then echo N; return; fi
  local id="${DSNO_WORKER_ID:-${TPU_WORKER_ID:-}}"
  if [[ -z "$id" ]]; then
    id="$(curl -sf -H 'Metadata-Flavor: Google' \
        http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
        2>/dev/null)" || id="$(hostname)"
  fi
  echo "$id"
}

worker_setup() {  # args: python version
  # Python >= 3.11 (current JAX needs it; the TPU runtime images are Ubuntu 22.04 with Python
  # 3.10, on which `pip install jax[tpu]` quietly gets an older JAX than the one tested). We use
  # uv rather than apt: Ubuntu 22.04 has no python3.11-venv without the deadsnakes PPA, and apt
  # on a fresh TPU VM often waits on unattended-upgrades holding the dpkg lock. uv is one static
  # binary in ~/.local/bin (its installer needs only curl; pip --user is the fallback), and
  # `uv venv --python 3.11` fetches a standalone CPython build into ~/.local/share/uv: no root,
  # the same on every runtime image, and a re-run reuses the environment.
  local python="$1"
  w 'export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"'
  w 'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh || python3 -m pip install --user -q uv'
  w "[[ -x \"$W_VENV/bin/python3\" ]] || uv venv --python $python \"$W_VENV\""
  w "uv pip install --python \"$W_VENV/bin/python3\" -e \"${W_SRC}[tpu]\""
  w "\"$W_VENV/bin/python3\" -c 'import sys, jax; assert sys.version_info >= (3, 11), sys.version; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)'"
}

BOOT_ID=/proc/sys/kernel/random/boot_id  # Linux: a new random id at every boot

same_boot() {  # was the job started since this VM last booted?
  [[ "$(cat "$HOME/dsno_run/boot_id" 2>/dev/null)" == "$(cat "$BOOT_ID")" ]]
}

worker_alive() {  # is the job runner whose pid is in ~/dsno_run/pid alive?
  local pid
  pid="$(cat "$HOME/dsno_run/pid" 2>/dev/null)" || return 1
  # a pid of an earlier boot names another process now, whatever its command line
  same_boot && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
      && grep -qa -- '--worker' "/proc/$pid/cmdline" 2>/dev/null
}

worker_start() {  # args: logs log_sync command...; returns at once, the job runs detached
  local logs="$1" sync="$2"; shift 2
  local job runner
  job="$(printf '%q ' "$@")"
  runner="bash \"$W_SRC/launch/tpu_pod.sh\" --worker run $(printf '%q' "$logs") $sync -- $job"
  if [[ $DRY_RUN == 0 ]] && worker_alive; then
    echo "tpu_pod.sh: worker $(worker_id): the job is already running (pid $(cat "$HOME/dsno_run/pid"))"
    return 0
  fi
  w "mkdir -p \"$W_RUN\" && rm -f \"$W_RUN/status\" \"$W_RUN/pid\""
  # setsid: a session of its own, so closing the SSH connection sends it no SIGHUP; nohup and
  # the redirections: nothing left attached to the SSH channel, so `ssh` returns at once. The
  # runner writes its pid to ~/dsno_run/pid; wait for it, so that a status query right after
  # this sees the job running.
  w "setsid nohup $runner > \"$W_RUN/job.log\" 2>&1 < /dev/null &"
  w "for i in \$(seq 100); do [[ -s \"$W_RUN/pid\" ]] && break; sleep 0.1; done"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# the runner, detached:"
    worker_run "$logs" "$sync" "$@"
  fi
}

# shellcheck disable=SC2034
worker_run() {  # args: logs log_sync command...; stdout and stderr already go to job.log
  local logs="$1" sync="$2"; shift 2
  local id log_gs status_gs syncer child rc  # syncer, child, rc: used by the eval'd lines
  id="$(worker_id)"
  log_gs="$logs/worker-$id.log" status_gs="$logs/worker-$id.status"
  w "cat $BOOT_ID > \"$W_RUN/boot_id\""
  w "echo \$\$ > \"$W_RUN/pid.tmp\" && mv \"$W_RUN/pid.tmp\" \"$W_RUN/pid\""
  w "echo running | gsutil -q cp - $status_gs || true"
  # the log goes to the bucket every $sync seconds while the job runs, and once more at the end
  w "( while sleep $sync; do gsutil -q cp \"$W_RUN/job.log\" $log_gs || true; done ) & syncer=\$!"
  w "cd \"$W_SRC\" && export VIRTUAL_ENV=\"$W_VENV\" PATH=\"$W_VENV/bin:\$PATH\""  # python3: the venv's
  [[ $DRY_RUN == 1 ]] || echo "tpu_pod.sh: worker $id starts $(date -u '+%F %T') UTC: $*"
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(printf '%q ' "$@")& child=\$!"
  else
    "$@" &
    child=$!
  fi
  # SIGTERM (a preemption, a maintenance event: the VM shuts down) reaches the job directly (the
  # whole session is signalled); this runner ignores it so that it outlives the job and records
  # its exit status. Ignoring it after the fork leaves the job's own handler untouched.
  w "trap '' TERM HUP INT; rc=0; wait \$child || rc=\$?"
  w "kill \$syncer 2>/dev/null || true; echo \$rc > \"$W_RUN/status.tmp\" && mv \"$W_RUN/status.tmp\" \"$W_RUN/status\""
  [[ $DRY_RUN == 1 ]] || echo "tpu_pod.sh: worker $id: the job exited with status $rc at $(date -u '+%F %T') UTC"
  w "gsutil -q cp \"$W_RUN/job.log\" $log_gs || true; echo \$rc | gsutil -q cp - $status_gs || true"
}

worker_status() {  # one line: DSNO_STATUS worker=N state=running|exited status=S|restarted|none
  local id
  id="$(worker_id)"
  if worker_alive; then
    echo "DSNO_STATUS worker=$id state=running"
  elif [[ -s "$HOME/dsno_run/status" ]]; then
    echo "DSNO_STATUS worker=$id state=exited status=$(tr -dc 0-9 < "$HOME/dsno_run/status")"
  elif [[ -s "$HOME/dsno_run/pid" ]] && ! same_boot; then
    # the job was running when the VM went down: it left no exit status
    echo "DSNO_STATUS worker=$id state=restarted"
  else
    echo "DSNO_STATUS worker=$id state=none"
  fi
}

worker_main() {
  local cmd="$1"; shift
  if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
  case "$cmd" in
    setup) worker_setup "$@" ;;
    start) local logs="$1" sync="$2"; shift 3; worker_start "$logs" "$sync" "$@" ;;  # [--] cmd
    run) local logs="$1" sync="$2"; shift 3; worker_run "$logs" "$sync" "$@" ;;
    status) worker_status ;;
    *) echo "tpu_pod.sh --worker: unknown command '$cmd'" >&2; return 2 ;;
  esac
}

if [[ "${1:-}" == --worker ]]; then
  shift
  worker_main "$@"
  exit $?
fi

# ------------------------------------------------------------------------------------------
# The launcher.

NAME="" ZONE="" ACCEL="v4-32" VERSION="" BUCKET="" CONFIG="configs/imagenet64.py" MODE="pipeline"
RUN="" TIER="" TRAIN_TEACHER=0 PY="3.11" POLL=300 WAIT=60 LOG_SYNC=60 MAX_RESTARTS=20 KEEP=0
AUTOCHECKPOINT="" SILENT_LIMIT=6 DRY_RUN_PREEMPT=0 EXTRA=()
usage() { echo "tpu_pod.sh: $1 (see the header of this script)" >&2; exit 2; }
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
    --spot|--reserved)
      [[ -z "$TIER" || "$TIER" == "$1" ]] || usage "--spot and --reserved exclude each other"
      TIER="$1"; shift ;;
    --train-teacher) TRAIN_TEACHER=1; shift ;;
    --python) PY="$2"; shift 2 ;;
    --poll) POLL="$2"; shift 2 ;;
    --wait) WAIT="$2"; shift 2 ;;
    --log-sync) LOG_SYNC="$2"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --autocheckpoint) AUTOCHECKPOINT=1; shift ;;
    --no-autocheckpoint) AUTOCHECKPOINT=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --dry-run-preempt) DRY_RUN=1 DRY_RUN_PREEMPT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
for var in NAME ZONE BUCKET; do
  [[ -n "${!var}" ]] || usage "--${var,,} is required"
done
[[ "$BUCKET" == gs://* ]] || usage "--bucket '$BUCKET' must be a GCS path gs://..."
for var in POLL WAIT LOG_SYNC MAX_RESTARTS; do
  [[ "${!var}" =~ ^[0-9]+$ ]] || usage "--${var,,} must be a whole number, not '${!var}'"
done
[[ "$PY" =~ ^3\.(1[1-9]|[2-9][0-9])$ ]] || usage "--python $PY: dsno_jax needs Python 3.11 or newer"
SRC="$(cd "$(dirname "$SELF")/.." && pwd)"
[[ "$CONFIG" != /* && -f "$SRC/$CONFIG" ]] || \
  usage "--config $CONFIG: give a config file of this tree, relative to its root (e.g. configs/cifar10.py)"

# The API knows v5e slices only as v5litepod-N; "v5e-N" would fail only once the request is made.
if [[ "$ACCEL" == v5e-* ]]; then
  usage "--accelerator $ACCEL: Cloud TPU names v5e slices v5litepod-N: give --accelerator ${ACCEL/v5e/v5litepod}"
fi
if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v2-*|v3-*|v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) usage "no runtime version known for --accelerator $ACCEL: give --version" ;;
  esac
fi

# Autocheckpoint (Cloud TPU, preview): before a maintenance event the job gets SIGTERM and up to
# 5 minutes to save, instead of being killed. The documentation offers it for v2-v4 and v5e,
# through `gcloud alpha`: https://cloud.google.com/tpu/docs/autocheckpoint
if [[ -z "$AUTOCHECKPOINT" ]]; then
  case "$ACCEL" in
    v2-*|v3-*|v4-*|v5litepod-*) AUTOCHECKPOINT=1 ;;
    *) AUTOCHECKPOINT=0 ;;
  esac
fi

has_teacher_checkpoint() {
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
        && ! has_teacher_checkpoint; then
      echo "tpu_pod.sh: --config $CONFIG --mode $MODE would first train the teacher from scratch" \
           "(800k steps). Give the published teacher: -- --config.teacher.checkpoint=gs://...," \
           "or pass --train-teacher if that is what you want." >&2
      exit 2
    fi ;;
esac
# the Python entry refuses the same unless told (configs/base.py: teacher.train_from_scratch)
[[ $TRAIN_TEACHER == 1 ]] && EXTRA+=("--config.teacher.train_from_scratch=True")

RUN="${RUN:-$(basename "$CONFIG" .py)}"
[[ "$RUN" =~ ^[A-Za-z0-9._-]+$ ]] || usage "--run '$RUN': letters, digits, '.', '_' and '-' only"
WORKDIR="$BUCKET/dsno_jax/$RUN"
LOGS="$WORKDIR/launch/logs"
SRC_GS="$WORKDIR/launch/src.tgz"
DATA_DIR="$BUCKET/tensorflow_datasets"
# The job's id for the workdir lock (dsno_jax/lock.py): every relaunch of this launch, on this
# slice or a recreated one, takes over the lock its earlier run left; another slice's run of the
# same workdir does not.
JOB_ID="tpu:$NAME/$RUN"
# Every worker runs the same command; jax.distributed.initialize() finds the others by itself.
JOB=(env "DSNO_JAX_JOB_ID=$JOB_ID" python3 -m dsno_jax.main "--config=$CONFIG"
     "--workdir=$WORKDIR" "--mode=$MODE" "--config.data.data_dir=$DATA_DIR" "${EXTRA[@]}")

run() {  # a command, or printed in a dry run
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
say() { echo "tpu_pod.sh: [$(date -u '+%F %T')] $*" >&2; }
nap() { [[ $DRY_RUN == 1 ]] || sleep "$1"; }

slice_workers() {  # hosts of the slice (only to simulate a dry run's status replies)
  local n="${ACCEL##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || { echo 1; return; }
  case "$ACCEL" in
    v5litepod-*|v6e-*) echo $(( n > 8 ? n / 4 : 1 )) ;;  # chips, 4 a host when several
    *) echo $(( n >= 8 ? n / 8 : 1 )) ;;  # v2..v5p: TensorCores, 8 a host
  esac
}

# Dry runs: the queued resource's simulated state (a fresh launch).
SIM_STATE=NOT_FOUND SIM_PREEMPTED=0

api_state() {  # args: what, a describe command; prints the state, NOT_FOUND or UNREACHABLE
  local what="$1" out err
  shift
  err="$(mktemp)"
  if out="$("$@" 2>"$err")"; then
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'not.?found' "$err"; then
    echo NOT_FOUND
  else
    echo UNREACHABLE
    say "could not ask for the state of $what: $(tail -n 1 "$err")"
  fi
  rm -f "$err"
}

STATE=""
query_state() {  # sets STATE: a queued-resource state, NOT_FOUND, or UNREACHABLE
  local cmd=(gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE"
             --format='value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    run "${cmd[@]}"
    STATE="$SIM_STATE"
    [[ "$SIM_STATE" == WAITING_FOR_RESOURCES ]] && SIM_STATE=ACTIVE
    echo "# (dry run) state: $STATE"
    return
  fi
  STATE="$(api_state "queued resource $NAME" "${cmd[@]}")"
}

NODE_STATE=""
query_node_state() {  # sets NODE_STATE: the TPU VMs' state (READY, REPAIRING, PREEMPTED, ...)
  local cmd=(gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --format='value(state)')
  if [[ $DRY_RUN == 1 ]]; then
    run "${cmd[@]}"
    NODE_STATE=READY
    return
  fi
  NODE_STATE="$(api_state "TPU $NAME" "${cmd[@]}")"
}

RESTARTS=0
bump_restarts() {
  RESTARTS=$((RESTARTS + 1))
  if ((RESTARTS > MAX_RESTARTS)); then
    say "gave up after $MAX_RESTARTS restarts (--max-restarts); the checkpoints are in $WORKDIR"
    exit 1
  fi
}

create_slice() {
  local gcloud=(gcloud) options=()
  [[ -n "$TIER" ]] && options+=("$TIER")
  if [[ $AUTOCHECKPOINT == 1 ]]; then
    gcloud=(gcloud alpha) options+=(--autocheckpoint-enabled)
  fi
  say "requesting $ACCEL ($VERSION, ${TIER:-on-demand}, autocheckpoint" \
      "$( ((AUTOCHECKPOINT)) && echo on || echo off)) as queued resource $NAME in $ZONE"
  run "${gcloud[@]}" compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      --zone="$ZONE" --accelerator-type="$ACCEL" --runtime-version="$VERSION" "${options[@]}"
  SIM_STATE=WAITING_FOR_RESOURCES
}

delete_slice() {
  # --force deletes the TPU VMs with the request; --quiet: no prompt
  run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet || true
  SIM_STATE=NOT_FOUND
}

ensure_active() {  # returns once the queued resource is ACTIVE, (re)requesting it as needed
  local last=""
  while true; do
    query_state
    [[ "$STATE" != "$last" ]] && say "queued resource $NAME: $STATE"
    last="$STATE"
    case "$STATE" in
      ACTIVE) return 0 ;;
      NOT_FOUND) create_slice ;;
      FAILED|SUSPENDING|SUSPENDED)
        # FAILED: not granted (e.g. a --valid-until passed, a bad request: its reason follows);
        # SUSPENDING/SUSPENDED: its VMs were taken back (a preempted spot slice).
        [[ "$STATE" == FAILED && $DRY_RUN == 0 ]] && gcloud compute tpus queued-resources \
            describe "$NAME" --zone="$ZONE" --format='yaml(state)' >&2 || true
        bump_restarts
        say "deleting $NAME and requesting it again (restart $RESTARTS of at most $MAX_RESTARTS)"
        delete_slice ;;
      *) nap "$WAIT" ;;  # WAITING_FOR_RESOURCES, PROVISIONING, CREATING, DELETING, UNREACHABLE...
    esac
  done
}

# A recreated slice reuses its workers' names with new host keys: a known_hosts entry of the old
# ones must not refuse them.
SSH_OPTIONS=(--strict-host-key-checking=no)

ssh_all() {  # a command line on every worker; a dry run also shows what the workers run
  local remote="$1"; shift
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all "${SSH_OPTIONS[@]}" \
      --command="$remote"
  if [[ $DRY_RUN == 1 && $# -gt 0 ]]; then
    (worker_main "$1" --dry-run "${@:2}") | sed 's/^/    [every worker] /'
  fi
}

WORKER_SH='bash ~/dsno_jax/launch/tpu_pod.sh --worker'

upload_source() {
  local tgz="${TMPDIR:-/tmp}/dsno_jax_src.$$.tgz"
  say "copying $SRC to $SRC_GS"
  run tar -czf "$tgz" -C "$SRC" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache --exclude=.benchmarks --exclude='./workdir*' --exclude=./build \
      --exclude=./dist --exclude=./.venv --exclude=./benchmarks/results .
  run gsutil -q cp "$tgz" "$SRC_GS"
  [[ $DRY_RUN == 1 ]] || rm -f "$tgz"
}

launch_job() {  # install on every worker from the bucket, then start the job detached
  say "installing on every worker of $NAME (Python $PY, jax[tpu])"
  ssh_all "set -e; rm -rf ~/dsno_jax; mkdir -p ~/dsno_jax; gsutil -q cp $SRC_GS /tmp/dsno_jax_src.tgz; tar -xzf /tmp/dsno_jax_src.tgz -C ~/dsno_jax; $WORKER_SH setup $PY" \
      setup "$PY" || return 1
  say "starting on every worker: ${JOB[*]}"
  ssh_all "$WORKER_SH start $LOGS $LOG_SYNC -- $(printf '%q ' "${JOB[@]}")" \
      start "$LOGS" "$LOG_SYNC" -- "${JOB[@]}" || return 1
  say "logs: $LOGS/worker-N.log (and ~/dsno_run/job.log on each worker)"
}

# Sets RUNNING DONE PREEMPTED RESTARTED NONE FAILED (lists of worker ids), REPLIES, and SILENT=1
# when some worker did not answer (gcloud's ssh to it failed).
RUNNING=() DONE=() PREEMPTED=() RESTARTED=() NONE=() FAILED=() REPLIES=0 SILENT=0
query_workers() {
  local remote="$WORKER_SH status 2>/dev/null || echo DSNO_STATUS worker=unknown state=none"
  local out line id state status rc=0
  RUNNING=() DONE=() PREEMPTED=() RESTARTED=() NONE=() FAILED=() REPLIES=0
  if [[ $DRY_RUN == 1 ]]; then
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all "${SSH_OPTIONS[@]}" \
        --command="$remote"
    out=""
    for ((id = 0; id < $(slice_workers); id++)); do
      out+="DSNO_STATUS worker=$id state=exited status=0"$'\n'
    done
    echo "# (dry run) replies: every worker state=exited status=0"
  else
    out="$(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
           "${SSH_OPTIONS[@]}" --command="$remote" 2>/dev/null)" || rc=$?
  fi
  while read -r line; do
    [[ "$line" =~ DSNO_STATUS\ worker=([^ ]+)\ state=([a-z]+)(\ status=([0-9]+))? ]] || continue
    id="${BASH_REMATCH[1]}" state="${BASH_REMATCH[2]}" status="${BASH_REMATCH[4]}"
    REPLIES=$((REPLIES + 1))
    case "$state:$status" in
      running:*) RUNNING+=("$id") ;;
      exited:0) DONE+=("$id") ;;
      exited:75) PREEMPTED+=("$id") ;;
      exited:*) FAILED+=("$id:$status") ;;
      restarted:*) RESTARTED+=("$id") ;;
      *) NONE+=("$id") ;;
    esac
  done <<< "$out"
  SILENT=$(( rc != 0 || REPLIES == 0 ))
}

report_failure() {
  local item id
  for item in "${FAILED[@]}"; do
    id="${item%%:*}"
    say "worker $id: the job failed with exit status ${item#*:} (not a preemption); its log:" \
        "$LOGS/worker-$id.log. The last lines:"
    if [[ $DRY_RUN == 1 ]]; then
      run gsutil cat "$LOGS/worker-$id.log"
    else
      gsutil cat "$LOGS/worker-$id.log" 2>/dev/null | tail -n 40 >&2 || true
    fi
  done
  say "stopped. The slice $NAME is kept for inspection; delete it with:" \
      "gcloud compute tpus queued-resources delete $NAME --zone=$ZONE --force --quiet"
}

relaunch() {  # the job stopped on an ACTIVE slice: start it again there
  bump_restarts
  NEED_LAUNCH=1
}

# ------------------------------------------------------------------------------------------
say "run $RUN: $ACCEL in $ZONE, runtime $VERSION; workdir $WORKDIR; job $JOB_ID"
NEED_LAUNCH=1
query_state
if [[ "$STATE" == ACTIVE ]] && { query_workers; ((${#RUNNING[@]} > 0)); }; then
  say "the job is already running on $NAME (workers ${RUNNING[*]}): watching it"
  NEED_LAUNCH=0
else
  upload_source
fi

SILENT_POLLS=0 LAUNCH_FAILURES=0
while true; do
  if [[ $NEED_LAUNCH == 1 ]]; then
    ensure_active
    if ! launch_job; then
      query_state
      if [[ "$STATE" == ACTIVE ]]; then
        LAUNCH_FAILURES=$((LAUNCH_FAILURES + 1))
        ((LAUNCH_FAILURES < 3)) || { say "installing or starting failed 3 times; stopping"; exit 1; }
        say "installing or starting failed on an ACTIVE slice; trying again"
      fi
      continue  # not ACTIVE: ensure_active requests it again
    fi
    NEED_LAUNCH=0 LAUNCH_FAILURES=0 SILENT_POLLS=0
  fi

  nap "$POLL"
  if [[ $DRY_RUN_PREEMPT == 1 && $SIM_PREEMPTED == 0 ]]; then
    SIM_STATE=SUSPENDED SIM_PREEMPTED=1
  fi
  query_state
  case "$STATE" in
    ACTIVE) ;;
    UNREACHABLE|UNKNOWN) continue ;;
    *)
      say "the slice is $STATE (preempted or lost): recreating it and resuming from $WORKDIR"
      NEED_LAUNCH=1
      continue ;;  # ensure_active deletes and requests it again
  esac

  query_workers
  LOST=("${RESTARTED[@]}" "${NONE[@]}")
  if ((${#FAILED[@]} > 0 && ${#LOST[@]} > 0)); then
    # A worker's VM restarted under the job (or its job vanished without a status) and the
    # others then died with "the JAX distributed service detected fatal errors": JAX's
    # coordination service stops every process once one is lost. The job itself did not fail.
    say "workers ${FAILED[*]} (worker:status) stopped after the job was lost on workers" \
        "${LOST[*]} (restarted: ${RESTARTED[*]:-none}): relaunching it, resuming from $WORKDIR"
    relaunch
    continue
  fi
  if ((SILENT)); then
    # An ssh that fails says nothing about the slice (a worker rebooting, a network blip, a
    # busy sshd): only the API's state of the slice may have it recreated.
    SILENT_POLLS=$((SILENT_POLLS + 1))
    say "$REPLIES workers answered, the others did not ($SILENT_POLLS polls in a row); running" \
        "on: ${RUNNING[*]:-none}"
    ((SILENT_POLLS % SILENT_LIMIT == 0)) || continue
    query_node_state
    case "$NODE_STATE" in
      PREEMPTED|TERMINATED|NOT_FOUND)
        say "the TPU VMs of $NAME are $NODE_STATE: recreating the slice, resuming from $WORKDIR"
        bump_restarts
        delete_slice
        NEED_LAUNCH=1 ;;
      *)
        if ((${#FAILED[@]} > 0)); then
          say "workers stay silent on a $NODE_STATE slice after a failure"
          report_failure
          exit 1
        fi
        say "the TPU VMs of $NAME are $NODE_STATE: waiting for the silent workers" ;;
    esac
    continue
  fi
  SILENT_POLLS=0
  if ((${#FAILED[@]} > 0)); then
    report_failure
    exit 1
  fi
  if ((${#RUNNING[@]} > 0)); then
    if ((${#LOST[@]} > 0)); then
      say "running on ${#RUNNING[@]} of $REPLIES workers; lost on ${LOST[*]}: JAX stops the" \
          "others once it notices, then the job is relaunched"
    else
      say "running on ${#RUNNING[@]} of $REPLIES workers"
    fi
    continue
  fi
  if ((${#DONE[@]} == REPLIES)); then
    say "finished on all $REPLIES workers; results in $WORKDIR"
    if [[ $KEEP == 0 ]]; then
      say "deleting the slice (--keep keeps it)"
      delete_slice
    fi
    exit 0
  fi
  # Nothing runs, nothing failed: the job stopped for a preemption (status 75) or the VMs were
  # restarted under it (no status) while the slice stayed ACTIVE: relaunch in place.
  say "the job stopped (preempted: ${PREEMPTED[*]:-none}; restarted: ${RESTARTED[*]:-none};" \
      "no status: ${NONE[*]:-none}) on an ACTIVE slice: relaunching it, resuming from $WORKDIR"
  relaunch
done
