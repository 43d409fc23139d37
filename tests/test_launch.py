"""launch/: the TPU and SLURM launchers (dry runs, and their decision logic run against stub
gcloud/gsutil/srun/scontrol), and the local launcher, which really runs a 2-host collective."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
sys.path.insert(0, LAUNCH)
import local  # noqa: E402  (launch/local.py)
import slurm_hosts  # noqa: E402


def run(cmd, env=None, timeout=60):
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, **(env or {})})
  return out.returncode, out.stdout, out.stderr


def write_stub(directory, name, text):
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write("#!/bin/bash\n" + text)
  os.chmod(path, 0o755)
  return path


# ------------------------------------------------------------------ TPU pod slices (dry runs)
def tpu_dry_run(*args):
  return run(["bash", "launch/tpu_pod.sh", "--name", "dsno", "--zone", "us-central2-b",
              "--bucket", "gs://my-bucket/", *args])


def parse(out):
  """(commands as argv lists, what the workers run) of a dry run's output."""
  commands, worker = [], []
  for line in out.splitlines():
    if line.startswith("    [every worker] "):
      worker.append(line[len("    [every worker] "):])
    elif line.strip() and not line.startswith("#"):
      commands.append(shlex.split(line))
  return commands, worker


def kind(cmd):
  """A short name for each gcloud/gsutil command of a dry run."""
  if cmd[0] == "gcloud" and "queued-resources" in cmd[:5]:
    return "qr-" + cmd[cmd.index("queued-resources") + 1]
  if cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
    remote = next(a for a in cmd if a.startswith("--command="))
    for step in ("setup", "start", "status"):
      if f"--worker {step}" in remote:
        return "ssh-" + step
    return "ssh"
  return cmd[0]


def remote_command(cmd):
  return shlex.split(next(a for a in cmd if a.startswith("--command="))[len("--command="):])


JOB = ["env", "DSNO_JAX_JOB_ID=tpu:dsno/imagenet64", "python3", "-m", "dsno_jax.main", "--config=configs/imagenet64.py",
       "--workdir=gs://my-bucket/dsno_jax/imagenet64", "--mode=train",
       "--config.data.data_dir=gs://my-bucket/tensorflow_datasets",
       "--config.train.batch_size=2048"]


def test_tpu_pod_dry_run_for_a_v4_32_slice():
  code, out, err = tpu_dry_run("--accelerator", "v4-32", "--config", "configs/imagenet64.py",
                               "--mode", "train", "--spot", "--dry-run", "--",
                               "--config.train.batch_size=2048")
  assert code == 0, err
  commands, worker = parse(out)
  kinds = [kind(c) for c in commands]
  # the source goes to the bucket; a queued resource is requested and awaited; the job is
  # installed and started on every worker, polled, and the slice deleted when it is done
  assert [k for k in kinds if k != "qr-describe"] == [
      "tar", "gsutil", "qr-create", "ssh-setup", "ssh-start", "ssh-status", "qr-delete"], kinds
  assert kinds.index("qr-create") < max(i for i, k in enumerate(kinds) if k == "qr-describe")
  assert "tpu-vm create" not in out
  create = commands[kinds.index("qr-create")]
  # with Autocheckpoint, which Cloud TPU offers for v4 through gcloud alpha
  assert create == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "dsno",
                    "--node-id=dsno", "--zone=us-central2-b", "--accelerator-type=v4-32",
                    "--runtime-version=tpu-ubuntu2204-base", "--spot", "--autocheckpoint-enabled"]
  describe = commands[kinds.index("qr-describe")]
  assert "--format=value(state.state)" in describe
  assert commands[kinds.index("gsutil")][-1] == "gs://my-bucket/dsno_jax/imagenet64/launch/src.tgz"
  for c in commands:
    if kind(c).startswith("ssh"):  # a recreated slice's workers have new host keys
      assert c[5:9] == ["dsno", "--zone=us-central2-b", "--worker=all",
                        "--strict-host-key-checking=no"], c

  # set-up: the source from the bucket, a Python 3.11 environment made with uv, jax[tpu]
  setup = " ".join(remote_command(commands[kinds.index("ssh-setup")]))
  assert "gsutil -q cp gs://my-bucket/dsno_jax/imagenet64/launch/src.tgz" in setup
  assert setup.endswith("--worker setup 3.11")
  assert any("uv venv --python 3.11" in w for w in worker)
  assert any('uv pip install --python "$HOME/dsno_venv/bin/python3" -e "$HOME/dsno_jax[tpu]"' in w
             for w in worker)
  assert any("sys.version_info >= (3, 11)" in w for w in worker)

  # start: the same command on every worker, detached, logs to the worker's disk and the bucket
  start = remote_command(commands[kinds.index("ssh-start")])
  assert start[:6] == ["bash", "~/dsno_jax/launch/tpu_pod.sh", "--worker", "start",
                       "gs://my-bucket/dsno_jax/imagenet64/launch/logs", "60"]
  assert start[6:] == ["--"] + JOB
  detach = [w for w in worker if w.startswith("setsid nohup ")]
  assert len(detach) == 1 and '> "$HOME/dsno_run/job.log" 2>&1 < /dev/null &' in detach[0]
  logs = "gs://my-bucket/dsno_jax/imagenet64/launch/logs/worker-N"
  assert any(f'gsutil -q cp "$HOME/dsno_run/job.log" {logs}.log' in w for w in worker)
  assert any(f"gsutil -q cp - {logs}.status" in w for w in worker)
  assert any(w.startswith(shlex.join(JOB)) for w in worker)
  assert " python " not in out  # python3 everywhere
  assert "job tpu:dsno/imagenet64" in err

  # polling: the workers report whether the job is alive and its exit status
  status = remote_command(commands[kinds.index("ssh-status")])
  assert status[:4] == ["bash", "~/dsno_jax/launch/tpu_pod.sh", "--worker", "status"]
  assert "finished on all 4 workers" in err


def test_tpu_pod_dry_run_v5e_recreates_and_resumes_after_a_preemption():
  code, out, err = tpu_dry_run("--accelerator", "v5litepod-16", "--config",
                               "configs/imagenet64.py", "--mode", "train", "--dry-run-preempt")
  assert code == 0, err
  commands, _ = parse(out)
  kinds = [kind(c) for c in commands if kind(c) != "qr-describe"]
  assert kinds == ["tar", "gsutil",
                   "qr-create", "ssh-setup", "ssh-start",  # first launch, then the preemption:
                   "qr-delete", "qr-create", "ssh-setup", "ssh-start",  # recreate, relaunch
                   "ssh-status", "qr-delete"], kinds
  creates = [c for c in commands if kind(c) == "qr-create"]
  assert creates[0] == creates[1]
  assert "--runtime-version=v2-alpha-tpuv5-lite" in creates[0]
  assert "--accelerator-type=v5litepod-16" in creates[0]
  assert "--spot" not in creates[0] and "--reserved" not in creates[0]  # on-demand by default
  assert creates[0][:2] == ["gcloud", "alpha"] and creates[0][-1] == "--autocheckpoint-enabled"
  assert [c for c in commands if kind(c) == "qr-delete"][0] == [
      "gcloud", "compute", "tpus", "queued-resources", "delete", "dsno", "--zone=us-central2-b",
      "--force", "--quiet"]
  starts = [remote_command(c) for c in commands if kind(c) == "ssh-start"]
  assert starts[0] == starts[1]  # the same command: it resumes from the bucket's checkpoints
  assert "state: SUSPENDED" in out and "recreating it and resuming" in err


def test_tpu_pod_dry_run_v6e_8_reserved_and_kept():
  code, out, err = tpu_dry_run("--accelerator", "v6e-8", "--mode", "train", "--reserved",
                               "--keep", "--dry-run")
  assert code == 0, err
  commands, _ = parse(out)
  create = next(c for c in commands if kind(c) == "qr-create")
  assert "--runtime-version=v2-alpha-tpuv6e" in create and create[-1] == "--reserved"
  assert create[1] == "compute"  # no Autocheckpoint on v6e: the documentation does not offer it
  assert "qr-delete" not in [kind(c) for c in commands]  # --keep
  assert "finished on all 1 workers" in err


def test_tpu_pod_runtime_version_choice():
  code, out, err = tpu_dry_run("--accelerator", "v5p-128", "--mode", "train", "--dry-run")
  assert code == 0 and "--runtime-version=v2-alpha-tpuv5 " in out, err
  code, out, err = tpu_dry_run("--accelerator", "v5p-128", "--version", "my-runtime", "--mode",
                               "train", "--dry-run")
  assert code == 0 and "--runtime-version=my-runtime " in out, err
  code, _, err = tpu_dry_run("--accelerator", "tpu9x-8", "--mode", "train", "--dry-run")
  assert code == 2 and "give --version" in err
  code, _, err = tpu_dry_run("--mode", "train", "--spot", "--reserved", "--dry-run")
  assert code == 2 and "exclude each other" in err


def test_tpu_pod_takes_v5e_only_by_the_apis_name_v5litepod():
  code, out, err = tpu_dry_run("--accelerator", "v5e-16", "--mode", "train", "--dry-run")
  assert code == 2 and out == "", err
  assert "--accelerator v5e-16: Cloud TPU names v5e slices v5litepod-N: give --accelerator " \
         "v5litepod-16" in err


def test_tpu_pod_autocheckpoint_can_be_turned_off_or_asked_for():
  code, out, err = tpu_dry_run("--accelerator", "v4-8", "--mode", "train", "--no-autocheckpoint",
                               "--dry-run")
  assert code == 0, err
  create = next(c for c in parse(out)[0] if kind(c) == "qr-create")
  assert create[:2] == ["gcloud", "compute"] and "--autocheckpoint-enabled" not in create
  code, out, err = tpu_dry_run("--accelerator", "v5p-16", "--mode", "train", "--autocheckpoint",
                               "--dry-run")
  assert code == 0, err
  create = next(c for c in parse(out)[0] if kind(c) == "qr-create")
  assert create[:2] == ["gcloud", "alpha"] and create[-1] == "--autocheckpoint-enabled"


@pytest.mark.parametrize("config", ["configs/cifar10.py", "configs/imagenet64.py"])
def test_tpu_pod_refuses_to_train_a_paper_teacher_by_accident(config):
  for mode in ("pipeline", "train_teacher"):
    code, out, err = tpu_dry_run("--config", config, "--mode", mode, "--dry-run")
    assert code == 2 and "800k steps" in err and out == "", (mode, err)
  for extra in (["--train-teacher"], ["--", "--config.teacher.checkpoint=gs://my-bucket/pd"],
                ["--", "--config.teacher.checkpoint", "gs://my-bucket/pd"]):
    code, out, err = tpu_dry_run("--config", config, "--dry-run", *extra)
    assert code == 0 and "--mode=pipeline" in out, (extra, err)
    asked = "--config.teacher.train_from_scratch=True" in out  # passed on to the Python refusal
    assert asked == (extra == ["--train-teacher"]), (extra, out)
  code, _, err = tpu_dry_run("--config", config, "--mode", "train", "--dry-run")
  assert code == 0, err


def test_tpu_pod_refuses_a_local_bucket():
  code, _, err = run(["bash", "launch/tpu_pod.sh", "--name", "n", "--zone", "z", "--bucket",
                      "/tmp/x", "--dry-run"])
  assert code == 2 and "'/tmp/x' must be a GCS path" in err


# ------------------------------------------------------- TPU pod slices against a stub gcloud
GCLOUD_STUB = r"""
echo "gcloud $*" >> "$STUB_DIR/calls"
next() {  # the next line of a script file; its last line repeats
  local f="$STUB_DIR/$1" n line
  n=$(( $(cat "$f.n" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$f.n"
  line="$(sed -n "${n}p" "$f")"; [[ -n "$line" ]] || line="$(tail -n 1 "$f")"
  echo "$line"
}
case "$*" in
  *"queued-resources describe"*"value(state.state)"*)
    state="$(next states)"
    if [[ "$state" == NOT_FOUND ]]; then
      echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found" >&2
      exit 1
    fi
    echo "$state" ;;
  *"tpu-vm describe"*"value(state)"*)
    if [[ -f "$STUB_DIR/nodes" ]]; then next nodes; else echo READY; fi ;;
  *"tpu-vm ssh"*"--worker status"*)
    # a status line: the workers' replies, "|"-separated; "exit=N": gcloud's exit status (an ssh
    # to some worker failed)
    code=0
    IFS='|' read -r -a parts <<< "$(next statuses)"
    for part in "${parts[@]}"; do
      if [[ "$part" == exit=* ]]; then code="${part#exit=}"; else echo "DSNO_STATUS $part"; fi
    done
    exit "$code" ;;
esac
exit 0
"""
GSUTIL_STUB = r"""
echo "gsutil $*" >> "$STUB_DIR/calls"
[[ "$1" == cat ]] && echo "Traceback: the job's last words"
exit 0
"""


def tpu_with_stubs(tmp_path, states, statuses, *args, nodes=None):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  write_stub(str(stubs), "gcloud", GCLOUD_STUB)
  write_stub(str(stubs), "gsutil", GSUTIL_STUB)
  (tmp_path / "states").write_text("\n".join(states) + "\n")
  (tmp_path / "statuses").write_text("\n".join(statuses) + "\n")
  if nodes:
    (tmp_path / "nodes").write_text("\n".join(nodes) + "\n")
  code, out, err = run(["bash", "launch/tpu_pod.sh", "--name", "dsno", "--zone", "z",
                        "--accelerator", "v4-16", "--bucket", "gs://b", "--mode", "train",
                        "--poll", "0", "--wait", "0", *args],
                       env={"PATH": f"{stubs}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path),
                            "TMPDIR": str(tmp_path)})
  calls = (tmp_path / "calls").read_text().splitlines()

  def short(call):
    words = call.split()
    if words[0] == "gsutil":
      return "gsutil-" + words[1 + (words[1] == "-q")]
    if "queued-resources" in words:
      return "qr-" + words[words.index("queued-resources") + 1]
    if "tpu-vm" in words and "describe" in words:
      return "vm-describe"
    return next(("ssh-" + s for s in ("setup", "start", "status") if f"--worker {s}" in call),
                "ssh")
  return code, out, err, [short(c) for c in calls if short(c) != "qr-describe"]


def test_tpu_pod_polls_and_recreates_a_preempted_slice(tmp_path):
  states = ["NOT_FOUND", "NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE",  # first launch
            "ACTIVE",  # poll 1: running
            "SUSPENDED", "SUSPENDED", "NOT_FOUND", "ACTIVE",  # poll 2: preempted -> recreate
            "ACTIVE"]  # poll 3: done
  statuses = ["worker=0 state=running|worker=1 state=running",
              "worker=0 state=exited status=0|worker=1 state=exited status=0"]
  code, _, err, calls = tpu_with_stubs(tmp_path, states, statuses)
  assert code == 0, err
  assert calls == ["gsutil-cp", "qr-create", "ssh-setup", "ssh-start", "ssh-status",
                   "qr-delete", "qr-create", "ssh-setup", "ssh-start", "ssh-status",
                   "qr-delete"], calls
  assert "running on 2 of 2 workers" in err and "finished on all 2 workers" in err


def test_tpu_pod_relaunches_in_place_after_status_75(tmp_path):
  states = ["NOT_FOUND", "NOT_FOUND", "ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE"]
  statuses = ["worker=0 state=exited status=75|worker=1 state=exited status=75",
              "worker=0 state=exited status=0|worker=1 state=exited status=0"]
  code, _, err, calls = tpu_with_stubs(tmp_path, states, statuses, "--keep")
  assert code == 0, err
  assert calls == ["gsutil-cp", "qr-create", "ssh-setup", "ssh-start", "ssh-status",
                   "ssh-setup", "ssh-start", "ssh-status"], calls


def test_tpu_pod_stops_on_a_real_failure(tmp_path):
  states = ["NOT_FOUND", "NOT_FOUND", "ACTIVE", "ACTIVE"]
  statuses = ["worker=0 state=running|worker=1 state=exited status=1"]
  code, _, err, calls = tpu_with_stubs(tmp_path, states, statuses)
  assert code == 1
  assert calls == ["gsutil-cp", "qr-create", "ssh-setup", "ssh-start", "ssh-status",
                   "gsutil-cat"], calls  # no relaunch, no delete: the slice is kept
  assert "worker 1: the job failed with exit status 1 (not a preemption)" in err
  assert "gs://b/dsno_jax/imagenet64/launch/logs/worker-1.log" in err
  assert "the job's last words" in err


def test_tpu_pod_reattaches_to_a_running_job(tmp_path):
  states = ["ACTIVE"]
  statuses = ["worker=0 state=running|worker=1 state=running",
              "worker=0 state=exited status=0|worker=1 state=exited status=0"]
  code, _, err, calls = tpu_with_stubs(tmp_path, states, statuses, "--keep")
  assert code == 0, err
  assert calls == ["ssh-status", "ssh-status"], calls  # nothing created, nothing started
  assert "already running" in err


def test_tpu_pod_keeps_a_running_slice_when_one_worker_does_not_answer(tmp_path):
  """A failed ssh to one worker, poll after poll, is not a lost slice: the API says READY."""
  states = ["NOT_FOUND", "NOT_FOUND", "ACTIVE"] + ["ACTIVE"] * 9
  statuses = ["worker=0 state=running|exit=255"] * 7 + [  # worker 1's ssh fails 7 times
      "worker=0 state=exited status=0|exit=255",  # done on worker 0, worker 1 still silent
      "worker=0 state=exited status=0|worker=1 state=exited status=0"]
  code, _, err, calls = tpu_with_stubs(tmp_path, states, statuses)
  assert code == 0, err
  assert calls == (["gsutil-cp", "qr-create", "ssh-setup", "ssh-start"] + ["ssh-status"] * 6
                   + ["vm-describe"] + ["ssh-status"] * 3 + ["qr-delete"]), calls
  assert "1 workers answered, the others did not (7 polls in a row); running on: 0" in err
  assert "the TPU VMs of dsno are READY: waiting for the silent workers" in err
  assert "finished on all 2 workers" in err


def test_tpu_pod_recreates_a_slice_only_when_the_api_says_its_vms_are_gone(tmp_path):
  states = ["NOT_FOUND", "NOT_FOUND", "ACTIVE"] + ["ACTIVE"] * 12 + ["NOT_FOUND", "ACTIVE"]
  statuses = ["exit=255"] * 12 + [  # no worker answers: READY at the 6th poll, then TERMINATED
      "worker=0 state=exited status=0|worker=1 state=exited status=0"]
  code, _, err, calls = tpu_with_stubs(tmp_path, states, statuses, nodes=["READY", "TERMINATED"])
  assert code == 0, err
  assert calls == (["gsutil-cp", "qr-create", "ssh-setup", "ssh-start"]
                   + ["ssh-status"] * 6 + ["vm-describe"] + ["ssh-status"] * 6 + ["vm-describe"]
                   + ["qr-delete", "qr-create", "ssh-setup", "ssh-start", "ssh-status",
                      "qr-delete"]), calls
  assert "the TPU VMs of dsno are TERMINATED: recreating the slice" in err


def test_tpu_pod_relaunches_after_a_vm_restart_and_the_others_coordinated_death(tmp_path):
  """Worker 1's VM restarts under the job; worker 0 then dies with another status than 75
  ("the JAX distributed service detected fatal errors"): a relaunch, not a failure."""
  states = ["NOT_FOUND", "NOT_FOUND", "ACTIVE"] + ["ACTIVE"] * 6
  statuses = ["worker=0 state=running|worker=1 state=restarted",
              "worker=0 state=exited status=1|worker=1 state=restarted",
              "worker=0 state=exited status=0|worker=1 state=exited status=0"]
  code, _, err, calls = tpu_with_stubs(tmp_path, states, statuses, "--keep")
  assert code == 0, err
  assert calls == ["gsutil-cp", "qr-create", "ssh-setup", "ssh-start", "ssh-status",
                   "ssh-status", "ssh-setup", "ssh-start", "ssh-status"], calls
  assert "running on 1 of 2 workers; lost on 1: JAX stops the others once it notices" in err
  assert "workers 0:1 (worker:status) stopped after the job was lost on workers 1" in err
  assert "the job failed" not in err


def test_tpu_pod_a_silent_worker_after_a_failure_stops_once_the_api_says_ready(tmp_path):
  states = ["NOT_FOUND", "NOT_FOUND", "ACTIVE"] + ["ACTIVE"] * 6
  statuses = ["worker=0 state=exited status=1|exit=255"]
  code, _, err, calls = tpu_with_stubs(tmp_path, states, statuses)
  assert code == 1
  assert calls == (["gsutil-cp", "qr-create", "ssh-setup", "ssh-start"] + ["ssh-status"] * 6
                   + ["vm-describe", "gsutil-cat"]), calls  # no relaunch, no delete
  assert "worker 0: the job failed with exit status 1" in err


# -------------------------------------------------- the TPU worker side, run here for real
def test_tpu_worker_runs_detached_and_records_a_preemption(tmp_path):
  """`--worker start` returns at once; the job's log and exit status (75 after SIGTERM, which
  the runner survives) end up on the worker and in the (stub) bucket."""
  home, bucket, stubs = tmp_path / "home", tmp_path / "bucket", tmp_path / "bin"
  for d in (home / "dsno_venv" / "bin", bucket, stubs):
    d.mkdir(parents=True)
  os.symlink(ROOT, home / "dsno_jax")
  write_stub(str(stubs), "gsutil", r"""
args=(); for a in "$@"; do [[ "$a" == -q ]] || args+=("$a"); done
dst="$STUB_BUCKET/${args[2]#gs://}"; mkdir -p "$(dirname "$dst")"
if [[ "${args[1]}" == - ]]; then cat > "$dst"; else cp "${args[1]}" "$dst"; fi
""")
  env = {"HOME": str(home), "PATH": f"{stubs}:{os.environ['PATH']}",
         "STUB_BUCKET": str(bucket), "DSNO_WORKER_ID": "3"}
  job = ("import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *a: (print('saved', flush=True), sys.exit(75)))\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n")
  worker = ["bash", "launch/tpu_pod.sh", "--worker"]
  start = time.time()
  code, out, err = run(worker + ["start", "gs://b/r/launch/logs", "1", "--", sys.executable,
                                 "-c", job], env=env)
  assert code == 0 and time.time() - start < 10, err
  log = home / "dsno_run" / "job.log"
  deadline = time.time() + 20
  while "\nready\n" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
    time.sleep(0.05)
  assert run(worker + ["status"], env=env)[1].strip() == "DSNO_STATUS worker=3 state=running"
  assert run(worker + ["start", "gs://b/r/launch/logs", "1", "--", "false"],
             env=env)[1].startswith("tpu_pod.sh: worker 3: the job is already running")

  # a shutdown signals every process of the session: the job saves, the runner records 75
  runner = int((home / "dsno_run" / "pid").read_text())
  try:
    os.killpg(runner, signal.SIGTERM)
    while (run(worker + ["status"], env=env)[1].strip() != "DSNO_STATUS worker=3 state=exited "
           "status=75" and time.time() < deadline):
      time.sleep(0.05)
    assert run(worker + ["status"], env=env)[1].strip() == \
        "DSNO_STATUS worker=3 state=exited status=75"
  finally:
    try:
      os.killpg(runner, signal.SIGKILL)  # whatever is left of the session
    except ProcessLookupError:
      pass
  assert (bucket / "b/r/launch/logs/worker-3.status").read_text().strip() == "75"
  uploaded = (bucket / "b/r/launch/logs/worker-3.log").read_text()
  assert "\nready\nsaved\n" in uploaded and "exited with status 75" in uploaded


def test_tpu_worker_status_tells_a_restarted_vm_from_a_running_or_finished_job(tmp_path):
  """A job whose runner was started before this VM's last boot (another boot id) left no exit
  status: the worker reports it restarted; a live runner of this boot is running."""
  home = tmp_path / "home"
  (home / "dsno_run").mkdir(parents=True)
  env = {"HOME": str(home), "DSNO_WORKER_ID": "1"}
  boot = open("/proc/sys/kernel/random/boot_id").read()
  runner = subprocess.Popen(["bash", "-c", "sleep 60; exit", "--worker"])  # as a runner is
  try:
    (home / "dsno_run" / "pid").write_text(f"{runner.pid}\n")

    def status(boot_id):
      (home / "dsno_run" / "boot_id").write_text(boot_id)
      return run(["bash", "launch/tpu_pod.sh", "--worker", "status"], env=env)[1].strip()
    assert status(boot) == "DSNO_STATUS worker=1 state=running"
    assert status("an-earlier-boot\n") == "DSNO_STATUS worker=1 state=restarted"
    (home / "dsno_run" / "status").write_text("75\n")  # it stopped before the VM restarted
    assert status("an-earlier-boot\n") == "DSNO_STATUS worker=1 state=exited status=75"
  finally:
    runner.kill()
    runner.wait()
  (home / "dsno_run" / "status").unlink()
  assert status(boot) == "DSNO_STATUS worker=1 state=none"  # gone, in this boot, without a word


# ------------------------------------------------------------------------------------ SLURM
def test_slurm_dry_run_for_2_nodes_of_8_gpus():
  # no scontrol in PATH here: the node list is expanded in python
  env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "8",
         "SLURM_JOB_ID": "77", "PATH": os.environ["PATH"]}
  code, out, err = run(["bash", "launch/slurm_gpu.sh", "--dry-run", "--workdir", "/shared/r",
                        "--mode", "train", "--", "--config.train.batch_size=2048"], env=env)
  assert code == 0, err
  lines = out.strip().splitlines()
  assert lines[0].startswith("JAX_COORDINATOR_ADDRESS=gpu07:12355 DSNO_JAX_JOB_ID=slurm:77 "
                             "srun --ntasks-per-node=8 ")
  processes = [dict(w.split("=", 1) for w in line.split() if "=" in w and not w.startswith("--"))
               for line in lines[1:]]
  assert len(processes) == 16
  assert sorted(int(p["JAX_PROCESS_ID"]) for p in processes) == list(range(16))
  pairs = {(p["host"], p["gpu"]) for p in processes}
  assert pairs == {(h, str(g)) for h in ("gpu07", "gpu08") for g in range(8)}
  assert {p["JAX_COORDINATOR_ADDRESS"] for p in processes} == {"gpu07:12355"}
  assert {p["JAX_NUM_PROCESSES"] for p in processes} == {"16"}
  assert {p["DSNO_JAX_JOB_ID"] for p in processes} == {"slurm:77"}  # the workdir lock's job
  assert all(p["JAX_LOCAL_DEVICE_IDS"] == p["SLURM_LOCALID"] == p["gpu"] for p in processes)
  # process 0, which runs the coordinator, is on the coordinator's node
  assert next(p for p in processes if p["JAX_PROCESS_ID"] == "0")["host"] == "gpu07"
  for line in lines:
    assert line.rstrip().endswith("python3 -m dsno_jax.main --config=configs/imagenet64.py "
                                  "--workdir=/shared/r --mode=train --config.train.batch_size=2048")


def test_slurm_needs_a_workdir_and_matching_tasks_and_gpus():
  code, _, err = run(["bash", "launch/slurm_gpu.sh", "--dry-run"], env={"SLURM_JOB_NODELIST": "a"})
  assert code == 2 and "--workdir is required" in err
  code, _, err = run(["bash", "launch/slurm_gpu.sh", "--dry-run", "--workdir", "/w"],
                     env={"SLURM_JOB_NODELIST": "a", "SLURM_NTASKS_PER_NODE": "1",
                          "SLURM_GPUS_PER_NODE": "h100:8"})
  assert code == 2 and "one process per GPU" in err
  code, _, err = run(["bash", "launch/slurm_gpu.sh", "--dry-run", "--workdir", "/w", "--config",
                      "configs/cifar10.py", "--mode", "pipeline"], env={"SLURM_JOB_NODELIST": "a"})
  assert code == 2 and "800k steps" in err


SRUN_STUB = r"""
# a small srun: the command once per task (SLURM_NNODES x SLURM_NTASKS_PER_NODE) with the task
# variables SLURM sets, all of a node's GPUs visible; returns the highest status, as srun does
echo "srun $*" | head -n 1 >> "$STUB_LOG"
while [[ "$1" == --* ]]; do shift; done
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
T=$SLURM_NTASKS_PER_NODE N=$((SLURM_NNODES * SLURM_NTASKS_PER_NODE)) pids=()
for ((i = 0; i < N; i++)); do
  SLURMD_NODENAME=${hosts[i / T]} SLURM_PROCID=$i SLURM_LOCALID=$((i % T)) SLURM_NTASKS=$N \
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((T - 1))) "$@" &
  pids+=($!)
done
max=0
for p in "${pids[@]}"; do rc=0; wait "$p" || rc=$?; ((rc > max)) && max=$rc; done
exit $max
"""
PYTHON_STUB = r"""
# stands in for `python3 -m dsno_jax.main`: records its environment, exits with its STUB_RCS entry
echo "$JAX_PROCESS_ID $SLURMD_NODENAME $JAX_LOCAL_DEVICE_IDS $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $DSNO_JAX_JOB_ID" >> "$STUB_LOG.processes"
IFS=, read -r -a rcs <<< "$STUB_RCS"
exit "${rcs[$JAX_PROCESS_ID]:-0}"
"""


@pytest.fixture
def slurm_stubs(tmp_path):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  write_stub(str(stubs), "srun", SRUN_STUB)
  write_stub(str(stubs), "python3", PYTHON_STUB)
  write_stub(str(stubs), "scontrol", f"""
if [[ "$1" == show ]]; then exec {sys.executable} {LAUNCH}/slurm_hosts.py "$3"; fi
echo "scontrol $*" >> "$STUB_LOG"
""")
  log = tmp_path / "log"

  def batch(rcs, **env):
    log.write_text("")
    code, out, err = run(["bash", "launch/slurm_gpu.sh", "--workdir", "/shared/r"], env={
        "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_RCS": rcs,
        "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_PER_NODE": "2", **env})
    processes = sorted(tuple(line.split()) for line in
                       open(f"{log}.processes").read().splitlines())
    os.remove(f"{log}.processes")
    return code, out + err, log.read_text().splitlines(), processes
  return batch


def test_slurm_batch_requeues_when_every_process_stopped_with_75(slurm_stubs):
  code, err, calls, processes = slurm_stubs("75,75,75,75")
  assert code == 0, err
  assert calls[0].startswith("srun --ntasks-per-node=2 --distribution=block --kill-on-bad-exit=0")
  assert calls[1:] == ["scontrol requeue 1234"]
  # process id, node, local device, coordinator, number of processes, job (it survives requeues)
  assert processes == [("0", "gpu07", "0", "gpu07:12355", "4", "slurm:1234"),
                       ("1", "gpu07", "1", "gpu07:12355", "4", "slurm:1234"),
                       ("2", "gpu08", "0", "gpu07:12355", "4", "slurm:1234"),
                       ("3", "gpu08", "1", "gpu07:12355", "4", "slurm:1234")]


def test_slurm_batch_done_failed_and_requeue_limit(slurm_stubs):
  code, err, calls, _ = slurm_stubs("0,0,0,0")
  assert code == 0 and len(calls) == 1 and "slurm_gpu.sh: done" in err, err  # no requeue
  code, err, calls, _ = slurm_stubs("75,1,75,75")  # one real failure among preempted ones
  assert code == 101 and len(calls) == 1, err
  assert "process 1 on gpu07 failed with exit status 1" in err and "not requeued" in err
  code, err, calls, _ = slurm_stubs("75,75,75,75", SLURM_RESTART_COUNT="100")
  assert code == 75 and len(calls) == 1 and "--max-requeues" in err


def test_slurm_task_survives_term_and_reports_75():
  """srun's task wrapper: SIGTERM to the whole task (as slurmstepd sends it) reaches python,
  which saves and exits 75; the wrapper outlives it and returns 75; other failures map above 75."""
  env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
         "CUDA_VISIBLE_DEVICES": "0,1", "JAX_COORDINATOR_ADDRESS": "gpu07:12355"}
  job = ("import os, signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
         "print('ready', os.environ['JAX_PROCESS_ID'], os.environ['JAX_LOCAL_DEVICE_IDS'],"
         " flush=True)\n"
         "time.sleep(60)\n")
  proc = subprocess.Popen(["bash", "launch/slurm_gpu.sh", "--task", "--", sys.executable, "-c",
                           job], cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                          text=True, start_new_session=True)
  try:
    assert proc.stdout.readline().split() == ["ready", "3", "1"]
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=20) == 75
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert run(["bash", "launch/slurm_gpu.sh", "--task", "--", "bash", "-c", "exit 3"],
             env=env)[0] == 103
  assert run(["bash", "launch/slurm_gpu.sh", "--task", "--", "true"], env=env)[0] == 0


def test_slurm_nodelist_expansion():
  assert slurm_hosts.expand("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                         "login1"]
  assert slurm_hosts.expand("a[9-10]") == ["a9", "a10"]


# ------------------------------------------------------------------------------------ local
def test_local_dry_run_prints_one_command_per_process(capsys):
  assert local.main(["--num_processes", "3", "--devices_per_process", "4", "--dry-run", "--",
                     "python", "-c", "pass"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  for rank, line in enumerate(lines):
    assert f"JAX_PROCESS_ID={rank}" in line and "JAX_NUM_PROCESSES=3" in line
    assert "--xla_force_host_platform_device_count=4" in line
    assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in line
    assert line.endswith("python -c pass")


SUM_SCRIPT = """
import os
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                           int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"]))
mesh = Mesh(np.asarray(jax.devices()), ("data",))
local = np.arange(2, dtype=np.float32) + 10 * jax.process_index()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print("TOTAL", jax.process_count(), jax.device_count(), float(total))
"""


def test_local_launcher_runs_a_cross_process_sum(capfd):
  codes = local.launch([sys.executable, "-c", SUM_SCRIPT], num_processes=2,
                       devices_per_process=1, timeout=120)
  out = capfd.readouterr().out
  assert codes == [0, 0], out
  # process 0 holds [0, 1], process 1 holds [10, 11]
  assert out.count("TOTAL 2 2 22.0") == 2, out
