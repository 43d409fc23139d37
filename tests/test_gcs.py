"""Cloud Storage workdirs, against a real emulator on loopback: the 2-process pipeline writes
every file to the bucket, resumes after a kill -9 on a machine with nothing local, reads a
teacher from the bucket, and locks its workdir."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import gcs_helpers
from gcs_helpers import BUCKET, emulator, objects, teacher  # noqa: F401  (fixtures)
import training_helpers as helpers

from dsno_jax import lock, storage
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir

TIMEOUT_S = 600  # generous: the machine may be shared


def start(workdir, teacher, cwd, cache):
  """launch/local.py: the pipeline in 2 processes; a new session, so a kill reaches all."""
  command = [helpers.python(), os.path.join(helpers.ROOT, "launch", "local.py"),
             "--num_processes=2", "--devices_per_process=1", f"--timeout={TIMEOUT_S}", "--",
             *gcs_helpers.pipeline_command(workdir, teacher)]
  os.makedirs(cwd, exist_ok=True)
  env = gcs_helpers.child_env(1, cache)
  log = open(os.path.join(cwd, "run.log"), "a")
  return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True), os.path.join(cwd, "run.log")


def finish(process, log):
  try:
    assert process.wait(timeout=TIMEOUT_S) == 0, open(log).read()[-5000:]
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)


def test_the_two_process_pipeline_lives_in_the_bucket_and_resumes_from_it_alone(
    emulator, teacher, tmp_path):
  straight, killed = f"gs://{BUCKET}/straight", f"gs://{BUCKET}/killed"
  # One after the other: the second run loads the programs the first compiled (the cache).
  finish(*start(straight, teacher, str(tmp_path / "a"), str(tmp_path / "cache_a")))
  victim, victim_log = start(killed, teacher, str(tmp_path / "b"), str(tmp_path / "cache_b"))
  try:
    deadline = time.time() + TIMEOUT_S
    while (not gcs_helpers.student_steps("killed") and victim.poll() is None
           and time.time() < deadline):
      time.sleep(0.05)
    assert victim.poll() is None, open(victim_log).read()[-5000:]  # still training
    os.killpg(victim.pid, signal.SIGKILL)  # both processes and their launcher, mid-training
    victim.wait(TIMEOUT_S)
  finally:
    if victim.poll() is None:
      os.killpg(victim.pid, signal.SIGKILL)
  assert victim.returncode == -signal.SIGKILL, open(victim_log).read()[-5000:]
  steps = gcs_helpers.student_steps("killed")
  assert steps and steps[-1] < gcs_helpers.OVERRIDES["train.num_steps"], steps
  assert not model_io.is_export(Workdir(killed).student_export)

  # A recreated VM: an empty working directory and cache; only the bucket survives.
  finish(*start(killed, teacher, str(tmp_path / "c"), str(tmp_path / "cache_c")))
  log = open(tmp_path / "c" / "run.log").read()
  assert "resuming at step" in log, log[-5000:]
  assert "pipeline: classifier is done, skipping" in log and "generate is done" in log, log[-5000:]

  listing = objects("straight/")
  print("bucket listing of the uninterrupted run:\n  " + "\n  ".join(listing))
  for name in ("lock.json",):
    assert f"straight/{name}" not in listing  # released
  for name in ("classifier/model.json", "trajectories/dataset_info.json",
               "trajectories/generation.json", "export/model.json", "samples/samples.npz",
               "samples/grid.png", "eval/results.json", "eval/results.md",
               "checkpoints/student/config.json", "checkpoints/student/40/"):
    assert any(n.startswith(f"straight/{name}") for n in listing), name
  assert any(n.startswith("straight/logs/student/events.out.tfevents") for n in listing)
  assert any(".array_record-" in n for n in listing)
  for cwd in "abc":  # nothing of the run was written as a local path named gs:
    assert sorted(os.listdir(tmp_path / cwd)) == ["run.log"], os.listdir(tmp_path / cwd)

  gcs_helpers.assert_same_results(straight, killed)


def test_a_gs_workdir_is_locked_and_a_lock_of_another_host_is_never_taken(emulator):
  path = Workdir(f"gs://{BUCKET}/locked").lock
  with lock.hold(path, "--mode=train"):
    record = json.loads(storage.read_text(path))
    assert record["pid"] == os.getpid() and record["what"] == "--mode=train"
    second = _hold_elsewhere(path)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"in use by another run: --mode=train, pid {os.getpid()} on host" in second.stderr
  assert not storage.exists(path)  # released
  storage.write_text(path, json.dumps({"host": "elsewhere", "pid": 1, "started": "yesterday",
                                       "what": "--mode=train", "token": "t"}))
  with pytest.raises(lock.WorkdirInUseError, match=rf"pid 1 on host elsewhere.*gcloud storage "
                                                   rf"rm {path}"):
    with lock.hold(path, "--mode=train"):
      pass
  assert json.loads(storage.read_text(path))["host"] == "elsewhere"  # left as found
  storage.remove(path)


def _hold_elsewhere(path):
  """Another process tries the lock that this one holds."""
  code = ("import sys\nfrom dsno_jax import lock\n"
          "with lock.hold(sys.argv[1], 'second'):\n  pass\n")
  second = subprocess.run([helpers.python(), "-c", code, path], cwd=helpers.ROOT,
                          env=helpers.subprocess_env(1), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
  return second


def test_storage_round_trips_and_local_copies(emulator, tmp_path, monkeypatch):
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  root = f"gs://{BUCKET}/roundtrip"
  storage.write_text(storage.join(root, "a", "x.txt"), "hello")
  storage.write_bytes(storage.join(root, "b.bin"), b"\0\1")
  assert storage.isdir(root) and storage.isfile(storage.join(root, "b.bin"))
  assert storage.listdir(root) == ["a", "b.bin"]
  local = storage.local_copy(root)
  assert local == str(tmp_path / "cache" / "gs" / BUCKET / "roundtrip")
  assert open(os.path.join(local, "a", "x.txt")).read() == "hello"
  (tmp_path / "up.txt").write_text("up")
  storage.upload(str(tmp_path / "up.txt"), storage.join(root, "up.txt"))
  assert storage.read_text(storage.join(root, "up.txt")) == "up"
  storage.rmtree(root)
  assert not storage.exists(storage.join(root, "b.bin"))
  assert not os.path.exists(os.path.join(os.getcwd(), "gs:"))


def test_dsno_jax_load_samples_an_export_in_the_bucket(teacher):
  import dsno_jax
  model = dsno_jax.load(teacher)
  images = model.sample(4, solver="ddim", nfe=2, batch_size=4)
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
