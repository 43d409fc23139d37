"""Mode `sample`: one-step samples from an export, equal on 1 and 8 devices, with pictures."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from configs import tiny
from dsno_jax import models
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir
from dsno_jax.evaluation import sampling
from param_utils import random_params


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  config = tiny.get_config()
  workdir = str(tmp_path_factory.mktemp("sample"))
  params = random_params(models.param_shapes(models.init_student, config), seed=3)
  model_io.save_model(Workdir(workdir).student_export, params, config, role="student")
  return config, workdir, params


def test_sample_writes_adm_and_edm_readable_samples_and_pictures(exported):
  config, workdir, _ = exported
  config.eval.num_samples, config.eval.batch_size = 12, 8  # a padded last batch
  config.eval.save_png = True
  path = sampling.sample(config, workdir)
  with np.load(path) as f:  # ADM's evaluator reads arr_0 (uint8 NHWC); labels in arr_1
    assert sorted(f.files) == ["arr_0", "arr_1"]
    images, labels = f["arr_0"], f["arr_1"]
  assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
  assert labels.shape == (12,) and labels.min() >= 0 and labels.max() < 10
  assert images.std() > 0  # random parameters give non-constant pictures
  for name in ("grid.png", "trajectories.png"):
    assert os.path.getsize(os.path.join(workdir, "samples", name)) > 100
  # EDM's fid.py reads a folder of PNGs; its dataset tool, labels from dataset.json
  folder = os.path.join(workdir, "samples", sampling.PNG_FOLDER)
  pngs = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
  assert len(pngs) == 12 and pngs[0] == "000000.png"
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, pngs[5]))),
                                images[5, ..., 0])
  with open(os.path.join(folder, "dataset.json")) as f:
    assert json.load(f)["labels"][5] == ["000005.png", int(labels[5])]


def test_eight_devices_equal_one(exported):
  config, _, params = exported
  one = sampling.draw_samples(config, params, 8, 8, Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  eight = sampling.draw_samples(config, params, 8, 8, Mesh(np.asarray(jax.devices()), ("data",)))
  assert len(jax.devices()) == 8
  for a, b in zip(one, eight):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert one[2].shape == (8, 4, 8, 8, 1)


def test_missing_export_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="run --mode=export first"):
    sampling.sample(tiny.get_config(), str(tmp_path))
