"""A run killed with SIGKILL resumes from its checkpoint and ends as if never killed."""
import os
import signal
import subprocess
import threading
import time

import jax
import numpy as np
import pytest
import training_helpers as helpers

from dsno_jax.models import io as model_io
from dsno_jax.data import digits

NUM_STEPS, DEVICES = 60, 2
TIMEOUT_S = 600  # generous: the machine may be shared
# The run, as command-line overrides of configs/tiny.py (a one-level UNet compiles faster).
OVERRIDES = {"teacher.train.num_steps": NUM_STEPS, "teacher.train.checkpoint_every": 20,
             "teacher.train.log_every": 20, "teacher.train.keep_checkpoints": 2,
             "model.ch_mult": (1,), "model.attn_resolutions": (8,)}


def command(workdir, data_dir):
  flags = {**OVERRIDES, "data.data_dir": data_dir}
  return [helpers.python(), "-m", "dsno_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", "--mode=train_teacher"] + [
              f"--config.{name}={value}" for name, value in flags.items()]


def start(workdir, data_dir):
  log = open(workdir + ".log", "a")
  return subprocess.Popen(command(workdir, data_dir), cwd=helpers.ROOT,
                          env=helpers.subprocess_env(DEVICES), stdout=log,
                          stderr=subprocess.STDOUT)


def saved_steps(workdir):
  directory = os.path.join(workdir, "checkpoints", "teacher")
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if os.path.isdir(
      directory) else []


def kill_at_first_checkpoint(process, workdir, outcome):
  """SIGKILLs the process once a checkpoint is on disk; outcome gets its exit code."""
  deadline = time.time() + TIMEOUT_S
  while not saved_steps(workdir) and process.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  outcome["code"] = process.wait(timeout=TIMEOUT_S)


def exported_params(workdir):
  params, _, role = model_io.load_model(os.path.join(workdir, "teacher"))
  assert role == "teacher"
  return jax.tree_util.tree_leaves(params)


def wait(process, workdir):
  try:
    assert process.wait(timeout=TIMEOUT_S) == 0, open(workdir + ".log").read()[-3000:]
  finally:
    if process.poll() is None:
      process.kill()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare(path, 8)
  return path


def test_a_killed_run_resumes_and_ends_equal_to_an_uninterrupted_run(tmp_path, data_dir):
  # The reference runs in its own process too: XLA:CPU splits work by the process's device
  # count, so only a process like the killed one reproduces it bit for bit.
  straight, killed, outcome = str(tmp_path / "straight"), str(tmp_path / "killed"), {}
  reference, process = start(straight, data_dir), start(killed, data_dir)
  killer = threading.Thread(target=kill_at_first_checkpoint, args=(process, killed, outcome))
  killer.start()
  try:
    wait(reference, straight)
  finally:
    killer.join(TIMEOUT_S)
    if process.poll() is None:
      process.kill()
  assert outcome.get("code") == -signal.SIGKILL, open(killed + ".log").read()[-3000:]
  steps = saved_steps(killed)
  assert steps and steps[-1] < NUM_STEPS, steps
  assert not os.path.exists(os.path.join(killed, "teacher"))  # it did not finish

  wait(start(killed, data_dir), killed)
  assert f"resuming at step {steps[-1]}" in open(killed + ".log").read()
  assert saved_steps(killed)[-1] == NUM_STEPS
  want, got = exported_params(straight), exported_params(killed)
  assert len(got) == len(want) > 20
  for a, b in zip(want, got):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
