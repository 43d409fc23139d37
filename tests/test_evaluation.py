"""Mode `evaluate`: student-only tables, teacher rows at exactly their NFE, the memorisation
check, and scalars in TensorBoard."""
import glob
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import tiny
from dsno_jax import models, ode, teachers
from dsno_jax.evaluation import evaluate, sampling
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir
from param_utils import random_params


@pytest.fixture(scope="module")
def student_only(tmp_path_factory):
  """A random student evaluated with eval.teacher_rows=() in a workdir that has no teacher."""
  config = tiny.get_config()
  config.eval.teacher_rows = ()
  config.eval.memorization = True
  config.eval.num_samples, config.eval.batch_size, config.eval.classifier_steps = 16, 8, 20
  workdir = str(tmp_path_factory.mktemp("evaluate"))
  params = random_params(models.param_shapes(models.init_student, config), seed=3)
  model_io.save_model(Workdir(workdir).student_export, params, config, role="student")
  return workdir, evaluate.evaluate(config, workdir)


def test_student_only_evaluation_needs_no_teacher(student_only):
  workdir, result = student_only
  assert not os.path.exists(Workdir(workdir).teacher_export)  # loading one would have failed
  assert [(r["model"], r["solver"]) for r in result["rows"]] == [
      ("data (test vs train)", "-"), ("DSNO", "one step")]
  assert result["teacher"] is None
  data, dsno = result["rows"]
  assert np.isfinite(dsno["metric"]) and dsno["metric"] > data["metric"]
  with open(os.path.join(workdir, "eval", "results.md")) as f:
    table = f.read()
  assert table.count("\n| ") == 2 and "nearest-train distance" in table
  assert os.path.getsize(os.path.join(workdir, "eval", "memorization.png")) > 1000


def test_metrics_reach_tensorboard(student_only):
  workdir, result = student_only
  from tensorflow.compat.v1 import train as tf_train  # clu writes TensorFlow event files
  events = glob.glob(os.path.join(workdir, "logs", "eval", "events.out.tfevents.*"))
  assert events
  tags = {(value.tag, event.step) for path in events
          for event in tf_train.summary_iterator(path) for value in event.summary.value}
  assert ("FD-digits/DSNO_one_step", 1) in tags
  assert ("class_accuracy/DSNO_one_step", 1) in tags
  assert ("nn_train_median/data_test_vs_train", 0) in tags


def test_memorization_columns_tell_copies_from_new_images():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(200, 6))
  test = rng.normal(size=(100, 6))
  memorization = evaluate.Memorization(train, test)
  copies, _, index = memorization.measure(train[:50] + 1e-4)
  fresh, _, _ = memorization.measure(rng.normal(size=(100, 6)))
  np.testing.assert_array_equal(index, np.arange(50))
  assert copies["near_copies"] == 1.0 and copies["nn_train_median"] < 1e-3
  assert fresh["near_copies"] < 0.1
  assert 0.5 < fresh["nn_train_median"] / np.median(memorization.test_distances) < 2


def test_nearest_train_equals_brute_force_float64():
  rng = np.random.default_rng(1)
  queries, train = rng.normal(size=(37, 9)), rng.normal(size=(53, 9))
  distances, index = evaluate.nearest_train(queries, train, chunk=16)
  brute = np.sqrt(((queries[:, None] - train[None]) ** 2).sum(-1))
  np.testing.assert_array_equal(index, brute.argmin(1))
  np.testing.assert_allclose(distances, brute.min(1), rtol=1e-5)


def test_teacher_rows_are_parsed_or_refused_by_name():
  assert evaluate.parse_teacher_rows(("ddim:1,2, 4", "dpmpp2m:8", "dopri5:1e-4")) == [
      ("ddim", [1, 2, 4]), ("dpmpp2m", [8]), ("dopri5", [1e-4])]
  assert evaluate.parse_teacher_rows(()) == []
  for bad, message in (("euler:4", "SOLVER one of"), ("ddim", "SOLVER one of"),
                       ("ddim:0", "NFEs >= 1"), ("ddim:2.5", "NFEs >= 1"),
                       ("dopri5:1e-4,1e-5", "one tolerance"), ("tsit5:-1", "one tolerance")):
    with pytest.raises(ValueError, match=rf"eval.teacher_rows entry '{bad}'.*{message}"):
      evaluate.parse_teacher_rows((bad,))


def _counting_teacher(count):
  """The digits mixture as a pytree denoiser that counts, through a host callback, the examples
  it is evaluated on (whichever device runs it)."""
  def denoise(mixture, z, logsnr, y=None):
    jax.debug.callback(lambda n: count.append(int(n)), z.shape[0])  # append: atomic
    return mixture.denoise(z, logsnr, y)
  return jax.tree_util.Partial(denoise, teachers.digits_mixture(8))


@pytest.mark.parametrize("solver,value", [("ddim", 3), ("dpmpp3m", 5), ("phi2m", 4),
                                          ("tsit5", 1e-2)])
def test_teacher_row_at_nfe_n_makes_exactly_n_evaluations(solver, value):
  """Counted on 8 devices, one example each: an adaptive row reports what its solves made."""
  config = tiny.get_config()
  config.eval.num_samples, config.eval.batch_size = 16, 8
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  count = []
  adaptive = solver in ode.ADAPTIVE_SOLVERS
  images, labels, mean_nfe = sampling.teacher_samples(
      config, _counting_teacher(count), solver, mesh, nfe=1 if adaptive else value,
      tolerance=value)
  jax.effects_barrier()  # every callback has run
  assert images.shape == (16, 8, 8, 1) and images.dtype == np.uint8 and labels.shape == (16,)
  if adaptive:
    assert sum(count) == round(16 * mean_nfe) and mean_nfe > 10
  else:
    assert sum(count) == 16 * value and mean_nfe == value
