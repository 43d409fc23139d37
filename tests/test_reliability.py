"""Faults and misuse: one run per workdir, only good checkpoints, resumes that keep their
meaning, damaged files named and survived (moved aside on process 0's verdict, never on a
transient error), meaningless input refused, bounded .pth reads."""
import errno
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tracemalloc
import zipfile

import jax
import numpy as np
import pytest
import training_helpers as helpers
from etils import epath

from configs import tiny
from dsno_jax import lock, models, modes
from dsno_jax.data import trajectories
from dsno_jax.models import io as model_io
from dsno_jax.teachers import generate
from dsno_jax.training import checkpoints, loop, objectives, step
from dsno_jax.weights import torch_pickle
from dsno_jax.workdir import Workdir

helpers.use_compilation_cache()
TIMEOUT_S = 120  # generous: the machine may be shared


@pytest.fixture(scope="module")
def pool():
  return helpers.trajectory_pool(helpers.student_config())


def run_student(workdir, pool, num_steps, **train):
  return helpers.run_student(workdir, pool, num_steps=num_steps, mesh=helpers.mesh_of(1),
                             **train)


def saved_steps(workdir, role="student"):
  directory = Workdir(str(workdir)).checkpoints(role)
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


# --- one run per workdir ------------------------------------------------------------------------
def test_a_second_run_on_a_workdir_stops_at_once_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with lock.hold(Workdir(workdir).lock, "--mode=train_teacher"):
    second = subprocess.run(
        [helpers.python(), "-m", "dsno_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--mode=train_teacher",
         "--config.teacher.train.learning_rate=0.001"],
        cwd=helpers.ROOT, env=helpers.subprocess_env(1), capture_output=True, text=True,
        timeout=TIMEOUT_S)
    assert second.returncode == 1, second.stderr[-3000:]
    message = second.stderr.strip().splitlines()[-1]
    assert "is in use by another run: --mode=train_teacher" in message, message
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message, message
    assert "lock.json" in message and "--workdir" in message, message
    assert sorted(os.listdir(workdir)) == ["lock.json"]  # it wrote nothing
  assert not os.path.exists(Workdir(workdir).lock)  # released


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
  path = Workdir(str(tmp_path)).lock
  holder = subprocess.Popen(
      [helpers.python(), "-c", "import sys, time\nfrom dsno_jax import lock\n"
       "with lock.hold(sys.argv[1], 'victim'):\n  print('held', flush=True)\n  time.sleep(600)",
       path], cwd=helpers.ROOT, env=helpers.subprocess_env(1), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.WorkdirInUseError, match=f"pid {holder.pid} on host"):
      with lock.hold(path, "too early"):
        pass
  finally:
    holder.kill()
    holder.wait(TIMEOUT_S)
  with caplog.at_level(logging.WARNING):
    with lock.hold(path, "--mode=train"):
      record = json.load(open(path))
      assert record["pid"] == os.getpid() and record["what"] == "--mode=train"
      with lock.hold(path, "--mode=export"):  # a pipeline's modes re-enter its lock
        assert modes.run("classifier", tiny_unconditional(), str(tmp_path)) is None
  assert f"left by a run that is gone (victim, pid {holder.pid}" in caplog.text
  assert not os.path.exists(path)


def tiny_unconditional():
  config = tiny.get_config()
  config.data.name = "cifar10"  # no classifier to train
  return config


def test_a_lock_of_another_host_or_unreadable_is_never_taken(tmp_path):
  path = Workdir(str(tmp_path)).lock
  with open(path, "w") as f:
    json.dump({"host": "elsewhere", "pid": 1, "started": "yesterday", "what": "--mode=train",
               "token": "t"}, f)
  with pytest.raises(lock.WorkdirInUseError, match=r"pid 1 on host elsewhere.*delete"):
    with lock.hold(path, "--mode=train"):
      pass
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(lock.WorkdirInUseError, match="cannot be read"):
    with lock.hold(path, "--mode=train"):
      pass
  assert open(path).read() == "{not json"  # left as found


# --- checkpoints that are good -------------------------------------------------------------------
def test_an_exploding_learning_rate_stops_naming_a_checkpoint_that_resumes(tmp_path, pool):
  with pytest.raises(FloatingPointError,
                     match=r"step (\d+).*last good checkpoint \(step (\d+).*learning_rate") as e:
    run_student(tmp_path, pool, 8, learning_rate=1e6, checkpoint_every=1)
  steps = saved_steps(tmp_path)
  assert steps and steps[-1] < 3 and f"last good checkpoint (step {steps[-1]}," in str(e.value)
  resumed = run_student(tmp_path, pool, 3, checkpoint_every=3)  # the default learning rate
  assert [h["step"] for h in resumed.history] == list(range(steps[-1] + 1, 4))
  assert np.isfinite([h["loss"] for h in resumed.history]).all()
  assert saved_steps(tmp_path)[-1] == 3
  record = json.load(open(tmp_path / "checkpoints" / "student" / "config.json"))
  assert record["resumes"][-1]["step"] == steps[-1]
  assert record["resumes"][-1]["changed"]["train.learning_rate"] == [1e6, 2e-3]


# --- resumes that keep their meaning --------------------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, pool):
  workdir = tmp_path_factory.mktemp("two_checkpoints")
  run_student(workdir, pool, 2, checkpoint_every=1)
  assert saved_steps(workdir) == [1, 2]
  return workdir


def test_a_resume_that_changes_the_meaning_stops_listing_the_fields(tmp_path):
  directory = str(tmp_path)
  config = tiny.get_config()
  checkpoints.record_start(directory, config, None)
  changed = tiny.get_config()
  changed.teacher.mean_type, changed.train.loss, changed.data.image_size = "eps", "l1", 16
  changed.teacher.train.num_steps = changed.train.num_steps = 100  # may change
  changed.eval.num_samples, changed.train.learning_rate = 7, 1e-5  # may change
  with pytest.raises(ValueError) as e:
    checkpoints.check_meaning(directory, changed, "student")
  lines = [line.strip() for line in str(e.value).splitlines() if ": checkpoint " in line]
  assert lines == ["data.image_size: checkpoint 8 vs now 16",
                   "teacher.mean_type: checkpoint 'x' vs now 'eps'",
                   "train.loss: checkpoint 'l2' vs now 'l1'"], str(e.value)
  # the teacher's state does not depend on the student's training settings
  with pytest.raises(ValueError, match="teacher.mean_type") as e:
    checkpoints.check_meaning(directory, changed, "teacher")
  assert "train.loss" not in str(e.value)
  resumable = tiny.get_config()
  resumable.teacher.train.num_steps, resumable.train.learning_rate = 100, 1e-5
  checkpoints.check_meaning(directory, resumable, "teacher")
  record = json.load(open(tmp_path / "config.json"))
  del record["config"]["teacher"]["clip_x"]  # a field the code that wrote it did not have
  with open(tmp_path / "config.json", "w") as f:
    json.dump(record, f)
  checkpoints.check_meaning(directory, resumable, "student")
  checkpoints.record_start(directory, resumable, 4)
  record = json.load(open(tmp_path / "config.json"))
  assert record["config"]["teacher"]["train"]["num_steps"] == 100  # describes the run now
  assert record["resumes"] == [{"time": record["resumes"][0]["time"], "step": 4, "changed": {
      "teacher.clip_x": ["<absent>", True], "teacher.train.num_steps": [4, 100],
      "train.learning_rate": [2e-4, 1e-5]}}]


def test_a_resume_of_another_meaning_changes_nothing(tmp_path, two_checkpoints):
  shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
  before = open(tmp_path / "checkpoints" / "student" / "config.json").read()
  config = helpers.student_config(num_steps=6)
  config.teacher.mean_type = "eps"
  objective = objectives.student_objective(config, [0.0, 1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match=r"(?s)different config.*teacher.mean_type: checkpoint "
                                       r"'x' vs now 'eps'.*RESUMABLE_FIELDS"):
    loop.train(config, str(tmp_path), objective, None, mesh=helpers.mesh_of(1))
  assert saved_steps(tmp_path) == [1, 2]
  assert open(tmp_path / "checkpoints" / "student" / "config.json").read() == before


# --- damaged state is named and survived -------------------------------------------------------
def _truncate_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*"))
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(1000)


def _garbage_metadata(step_dir):
  with open(os.path.join(step_dir, "default", "_METADATA"), "wb") as f:
    f.write(np.random.default_rng(0).bytes(3000))


def _empty_manifest(step_dir):
  open(os.path.join(step_dir, "default", "manifest.ocdbt"), "w").close()


def restored_step(workdir) -> int:
  """The step that a resumed student run of `workdir` starts from (restored, not trained)."""
  config = helpers.student_config(num_steps=6)
  objective = objectives.student_objective(config, [0.0, 1.0, 2.0, 3.0])
  run = step.jit_run(config, objective, helpers.mesh_of(1))
  manager = checkpoints.make_manager(str(workdir), "student", config.train)
  try:
    state = checkpoints.restore_latest(manager, run.abstract_state, run.state_shardings, config,
                                       "student")
  finally:
    checkpoints.close(manager)
  return int(state.step)


@pytest.mark.parametrize("damage", [_truncate_array_file, _garbage_metadata, _empty_manifest])
def test_a_damaged_checkpoint_is_moved_aside_and_the_step_before_restored(
    tmp_path, two_checkpoints, damage, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  directory = workdir / "checkpoints" / "student"
  damage(str(directory / "2"))
  with caplog.at_level(logging.WARNING):
    assert restored_step(workdir) == 1
  aside = glob.glob(str(directory / "2.damaged-*"))
  assert len(aside) == 1 and os.path.isfile(os.path.join(aside[0], "default", "_METADATA"))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert f"checkpoint {directory}/2 cannot be restored (" in warnings[0]
  assert f"moved it aside to {aside[0]}" in warnings[0]
  assert "Event loop is closed" not in caplog.text
  assert json.load(open(directory / "config.json"))["resumes"][-1]["step"] == 1


def test_a_transient_read_error_leaves_the_checkpoint_in_place(tmp_path, two_checkpoints,
                                                                monkeypatch):
  shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
  reads = []

  def unavailable(self, step, *args, **kwargs):
    reads.append(step)
    raise ValueError("UNAVAILABLE: HTTP response code: 503 with body: Service Unavailable")

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "restore", unavailable)
  with pytest.raises(RuntimeError, match=r"checkpoints/student/2 failed \(ValueError: "
                                         r"UNAVAILABLE.*not the files; it is left as it is"):
    restored_step(tmp_path)
  assert reads == [2] * checkpoints._READ_ATTEMPTS  # tried again, then stopped
  directory = tmp_path / "checkpoints" / "student"
  assert sorted(os.listdir(directory)) == ["1", "2", "config.json"]  # nothing renamed
  monkeypatch.undo()
  assert restored_step(tmp_path) == 2


def test_process_zeros_verdict_decides_the_move_aside(tmp_path, two_checkpoints, monkeypatch):
  """As process 1 of 2: whether its own read succeeds or fails, process 0's verdict decides."""
  directory = tmp_path / "checkpoints" / "student"
  shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
  process_0 = []  # process 0's verdicts on the coming reads; then it reads every one

  def all_processes(local):
    return np.asarray([process_0.pop(0) if process_0 else checkpoints._READ, local])

  monkeypatch.setattr(checkpoints.parallel, "all_processes", all_processes)
  monkeypatch.setattr(checkpoints.parallel, "barrier", lambda name: None)
  monkeypatch.setattr(checkpoints.jax, "process_index", lambda: 1)
  process_0[:] = [checkpoints._DAMAGED]  # process 0 finds step 2 damaged, this one reads it
  assert restored_step(tmp_path) == 1  # the step before it, on every process
  assert sorted(os.listdir(directory)) == ["1", "2", "config.json"]  # process 0 renames
  monkeypatch.setattr(checkpoints.jax, "process_index", lambda: 0)
  process_0[:] = [checkpoints._DAMAGED]
  assert restored_step(tmp_path) == 1
  assert len(glob.glob(str(directory / "2.damaged-*"))) == 1

  shutil.rmtree(tmp_path / "checkpoints")
  shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
  monkeypatch.setattr(checkpoints.jax, "process_index", lambda: 1)
  with open(directory / "2" / "default" / "_METADATA", "wb") as f:  # damaged for this one
    f.write(b"garbage")
  with pytest.raises(RuntimeError, match=r"checkpoints/student/2 failed on process 1 .*though "
                                         r"process 0 read it; it is left as it is"):
    restored_step(tmp_path)  # process 0 read it: this process's own failure is an error
  assert sorted(os.listdir(directory)) == ["1", "2", "config.json"]


def test_a_full_disk_fails_that_save_at_once_and_keeps_the_one_before(
    tmp_path, pool, monkeypatch):
  original = type(epath.Path("/")).write_text

  def write_text(self, *args, **kwargs):
    if "/2.orbax-checkpoint-tmp" in str(self):
      raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(type(epath.Path("/")), "write_text", write_text)
  with pytest.raises(RuntimeError, match=r"saving the checkpoint of step 2 in .* failed: "
                                         r"OSError: \[Errno 28\] No space left on device.*"
                                         r"step 1 is intact"):
    run_student(tmp_path, pool, 2, checkpoint_every=1)
  directory = tmp_path / "checkpoints" / "student"
  assert sorted(os.listdir(directory)) == ["1", "config.json"]  # no half-written step
  monkeypatch.undo()
  assert restored_step(tmp_path) == 1


def test_a_truncated_trajectory_shard_is_named_with_the_command_that_rewrites_it(tmp_path, pool):
  config = helpers.student_config()
  config.trajectory.num_examples, config.trajectory.shard_size = 16, 8
  directory = helpers.write_pool_dataset(config, str(tmp_path / "trajectories"), pool)
  shard = trajectories.shard_path(directory, 1, 2)
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(ValueError) as e:
    next(iter(trajectories.batch_iterator(directory, global_batch_size=16, seed=0)))
  assert shard in str(e.value) and "--mode=generate" in str(e.value), str(e.value)


# --- no silent success on meaningless input ------------------------------------------------------
@pytest.mark.parametrize("field, value", [("num_steps", -5), ("num_steps", 0),
                                          ("batch_size", 0), ("checkpoint_every", 0)])
def test_non_positive_counts_are_refused_naming_the_field(tmp_path, field, value):
  config = helpers.one_level_config()
  config.teacher.train[field] = value
  with pytest.raises(ValueError, match=rf"^teacher\.train\.{field}={value}; expected a "
                                       "positive integer"):
    loop.train(config, str(tmp_path), objectives.teacher_objective(config), None)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_a_model_that_cannot_be_built_names_its_field():
  config = tiny.get_config()
  config.model.ch = 16
  with pytest.raises(ValueError, match=r"^model\.ch=16: .*32 groups.*multiple of 32"):
    models.teacher_from_config(config)
  config = tiny.get_config()
  config.model.num_heads = 3
  with pytest.raises(ValueError, match=r"^model\.num_heads=3"):
    models.student_from_config(config)
  config = tiny.get_config()
  config.model.ch_mult = (1, 2, 2, 2, 2)
  with pytest.raises(ValueError, match=r"^data\.image_size=8 cannot be halved 4 times"):
    models.teacher_from_config(config)


def test_a_teacher_with_nan_weights_stops_generation_before_anything_is_marked_done(tmp_path):
  config = helpers.one_level_config()
  trajectory = config.trajectory
  trajectory.num_examples, trajectory.shard_size, trajectory.batch_size = 8, 8, 8
  trajectory.num_steps = 1
  params = jax.tree_util.tree_map(lambda x: np.full(x.shape, np.nan, np.float32),
                                  models.param_shapes(models.init_teacher, config))
  config.teacher.checkpoint = model_io.save_model(str(tmp_path / "nan_teacher"), params, config,
                                                  "teacher")
  with pytest.raises(FloatingPointError,
                     match=r"the teacher unet:dsno_jax_export:.* gives non-finite trajectory "
                           r"targets.*stays incomplete.*weights are finite"):
    generate.generate(config, str(tmp_path), devices=jax.devices()[:1])
  directory = Workdir(str(tmp_path)).trajectories(config)
  assert not trajectories.is_complete(directory)
  assert not glob.glob(os.path.join(directory, "*array_record*"))


# --- bounded reads of untrusted weight files ----------------------------------------------------
BOMB_BYTES = 256 << 20  # what the bomb's record inflates to


def _pickled_state_dict_of_one_float() -> bytes:
  """torch.save's data.pkl of {"w": a 1-element float tensor on storage "0"}, by hand."""
  text = lambda s: b"X" + len(s).to_bytes(4, "little") + s.encode()
  storage = (b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu")
             + b"K\x01tQ")  # a persistent id: ('storage', FloatStorage, '0', 'cpu', 1)
  tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00K\x01\x85K\x01\x85\x89"
            + b"ccollections\nOrderedDict\n)RtR")
  return b"\x80\x02ccollections\nOrderedDict\n)R" + text("w") + tensor + b"s."


def _pth(path, record_bytes: int):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    archive.writestr("bomb/data.pkl", _pickled_state_dict_of_one_float())
    with archive.open("bomb/data/0", "w", force_zip64=True) as record:
      if record_bytes == 4:
        record.write(np.float32(1.5).tobytes())
      zeros = bytes(1 << 20)
      for _ in range(record_bytes // len(zeros)):
        record.write(zeros)
  return str(path)


def test_a_zip_bomb_is_refused_without_inflating_it(tmp_path):
  assert torch_pickle.load_state_dict(_pth(tmp_path / "honest.pth", 4))["w"].tolist() == [1.5]
  bomb = _pth(tmp_path / "bomb.pth", BOMB_BYTES)
  assert os.path.getsize(bomb) < BOMB_BYTES // 500
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=r"bomb/data/0 inflates to 268435456 bytes, but storage "
                                         r"'0' \(1 elements\) needs at most 4"):
      torch_pickle.load_state_dict(bomb)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 16 << 20, peak


def test_sigterm_during_the_pipeline_saves_exits_75_and_exports_nothing(tmp_path):
  """Preemption: the checkpoint is saved, the status says "resume later", no stage runs on."""
  import signal
  import time
  workdir = str(tmp_path / "run")
  process = subprocess.Popen(
      [sys.executable, "-m", "dsno_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
       "--mode=pipeline", "--config.teacher.train.num_steps=100000",
       "--config.teacher.train.checkpoint_every=2", "--config.teacher.train.sample_every=0"],
      cwd=helpers.ROOT, env=helpers.subprocess_env(1), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not glob.glob(os.path.join(workdir, "checkpoints", "teacher", "[0-9]*")):
      assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
      time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == modes.PREEMPTED_EXIT_STATUS, err[-3000:]
  assert "resume later" in err
  assert saved_steps(workdir, "teacher")  # the checkpoint is there
  assert not os.path.exists(Workdir(workdir).teacher_export)  # nothing went on to export
  assert not os.path.exists(Workdir(workdir).trajectories(tiny.get_config()))
