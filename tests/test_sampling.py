"""Mode `sample`: one-step samples from an export, equal on 1 and 8 devices, with pictures."""
import json
import os

import jax
import numpy as np
import pytest
import training_helpers as helpers
from jax.sharding import Mesh
from PIL import Image

from configs import tiny
from dsno_jax import models
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir
from dsno_jax.evaluation import sampling
from param_utils import random_params


helpers.use_compilation_cache()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  config = helpers.one_level_config()  # the sampling is under test, not the network
  workdir = str(tmp_path_factory.mktemp("sample"))
  params = random_params(models.param_shapes(models.init_student, config), seed=3)
  model_io.save_model(Workdir(workdir).student_export, params, config, role="student")
  return config, workdir, params


def test_sample_writes_adm_and_edm_readable_samples_and_pictures(exported):
  config, workdir, params = exported
  config.eval.num_samples, config.eval.batch_size = 12, 8  # a padded last batch
  config.eval.save_png = True
  refined = jax.tree_util.tree_map(lambda x: -x, params)
  model_io.save_model(Workdir(workdir).refined_export, refined, config, role="student")
  path = sampling.sample(config, workdir)
  with np.load(path) as f:  # ADM's evaluator reads arr_0 (uint8 NHWC); labels in arr_1
    assert sorted(f.files) == ["arr_0", "arr_1"]
    images, labels = f["arr_0"], f["arr_1"]
  assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
  assert labels.shape == (12,) and labels.min() >= 0 and labels.max() < 10
  assert images.std() > 0  # random parameters give non-constant pictures
  for name in ("grid.png", "grid_refined.png", "trajectories.png"):
    assert os.path.getsize(os.path.join(workdir, "samples", name)) > 100
  # a row per class: the first 10 classes, 10 samples each, labelled (wider than the pixels)
  width, height = Image.open(os.path.join(workdir, "samples", "grid.png")).size
  assert width > 10 * 9 and height > 10 * 9
  # EDM's fid.py reads a folder of PNGs; its dataset tool, labels from dataset.json
  folder = os.path.join(workdir, "samples", sampling.PNG_FOLDER)
  pngs = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
  assert len(pngs) == 12 and pngs[0] == "000000.png"
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, pngs[5]))),
                                images[5, ..., 0])
  with open(os.path.join(folder, "dataset.json")) as f:
    assert json.load(f)["labels"][5] == ["000005.png", int(labels[5])]


def test_eight_devices_equal_one_with_batches_that_divide_neither(exported):
  config, _, params = exported
  assert len(jax.devices()) == 8
  # 13 examples in batches of 13 (rounded up to 16 on 8 devices) and of 5 on one device
  one = sampling.draw_samples(config, params, 13, 5, Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  eight = sampling.draw_samples(config, params, 13, 13, Mesh(np.asarray(jax.devices()), ("data",)))
  for a, b in zip(one, eight):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert one[2].shape == (13, 4, 8, 8, 1)
  # given labels replace the drawn ones and nothing else: the drawn ones give the same outputs
  noise, labels, outputs = sampling.draw_samples(
      config, params, 13, 13, Mesh(np.asarray(jax.devices()), ("data",)), labels=one[1])
  for a, b in zip((noise, labels, outputs), one):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_batches_round_up_to_the_device_count_and_bad_labels_are_refused(exported, caplog):
  from dsno_jax import parallel
  assert parallel.round_up_batch(1000, 16) == 1008 and parallel.round_up_batch(1000, 8) == 1000
  assert parallel.round_up_batch(64, 256) == 256
  assert parallel.round_up_batch(13, 8, grad_accum=2) == 16
  with caplog.at_level("INFO", logger="absl"):
    parallel.round_up_batch(64, 256, name="refine.batch_size")
  assert "refine.batch_size=64 rounded up to 256, a multiple of the 256 devices" in caplog.text
  with pytest.raises(ValueError, match="eval.batch_size=0; expected a positive integer"):
    parallel.round_up_batch(0, 8, name="eval.batch_size")
  config = exported[0]
  with pytest.raises(ValueError, match=r"values \[-1\]...; expected one integer or 3 integers "
                     r"in \[0, 10\)"):
    sampling.check_labels(config, np.full(3, -1), 3)
  with pytest.raises(ValueError, match="expected one integer or 3 integers"):
    sampling.check_labels(config, np.zeros(4, int), 3)
  unconditional = tiny.get_config()
  unconditional.data.num_classes = 1
  with pytest.raises(ValueError, match="unconditional model .* expected labels=None"):
    sampling.check_labels(unconditional, 0, 3)


def test_missing_export_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="run --mode=export first"):
    sampling.sample(tiny.get_config(), str(tmp_path))
