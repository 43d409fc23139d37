"""dsno_jax.load: every kind of export samples as numpy uint8, by seed, the same on 8 devices as
on 1, and `import dsno_jax` loads none of it until asked."""
import subprocess

import jax
import numpy as np
import pytest
import training_helpers as helpers

import dsno_jax
from dsno_jax import api, models
from dsno_jax.evaluation import sampling
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir
from param_utils import random_params

helpers.use_compilation_cache()
N, BATCH = 13, 13  # divides neither 8 devices nor 1 batch of 8: padded, never refused


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with the three exports a pipeline writes: student, refined student, teacher."""
  config = helpers.one_level_config()
  run = Workdir(str(tmp_path_factory.mktemp("api")))
  student = models.param_shapes(models.init_student, config)
  model_io.save_model(run.student_export, random_params(student, seed=1), config, "student")
  model_io.save_model(run.refined_export, random_params(student, seed=2), config, "student")
  teacher = models.param_shapes(models.init_teacher, config)
  model_io.save_model(run.teacher_export, random_params(teacher, seed=3), config, "teacher")
  return run


def on_one_device(monkeypatch):
  monkeypatch.setattr(api._Model, "_mesh", staticmethod(lambda: helpers.mesh_of(1)))


@pytest.mark.parametrize("kind", ["student", "refined"])
def test_a_student_samples_by_seed_alike_on_eight_devices_and_one(run, kind, monkeypatch):
  path = run.student_export if kind == "student" else run.refined_export
  model = dsno_jax.load(path)
  assert isinstance(model, api.Student) and jax.local_device_count() == 8
  steps = model.sample(N, seed=5, trajectory=True, batch_size=BATCH)
  assert steps.shape == (N, 4, 8, 8, 1) and steps.dtype == np.uint8
  samples = model.sample(N, seed=5, batch_size=BATCH)
  np.testing.assert_array_equal(samples, steps[:, -1])  # the last output is the sample
  assert samples.std() > 0
  assert not np.array_equal(model.sample(N, seed=6, batch_size=BATCH), samples)
  with monkeypatch.context() as patch:
    on_one_device(patch)
    one = model.sample(N, seed=5, batch_size=8)
  # uint8 of float32 outputs: rounding of a few values may flip by one level
  assert np.abs(one.astype(int) - samples).max() <= 1 and np.mean(one != samples) < 0.01
  if kind == "student":  # the first N samples of --mode=sample --config.seed=5
    params, config = model_io.load_student(path, "export")
    config.seed = 5
    _, labels, outputs = sampling.draw_samples(config, params, N, BATCH, helpers.mesh_of(8))
    np.testing.assert_array_equal(samples, dsno_jax.pictures.to_uint8(outputs[:, -1]))
    np.testing.assert_array_equal(model.labels(N, seed=5), labels)


def test_a_students_labels_are_its_seeded_ones_unless_given(run):
  model = dsno_jax.load(run.student_export)
  drawn = model.labels(N, seed=0)
  plain = model.sample(N, batch_size=BATCH)
  np.testing.assert_array_equal(model.sample(N, labels=drawn, batch_size=BATCH), plain)
  threes = model.sample(N, labels=3, batch_size=BATCH)
  same = drawn == 3
  np.testing.assert_array_equal(threes[same], plain[same])
  assert not np.array_equal(threes[~same], plain[~same])  # the label changes the picture
  with pytest.raises(ValueError, match=r"expected one integer or 13 integers in \[0, 10\)"):
    model.sample(N, labels=np.full(N, 10))
  with pytest.raises(ValueError, match="expected a positive number of samples"):
    model.sample(0)


def test_a_teacher_solves_its_ode_alike_on_eight_devices_and_one(run, monkeypatch):
  model = dsno_jax.load(run.teacher_export)
  assert isinstance(model, api.Teacher)
  samples = model.sample(N, solver="ddim", nfe=2, seed=1, batch_size=BATCH)
  assert samples.shape == (N, 8, 8, 1) and samples.dtype == np.uint8 and samples.std() > 0
  assert not np.array_equal(model.sample(N, solver="ddim", nfe=3, seed=1, batch_size=BATCH),
                            samples)
  with monkeypatch.context() as patch:
    on_one_device(patch)
    one = model.sample(N, solver="ddim", nfe=2, seed=1, batch_size=8)
  assert np.abs(one.astype(int) - samples).max() <= 1 and np.mean(one != samples) < 0.01
  with pytest.raises(ValueError, match="takes tolerance=, not nfe="):
    model.sample(N, solver="dopri5", nfe=8)
  with pytest.raises(ValueError, match="solver='euler'; expected one of"):
    model.sample(N, solver="euler")


def test_what_is_not_a_sampler_export_is_refused(run, tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a dsno_jax model export"):
    dsno_jax.load(str(tmp_path))
  classifier = str(tmp_path / "classifier")
  model_io.save_model(classifier, {"w": np.zeros(2, np.float32)}, helpers.one_level_config(),
                      "classifier")
  with pytest.raises(ValueError, match="holds a classifier export; expected a student"):
    dsno_jax.load(classifier)


def test_import_dsno_jax_stays_light_until_load_is_used():
  code = ("import sys, dsno_jax\n"
          "heavy = [m for m in ('dsno_jax.api', 'flax', 'orbax.checkpoint') if m in sys.modules]\n"
          "assert not heavy, heavy\n"
          "assert dsno_jax.load is sys.modules['dsno_jax.api'].load\n")
  subprocess.run([helpers.python(), "-c", code], check=True, env=helpers.subprocess_env(1),
                 timeout=120)
