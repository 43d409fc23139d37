"""The command line as a user sees it: library INFO lines kept off the console, parameter tables
in files, every missing input refused at the start in one message, user errors without traceback."""
import io
import logging
import os
import re
import subprocess

import numpy as np
import clu
import orbax.checkpoint as ocp
import pytest
import training_helpers as helpers
from absl import logging as absl_logging

from configs import cifar10, imagenet64, tiny
from dsno_jax import console, errors, parallel, preflight
from dsno_jax.training import reporting
from dsno_jax.workdir import Workdir

TIMEOUT_S = 600  # generous: the machine may be shared
# the smallest teacher run that saves a checkpoint: one level, two steps
SMALL_RUN = {"model.ch_mult": "(1,)", "model.attn_resolutions": "(8,)",
             "teacher.train.num_steps": 2, "teacher.train.checkpoint_every": 2}


# --- a quiet console ----------------------------------------------------------------------------
def test_orbax_info_lines_stay_off_the_console_while_warnings_and_ours_show(tmp_path):
  everything, quiet = io.StringIO(), io.StringIO()
  handlers = [logging.StreamHandler(everything), logging.StreamHandler(quiet)]
  console.quiet_libraries(0, handlers[1])
  for handler in handlers:
    handler.setFormatter(logging.Formatter("%(levelname)s %(pathname)s %(message)s"))
    logging.getLogger().addHandler(handler)
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))  # orbax logs its INFO lines
    manager.close()
    absl_logging.info("a line of the run")
  finally:
    absl_logging.set_verbosity(level)
    for handler in handlers:
      logging.getLogger().removeHandler(handler)
  orbax_dir = os.path.dirname(ocp.__file__)
  assert f"INFO {orbax_dir}" in everything.getvalue()  # what the filter has to remove
  assert orbax_dir not in quiet.getvalue(), quiet.getvalue()
  assert "a line of the run" in quiet.getvalue()
  warning = logging.LogRecord("absl", logging.WARNING, os.path.join(orbax_dir, "x.py"), 1,
                              "disk full", None, None)
  assert console.LibraryInfoFilter(console.library_directories()).filter(warning)


def test_the_parameter_table_goes_to_a_file_and_its_total_to_the_console(tmp_path, caplog):
  params = {"conv": {"kernel": np.zeros((3, 3, 1, 4), np.float32),
                     "bias": np.zeros((4,), np.float32)}}
  with caplog.at_level(logging.INFO, logger="absl"):
    path = reporting.log_parameters(params, str(tmp_path), "teacher")
  assert path == Workdir(str(tmp_path)).parameter_table("teacher")
  assert path == str(tmp_path / "logs" / "params_teacher.md")
  table = open(path).read()
  assert table.startswith("# teacher parameters: 40\n")
  assert "conv/kernel" in table and "(3, 3, 1, 4)" in table and "conv/bias" in table
  lines = [r.getMessage() for r in caplog.records]
  assert f"teacher: 40 parameters (table: {path})" in lines, lines
  assert not any("conv/kernel" in line for line in lines)  # the rows stay in the file


def test_a_training_run_keeps_orbax_internals_and_table_rows_off_the_console(tmp_path):
  workdir = str(tmp_path / "run")
  run = subprocess.run(
      [helpers.python(), "-m", "dsno_jax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", "--mode=train_teacher"]
      + [f"--config.{name}={value}" for name, value in SMALL_RUN.items()],
      cwd=helpers.ROOT, env=helpers.subprocess_env(1), capture_output=True, text=True,
      timeout=TIMEOUT_S)
  assert run.returncode == 0, run.stderr[-3000:]
  def files(directory):
    return {name for _, _, names in os.walk(directory) for name in names if name.endswith(".py")}
  # absl's lines name the file alone: leave out names that the lines kept share (clu: progress)
  orbax_only = (files(os.path.dirname(ocp.__file__)) - files(os.path.dirname(clu.__file__))
                - files(os.path.join(helpers.ROOT, "dsno_jax")))
  sources = re.findall(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\]", run.stderr, re.MULTILINE)
  assert "local.py" in sources, run.stderr[-3000:]  # clu's progress with its ETA is kept
  assert not [s for s in sources if s in orbax_only], run.stderr[-3000:]
  table = Workdir(workdir).parameter_table("teacher")
  total = open(table).read().splitlines()[0].split(": ")[1]
  assert f"teacher: {total} parameters (table: {table})" in run.stderr
  assert "conv_in/kernel" in open(table).read() and "conv_in/kernel" not in run.stderr


# --- one message for everything missing, before any work ---------------------------------------
@pytest.mark.parametrize("mode, expected", [
    ("generate", ["no teacher"]),
    ("train", ["no complete trajectory dataset", "no teacher"]),
    ("export", ["no student checkpoints"]),
    ("refine", ["no student export", "no teacher", "no complete trajectory dataset"]),
    ("sample", ["no student export"]),
    ("evaluate", ["no student export", "no teacher"]),
])
def test_each_mode_names_every_input_it_lacks(tmp_path, mode, expected):
  problems = preflight.missing(tiny.get_config(), str(tmp_path), mode)
  assert len(problems) == len(expected), problems
  for problem, start in zip(problems, expected):
    assert problem.startswith(start) and "--mode=" in problem, problem


def test_the_digits_pipeline_needs_nothing_it_does_not_make(tmp_path):
  assert preflight.missing(tiny.get_config(), str(tmp_path), "pipeline") == []


def test_a_folder_data_set_that_is_not_there_is_refused(tmp_path):
  config = tiny.get_config()
  config.data.name, config.data.data_dir = "folder", str(tmp_path / "absent")
  with pytest.raises(errors.UserError, match=r"--mode=train_teacher cannot start: .*ROOT/train"):
    preflight.check(config, str(tmp_path / "run"), "train_teacher")


def test_a_published_teacher_is_trained_only_when_asked(tmp_path):
  config = cifar10.get_config()
  present = str(tmp_path / "present.npz")  # only the presence of these files is checked here
  np.savez(present, x=np.zeros(1))
  config.eval.inception_weights = config.eval.reference_stats = present
  config.train.perceptual_weights, config.eval.memorization = present, False
  config.data.data_dir = str(tmp_path / "tfds")  # not prepared: only teacher training reads it
  workdir = str(tmp_path / "run")
  problems = preflight.missing(config, workdir, "pipeline")
  assert len(problems) == 2 and "800,000 steps" in problems[0], problems
  assert "teacher.train_from_scratch=True" in problems[0] and "not prepared" in problems[1]
  config.teacher.train_from_scratch = True
  assert preflight.missing(config, workdir, "pipeline") == problems[1:]
  config.teacher.train_from_scratch = False
  os.makedirs(Workdir(workdir).checkpoints("teacher"))  # a teacher training asked for earlier
  assert preflight.missing(config, workdir, "pipeline") == problems[1:]
  os.rmdir(Workdir(workdir).checkpoints("teacher"))
  config.teacher.checkpoint = present
  assert preflight.missing(config, workdir, "pipeline") == []


def test_the_pipeline_lists_every_missing_input_in_one_message(tmp_path):
  config = imagenet64.get_config()
  config.data.data_dir = str(tmp_path / "tfds")
  config.teacher.checkpoint = str(tmp_path / "imagenet64_16.msgpack")
  config.eval.inception_weights = str(tmp_path / "inception_fid.npz")
  config.eval.reference_stats = str(tmp_path / "imagenet64_stats.npz")
  config.train.loss, config.train.perceptual_weights = "vgg", str(tmp_path / "vgg16.npz")
  workdir = str(tmp_path / "run")
  with pytest.raises(errors.UserError) as info:
    preflight.check(config, workdir, "pipeline")
  message = str(info.value)
  assert message.startswith("--mode=pipeline cannot start; 4 inputs are missing:"), message
  for needle in ("imagenet64_16.msgpack", "vgg16.npz", "inception_fid.npz",
                 "imagenet64_stats.npz"):
    assert message.count(needle) >= 1, (needle, message)
  assert not os.path.exists(workdir)  # nothing written
  config.eval.reference_stats = ""  # now the statistics come from the train split: not prepared
  assert "not prepared" in preflight.missing(config, workdir, "pipeline")[-1]


def test_a_user_error_ends_the_command_with_its_message_alone(tmp_path):
  workdir = str(tmp_path / "run")
  command = [helpers.python(), "-m", "dsno_jax.main", "--config=configs/imagenet64.py",
             f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
  env = dict(helpers.subprocess_env(1),
             DSNO_JAX_INCEPTION_WEIGHTS=str(tmp_path / "inception_fid.npz"))
  run = subprocess.run(command, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  error = run.stderr[run.stderr.index("error: "):]
  assert error.startswith("error: --mode=pipeline cannot start; 3 inputs are missing:"), error
  assert "teacher.checkpoint" in error and "not prepared" in error and "Inception" in error
  assert not os.path.exists(workdir)  # refused before the lock, the data or any compilation
  verbose = subprocess.run(command + ["--verbosity=1"], cwd=helpers.ROOT, env=env,
                           capture_output=True, text=True, timeout=TIMEOUT_S)
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr, verbose.stderr[-3000:]


def test_config_errors_are_user_errors():
  with pytest.raises(errors.UserError, match="not divisible by the 8 devices"):
    parallel.check_batch_size(12, helpers.mesh_of(8))
