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
  assert table.count("\n| ") == 2 and "nearest-train distance, pixels" in table
  assert 0.0 <= dsno["pixel_near_copies"] <= 1.0 and dsno["pixel_nn_train_median"] > 0
  assert 0.0 <= dsno["nn_ratio_copies"] <= 1.0 and data["nn_ratio_copies"] == 0.0
  assert result["memorization"]["pixel_near_copy_threshold"] > 0
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


@pytest.fixture(scope="module")
def digits_u8():
  """The digits as uint8 (N, 8, 8, 1) images, split as dsno_jax/data/digits.py splits them."""
  from sklearn import datasets, model_selection
  data = datasets.load_digits()
  train, test = model_selection.train_test_split(
      np.arange(len(data.target)), test_size=360, stratify=data.target, random_state=0)
  images = np.round(data.images * (255 / 16)).astype(np.uint8)[..., None]
  return images[train], images[test]


def test_pixel_check_flags_exact_shifted_and_contrast_changed_train_copies(digits_u8):
  """Copies of training digits, exact, shifted by a pixel, or with another contrast, are flagged
  by the pixel check (under the held-out threshold and by the nearest/second-nearest ratio);
  held-out digits are not, and the feature columns do not need the images."""
  train, test = digits_u8
  flat = lambda images: images.reshape(len(images), -1).astype(np.float64)
  memorization = evaluate.Memorization(flat(train), flat(test), train, test)
  originals = train[:60]
  shifted = np.roll(originals, (1, -1), axis=(1, 2))
  contrast = np.round(originals * 0.6 + 40).astype(np.uint8)
  for name, copies in (("exact", originals), ("shifted", shifted), ("contrast", contrast)):
    columns, _, _ = memorization.measure(flat(copies), copies)
    assert columns["pixel_near_copies"] >= 0.95, name
    assert columns["nn_ratio_copies"] >= 0.95, name
    assert columns["pixel_nn_train_median"] < 0.02, name  # uint8 rounding of the contrast
    _, _, index = memorization.pixel_nearest(copies)
    assert np.mean(index == np.arange(60)) >= 0.95, name
  # A plain pixel (or these flattened-pixel "features") distance misses the shifted copies.
  assert memorization.measure(flat(shifted))[0]["near_copies"] < 0.5
  held_out = memorization.pixel_columns(test)
  assert held_out["pixel_near_copies"] < 0.05 and held_out["nn_ratio_copies"] == 0.0
  assert held_out["pixel_nn_train_median"] > 0.2


def test_memorization_figure_shows_each_models_closest_pairs(digits_u8, tmp_path, monkeypatch):
  """The refined student's closest pairs are drawn beside DSNO's, each sample with its nearest
  training image; without a refined export only DSNO's."""
  train, test = digits_u8
  flat = lambda images: images.reshape(len(images), -1).astype(np.float64)
  memorization = evaluate.Memorization(flat(train), flat(test), train, test)

  class Source:
    def get(self, indices):
      return train[indices], None

  drawn = []
  monkeypatch.setattr(evaluate.pictures, "plot_memorization",
                      lambda distances, pairs, path, **kwargs: drawn.append((distances, pairs)))
  copies = train[100:120]
  evaluate.plot_memorization(memorization, {"DSNO": test[:40], "DSNO refined": copies},
                             Source(), "test images", str(tmp_path / "m.png"))
  evaluate.plot_memorization(memorization, {"DSNO": test[:40], "DSNO refined": None},
                             Source(), "test images", str(tmp_path / "m.png"))
  (distances, pairs), (_, dsno_only) = drawn
  assert list(pairs) == ["DSNO", "DSNO refined"] and list(dsno_only) == ["DSNO"]
  assert list(distances) == ["DSNO samples", "DSNO refined samples", "test images"]
  refined_pairs, refined_distances = pairs["DSNO refined"]
  assert refined_pairs.shape == (evaluate.CLOSEST_PAIRS, 2, 8, 8, 1)
  np.testing.assert_array_equal(refined_pairs[:, 0], refined_pairs[:, 1])  # copies found
  assert refined_distances.max() < 1e-3 < pairs["DSNO"][1].min()


def test_near_copy_threshold_is_a_fitted_percentile_of_all_held_out_distances():
  """On log-normal distances the fitted 1st percentile is near the true one, and over
  resamples it varies less than the empirical percentile (the 4th-smallest of 360)."""
  rng = np.random.default_rng(2)
  truth = np.exp(1.0 + 0.3 * -2.3263479)  # exp(mu + sigma * z_0.01)
  fitted, empirical = [], []
  for _ in range(200):
    distances = np.exp(rng.normal(1.0, 0.3, 360))
    fitted.append(evaluate.near_copy_threshold(distances))
    empirical.append(np.percentile(distances, evaluate.NEAR_COPY_PERCENTILE))
  assert abs(np.mean(fitted) / truth - 1) < 0.02
  assert np.std(fitted) < 0.6 * np.std(empirical)


def test_nearest_train_equals_brute_force_float64():
  rng = np.random.default_rng(1)
  queries, train = rng.normal(size=(37, 9)), rng.normal(size=(53, 9))
  distances, second, index = evaluate.nearest_train(queries, train, chunk=16)
  brute = np.sqrt(((queries[:, None] - train[None]) ** 2).sum(-1))
  np.testing.assert_array_equal(index, brute.argmin(1))
  np.testing.assert_allclose(distances, brute.min(1), rtol=1e-5)
  np.testing.assert_allclose(second, np.sort(brute, 1)[:, 1], rtol=1e-5)
  # several views per query: a train row counts at its nearest view
  views = rng.normal(size=(37, 3, 9))
  distances, second, index = evaluate.nearest_train(views, train, chunk=16)
  brute = np.sqrt(((views[:, :, None] - train[None, None]) ** 2).sum(-1)).min(1)
  np.testing.assert_array_equal(index, brute.argmin(1))
  np.testing.assert_allclose(second, np.sort(brute, 1)[:, 1], rtol=1e-5)


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
