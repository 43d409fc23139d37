"""Mode `pipeline` on a reduced digits config: every stage's outputs, a sane metric, skipping."""
import os

import numpy as np
import pytest

from configs import digits
from dsno_jax import modes


def reduced_config():
  config = digits.get_config()
  config.model.ch_mult, config.model.attn_resolutions = (1, 2), (4,)
  config.teacher.train.num_steps, config.teacher.train.batch_size = 8, 32
  config.teacher.train.checkpoint_every = config.teacher.train.log_every = 8
  config.teacher.train.sample_every = 0
  config.train.num_steps, config.train.batch_size = 6, 16
  config.train.checkpoint_every = config.train.log_every = 6
  config.train.sample_every = 0
  trajectory = config.trajectory
  trajectory.num_examples, trajectory.batch_size = 64, 32
  trajectory.shard_size, trajectory.num_steps = 32, 4
  refine = config.refine
  refine.num_steps, refine.batch_size, refine.fake_steps = 4, 16, 2
  refine.checkpoint_every = refine.log_every = 4
  evaluation = config.eval
  evaluation.num_samples, evaluation.batch_size, evaluation.classifier_steps = 64, 32, 60
  # an adaptive row at a loose tolerance keeps the smoke test short
  evaluation.teacher_rows = ("ddim:2", "dopri5:1e-2")
  return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  config = reduced_config()
  return workdir, config, modes.pipeline(config, workdir)


def test_every_stage_leaves_its_outputs(finished):
  workdir, _, _ = finished
  for path in ("teacher/model.json", "classifier/model.json", "trajectories/dataset_info.json",
               "export/model.json", "samples/samples.npz", "samples/grid.png",
               "samples/trajectories.png", "eval/results.json", "eval/results.md",
               "eval/fid_vs_nfe.png", "eval/memorization.png"):
    assert os.path.exists(os.path.join(workdir, path)), path
  for role in ("student", "eval"):
    assert os.listdir(os.path.join(workdir, "logs", role))  # TensorBoard events


def test_the_table_is_sane(finished):
  _, config, result = finished
  rows = {(r["model"], r["solver"], r["nfe"]): r for r in result["rows"]}
  data = rows[("data (test vs train)", "-", 0)]
  # held-out real digits are close to the training digits and recognised by the classifier
  assert data["class_accuracy"] > 0.8
  dsno = rows[("DSNO", "one step", 1)]
  teacher = rows[("teacher", "ddim", 2)]
  adaptive = rows[next(k for k in rows if k[1] == "dopri5 (tol 0.01)")]
  for row in (dsno, teacher, adaptive):
    assert np.isfinite(row["metric"]) and row["metric"] > data["metric"]
    assert 0.0 <= row["class_accuracy"] <= 1.0
    assert row["nn_train_median"] > 0 and 0.0 <= row["near_copies"] <= 1.0
  assert adaptive["adaptive"] and adaptive["nfe"] > 6  # the mean NFE the solves made
  if config.refine.in_pipeline:  # the refine stage ran: its export and its row
    refined = rows[("DSNO refined", "one step", 1)]
    assert np.isfinite(refined["metric"]) and 0.0 <= refined["near_copies"] <= 1.0
  assert result["num_samples"] == config.eval.num_samples


def test_a_second_run_skips_every_stage(finished, capsys):
  workdir, config, result = finished
  again = modes.pipeline(config, workdir)
  assert again == result
  out = capsys.readouterr().out
  assert out.count("skipped") == 8, out
