"""SPEC section 9: a teacher run killed (SIGKILL) or preempted (SIGTERM) resumes and ends as if uninterrupted."""
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import training_helpers as helpers

from dsno_jax import model_io

NUM_STEPS, CHECKPOINT_EVERY = 60, 20
TIMEOUT_S = 600  # generous: the machine may be shared


def command(workdir, data_dir):
  return [helpers.python(), "-m", "dsno_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", "--mode=train_teacher",
          f"--config.data.data_dir={data_dir}",
          f"--config.teacher.train.num_steps={NUM_STEPS}",
          f"--config.teacher.train.checkpoint_every={CHECKPOINT_EVERY}",
          f"--config.teacher.train.log_every={CHECKPOINT_EVERY}",
          "--config.teacher.train.keep_checkpoints=2",
          # a one-level UNet: the loop is under test, not the network, and it compiles faster
          "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()"]


def log_path(workdir):
  return workdir + ".log"


def start(workdir, data_dir):
  log = open(log_path(workdir), "a")
  return subprocess.Popen(command(workdir, data_dir), cwd=helpers.ROOT, env=helpers.subprocess_env(2),
                          stdout=log, stderr=subprocess.STDOUT)


def saved_steps(workdir):
  directory = os.path.join(workdir, "checkpoints", "teacher")
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if os.path.isdir(
      directory) else []


def interrupt_at_first_checkpoints(runs):
  """runs: {workdir: (process, signal)}; sends each signal once its run has a checkpoint."""
  deadline, waiting = time.time() + TIMEOUT_S, dict(runs)
  while waiting:
    for workdir, (process, sig) in list(waiting.items()):
      if saved_steps(workdir):
        process.send_signal(sig)
        del waiting[workdir]
      elif process.poll() is not None or time.time() > deadline:
        for p, _ in runs.values():
          p.kill()
        pytest.fail(f"no checkpoint appeared in {workdir} (exit code {process.returncode})")
    time.sleep(0.01)
  return {workdir: process.wait(timeout=TIMEOUT_S) for workdir, (process, _) in runs.items()}


def finish(process, workdir):
  try:
    code = process.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  log = open(log_path(workdir)).read()
  assert code == 0, log[-3000:]
  return log


def exported_params(workdir):
  params, _, role = model_io.load_model(os.path.join(workdir, "teacher"))
  assert role == "teacher"
  return jax.tree_util.tree_leaves(params)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from dsno_jax.data import digits
  path = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare(path, 8)
  return path


def test_killed_and_preempted_runs_resume_and_end_equal_to_an_uninterrupted_run(tmp_path,
                                                                                   data_dir):
  straight, killed, preempted = (str(tmp_path / name) for name in ("straight", "killed",
                                                                    "preempted"))
  finish(start(straight, data_dir), straight)  # alone, so the others find it compiled
  codes = interrupt_at_first_checkpoints({killed: (start(killed, data_dir), signal.SIGKILL),
                                          preempted: (start(preempted, data_dir), signal.SIGTERM)})
  # SIGKILL ends the process at once; SIGTERM lets it save where it is and exit cleanly
  assert codes == {killed: -signal.SIGKILL, preempted: 0}, codes
  for workdir in (killed, preempted):
    steps = saved_steps(workdir)
    assert steps and steps[-1] < NUM_STEPS, (workdir, steps)
    assert not os.path.exists(os.path.join(workdir, "teacher"))
  last_saved = {w: saved_steps(w)[-1] for w in (killed, preempted)}
  restarts = {w: start(w, data_dir) for w in (killed, preempted)}
  for workdir, process in restarts.items():
    log = finish(process, workdir)
    assert f"resuming at step {last_saved[workdir]}" in log, log[-3000:]
    assert saved_steps(workdir)[-1] == NUM_STEPS
  want = exported_params(straight)
  for workdir in (killed, preempted):
    got = exported_params(workdir)
    assert len(got) == len(want)
    for a, b in zip(want, got):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
