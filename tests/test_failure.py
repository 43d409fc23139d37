"""Failures and preemption in real processes: one failed process stops every process with its
error in every log; SIGTERM stops a stage with exit status 75 at a safe point (one process or two)
and a relaunch completes with the results of an uninterrupted run; TensorBoard events reach the
bucket as a run goes."""
import io
import os
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest
import training_helpers as helpers
from test_generate import _config, _read_all

from configs import tiny
from dsno_jax import models, modes, pictures, storage
from dsno_jax.data import trajectories
from dsno_jax.evaluation import sampling
from dsno_jax.models import io as model_io
from dsno_jax.teachers import generate
from dsno_jax.training import reporting
from dsno_jax.workdir import Workdir

helpers.use_compilation_cache()
TIMEOUT_S = 300  # generous: the machine may be shared
STOPPED_WITHIN_S = 30  # after one process fails, every process has exited within this
# 64 trajectories in 8 shards of 8 from the exact digits teacher, float32 targets (compared
# exactly), in rounds of 8 examples: enough rounds that a stop lands mid-way.
GENERATE = {"teacher.kind": "digits_mixture", "trajectory.num_examples": 64,
            "trajectory.shard_size": 8, "trajectory.batch_size": 8,
            "trajectory.num_steps": 4, "trajectory.targets_dtype": "float32"}
SAMPLE = {"eval.num_samples": 64, "eval.batch_size": 8}

# Runs dsno_jax.main with faults injected in this process, named in DSNO_TEST_FAULTS:
# "write_503": writing a trajectory shard fails as a Cloud Storage 503 would;
# "sigterm_after_shard" / "sigterm_after_batch": SIGTERM to this process once its first shard
# is written / its first batch of samples drawn;
# "slow": each shard write takes 1 s more and each batch of samples 0.3 s more, as on a real
# data set, so that a stop agreed between processes lands mid-way: JAX's preemption sync takes
# some 0.5 s, more on a busy machine, and a generation process writes only 4 shards.
DRIVER = r"""
import os, signal, sys, time
from absl import app
from dsno_jax import main
from dsno_jax.data import trajectories
from dsno_jax.evaluation import sampling

faults = os.environ.get("DSNO_TEST_FAULTS", "").split(",")
write_shard, update = trajectories.write_shard, sampling.Progress.update

def failing_write(*args, **kwargs):
  with open(os.environ["DSNO_TEST_MARKER"], "w") as f:
    f.write(repr(time.time()))
  raise OSError("PUT https://storage.googleapis.com/...: HTTP status 503 Service Unavailable")

def write(*args, **kwargs):
  path = write_shard(*args, **kwargs)
  if "sigterm_after_shard" in faults:
    faults.remove("sigterm_after_shard")
    os.kill(os.getpid(), signal.SIGTERM)
  if "slow" in faults:
    time.sleep(1.0)
  return path

def update_batch(self, n):
  update(self, n)
  if "sigterm_after_batch" in faults:
    faults.remove("sigterm_after_batch")
    os.kill(os.getpid(), signal.SIGTERM)
  if "slow" in faults:
    time.sleep(0.3)

trajectories.write_shard = failing_write if "write_503" in faults else write
sampling.Progress.update = update_batch
sys.argv = ["dsno_jax.main"] + sys.argv[1:]
app.run(main.main)
"""


def launch(workdir, mode, overrides, num_processes=1, faults=(), tmp_path=None):
  """dsno_jax.main processes (1 CPU device each; gloo on loopback when several), process i with
  the faults faults[i] (see DRIVER); returns [(process, log path)]."""
  port = helpers.free_port()
  args = ["--config=configs/tiny.py", f"--workdir={workdir}", f"--mode={mode}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  started = []
  for i in range(num_processes):
    env = helpers.subprocess_env(1)
    if num_processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
    env["DSNO_TEST_FAULTS"] = faults[i] if i < len(faults) else ""
    env["DSNO_TEST_MARKER"] = str(tmp_path / f"failed_{i}") if tmp_path else ""
    log = f"{workdir}.process_{i}.log"
    started.append((subprocess.Popen([helpers.python(), "-c", DRIVER] + args, cwd=helpers.ROOT,
                                     env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT),
                    log))
  return started


def wait_all(started, timeout_s=TIMEOUT_S):
  """[(exit status, when it exited (time.time()), log text)] of every process."""
  start, results = time.time(), {}
  try:
    while len(results) < len(started) and time.time() - start < timeout_s:
      for i, (process, _) in enumerate(started):
        if i not in results and process.poll() is not None:
          results[i] = time.time()
      time.sleep(0.05)
  finally:
    for process, _ in started:
      if process.poll() is None:
        process.kill()
        process.wait()
  return [(p.returncode, results.get(i), open(log).read()) for i, (p, log) in enumerate(started)]


# --- one process fails: every process stops, with its error ---------------------------------
def test_one_failed_process_stops_every_process_with_its_error_in_every_log(tmp_path):
  workdir = tmp_path / "run"
  results = wait_all(launch(workdir, "generate", GENERATE, num_processes=2,
                            faults=("", "write_503"), tmp_path=tmp_path))
  logs = [log for _, _, log in results]
  failed_at = float(open(tmp_path / "failed_1").read())
  for status, exited, log in results:
    assert status == 1 and exited is not None, (status, log[-3000:])
  stopped = max(exited for _, exited, _ in results) - failed_at
  print(f"from the failure to every process's exit: {stopped:.1f} s")
  assert stopped < STOPPED_WITHIN_S, stopped
  error = "process 1 of 2 failed: OSError: PUT https://storage.googleapis.com/...: HTTP status 503"
  assert error in logs[0] and error in logs[1], logs[0][-3000:]
  assert "Traceback" in logs[1] and "failing_write" in logs[1]  # the whole trace where it failed
  assert "stopping this process (0) too" in logs[0]
  assert not trajectories.is_complete(Workdir(str(workdir)).trajectories(_config(GENERATE)))


# --- SIGTERM: exit status 75 at a safe point, and a relaunch completes alike -----------------
@pytest.fixture(scope="module")
def straight_trajectories(tmp_path_factory):
  """The dataset of an uninterrupted generation on 1 and on 2 devices, in this process."""
  config = _config(GENERATE)
  return {n: _read_all(generate.generate(config, str(tmp_path_factory.mktemp(f"gen{n}")),
                                         devices=jax.devices()[:n])) for n in (1, 2)}


@pytest.mark.parametrize("num_processes", [1, 2])
def test_sigterm_stops_generation_with_75_keeping_whole_shards(tmp_path, num_processes,
                                                               straight_trajectories):
  workdir = tmp_path / "run"
  # one process gets SIGTERM (as in a maintenance event on one host); all stop at one round
  results = wait_all(launch(workdir, "generate", GENERATE, num_processes,
                            faults=("slow,sigterm_after_shard", "slow")))
  for status, _, log in results:
    assert status == modes.PREEMPTED_EXIT_STATUS, log[-3000:]
    assert "generation stopped on SIGTERM" in log and "resume later" in log, log[-3000:]
  directory = Workdir(str(workdir)).trajectories(_config(GENERATE))
  written = trajectories.existing_shards(directory, trajectories.read_plan(directory))
  assert 0 in written and len(written) < 8, sorted(written)
  assert not trajectories.is_complete(directory)
  assert not [n for n in os.listdir(directory) if n.startswith(".")]  # nothing half-written

  results = wait_all(launch(workdir, "generate", GENERATE, num_processes))
  for status, _, log in results:
    assert status == 0, log[-3000:]
  resumed, straight = _read_all(directory), straight_trajectories[num_processes]
  np.testing.assert_array_equal(resumed["index"], np.arange(64))
  for key in straight:
    np.testing.assert_array_equal(resumed[key], straight[key])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A workdir holding a (freshly initialised) student export, and the export's parameters."""
  config = tiny.get_config()
  workdir = tmp_path_factory.mktemp("exported")
  params = jax.device_get(models.init_student(config, jax.random.PRNGKey(3)))
  model_io.save_model(Workdir(str(workdir)).student_export, params, config, role="student")
  return workdir, params


@pytest.mark.parametrize("num_processes", [1, 2])
def test_sigterm_stops_sampling_with_75_writing_nothing(tmp_path, num_processes, exported):
  source, params = exported
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  results = wait_all(launch(workdir, "sample", SAMPLE, num_processes,
                            faults=("slow,sigterm_after_batch", "slow")))
  for status, _, log in results:
    assert status == modes.PREEMPTED_EXIT_STATUS, log[-3000:]
    assert "drawing examples stopped on SIGTERM" in log, log[-3000:]
  run = Workdir(str(workdir))
  assert not os.path.exists(run.samples_npz)

  results = wait_all(launch(workdir, "sample", SAMPLE, num_processes))
  for status, _, log in results:
    assert status == 0, log[-3000:]
  drawn = np.load(io.BytesIO(open(run.samples_npz, "rb").read()))["arr_0"]
  config = _config(SAMPLE)
  _, _, outputs = sampling.draw_samples(config, params, 64, 8, helpers.mesh_of(num_processes))
  np.testing.assert_array_equal(drawn, pictures.to_uint8(outputs[:, -1]))


# --- TensorBoard events reach the bucket as the run goes -------------------------------------
def test_tensorboard_events_are_uploaded_every_interval_and_at_close(tmp_path, monkeypatch,
                                                                      caplog):
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  uploads, failures = [], []  # (time, files then under the local event directory)

  def upload_tree(local, remote):
    assert remote == "gs://bucket/run/logs/student"
    if len(uploads) == 1 and not failures:  # the second upload fails once: retried later
      failures.append(time.monotonic())
      raise OSError("HTTP status 503 Service Unavailable")
    uploads.append((time.monotonic(), sorted(os.listdir(local))))

  monkeypatch.setattr(reporting.storage, "upload_tree", upload_tree)
  writer = reporting.make_writer("gs://bucket/run", "student", upload_every_s=0.5)
  start = time.monotonic()
  writer.write_scalars(1, {"loss": 1.0})
  assert not uploads  # not yet due
  for step in range(2, 60):
    time.sleep(0.05)
    writer.write_scalars(step, {"loss": 1.0 / step})
  assert len(uploads) >= 1 and uploads[0][0] - start >= 0.5, uploads
  assert uploads[0][1] and all(name.startswith("events.out") for name in uploads[0][1])
  assert failures and len(uploads) >= 2, uploads  # uploads went on after the failed one
  assert "uploading the TensorBoard events to gs://bucket/run/logs/student failed" in caplog.text
  uploaded = len(uploads)
  writer.close()
  assert len(uploads) == uploaded + 1  # and once more at the end
