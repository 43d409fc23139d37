"""Pictures: grid cells apart, labelled trajectory strips, the metric and memorisation plots."""
import os

import numpy as np
import pytest
from PIL import Image

from dsno_jax import pictures


def test_grid_cells_are_separated_by_a_gap():
  images = np.stack([np.full((3, 2, 1), v, np.uint8) for v in (0, 255, 0, 255, 0)])
  grid = pictures.image_grid(images, cols=3)  # 2 rows, the last one short
  assert grid.shape == (2 * 3 + 1, 3 * 2 + 2, 1)
  gap = pictures.GAP_VALUE
  np.testing.assert_array_equal(grid[:, 2], gap)  # between columns 0 and 1
  np.testing.assert_array_equal(grid[:, 5], gap)  # between columns 1 and 2
  np.testing.assert_array_equal(grid[3], gap)  # between the rows
  np.testing.assert_array_equal(grid[:3, 3:5, 0], 255)  # cell (0, 1)
  np.testing.assert_array_equal(grid[4:, 0:2, 0], 255)  # cell (1, 0)
  np.testing.assert_array_equal(grid[4:, 3:5, 0], 0)  # cell (1, 1)
  np.testing.assert_array_equal(grid[4:, 6:, 0], gap)  # the empty cell
  assert gap not in (0, 255)  # apart from both black backgrounds and white strokes
  floats = pictures.image_grid(np.linspace(-1, 1, 4 * 8 * 8).reshape(4, 8, 8, 1), gap=0)
  assert floats.shape == (16, 16, 1) and floats.dtype == np.uint8


def test_trajectory_strips_and_their_labelled_picture(tmp_path):
  rng = np.random.default_rng(0)
  noise, outputs = rng.normal(size=(2, 8, 8, 1)), rng.uniform(-1, 1, (2, 4, 8, 8, 1))
  strips = pictures.trajectory_strips(noise, outputs)
  assert strips.shape == (2 * 8 + 1, 5 * 8 + 4, 1)
  # column 0 is the noise, so output 1 of example 0 sits in column 2, after two gaps
  np.testing.assert_array_equal(strips[:8, 18:26], pictures.to_uint8(outputs[0, 1]))
  path = pictures.plot_trajectories(noise, outputs, (0.5625, 0.25, 0.0625, 0.0),
                                    str(tmp_path / "t.png"), logsnrs=(-0.4, 2.0, 5.1, 20.0))
  width, height = Image.open(path).size
  assert width > 400 and height > 150  # strips plus a row of column labels


def test_metric_and_memorization_plots_are_written(tmp_path):
  rng = np.random.default_rng(1)
  path = pictures.plot_metric_vs_nfe(
      {"teacher ddim": {1: 30.0, 2: 10.0, 4: 4.0}}, str(tmp_path / "m.png"), metric="FD",
      points={"DSNO (1 NFE)": (1.0, 3.0), "teacher dopri5": (79.3, 1.7)})
  assert os.path.getsize(path) > 1000
  pairs = rng.integers(0, 256, (3, 2, 8, 8, 1), dtype=np.uint8)
  path = pictures.plot_memorization(
      {"samples": rng.uniform(1, 3, 50), "test": rng.uniform(1, 3, 30)},
      {"DSNO": (pairs, np.array([0.5, 0.7, 0.9])), "refined": (pairs[:2], np.array([0.4, 0.6]))},
      str(tmp_path / "mem.png"), feature_name="digits features")
  assert os.path.getsize(path) > 1000


def test_class_grid_has_a_row_per_class_in_order_with_short_rows_left_empty(tmp_path):
  images = np.stack([np.full((2, 3, 1), 10 * i, np.uint8) for i in range(5)])
  labels = np.array([7, 2, 7, 7, 2])
  grid, classes = pictures.class_grid(images, labels)
  np.testing.assert_array_equal(classes, [2, 7])
  assert grid.shape == (2 * 2 + 1, 3 * 3 + 2, 1)  # 2 rows (classes), 3 columns (the most)
  np.testing.assert_array_equal(grid[:2, 0:3, 0], 10)  # class 2: images 1 and 4, in order
  np.testing.assert_array_equal(grid[:2, 4:7, 0], 40)
  np.testing.assert_array_equal(grid[:2, 8:, 0], pictures.GAP_VALUE)  # its empty third cell
  np.testing.assert_array_equal(grid[2], pictures.GAP_VALUE)  # between the rows
  np.testing.assert_array_equal(grid[3:, 0:3, 0], 0)  # class 7: images 0, 2, 3
  np.testing.assert_array_equal(grid[3:, 8:, 0], 30)
  np.testing.assert_array_equal(pictures.grid_labels(1000, 2, max_classes=3), [0, 0, 1, 1, 2, 2])
  path = pictures.plot_class_grid(images, labels, str(tmp_path / "c.png"), "by class")
  width, height = Image.open(path).size
  assert width > 100 and height > 100  # the grid plus its row labels
  with pytest.raises(ValueError, match=r"labels of shape \(4,\) for 5 images"):
    pictures.class_grid(images, labels[:4])


def test_training_grids_of_a_conditional_run_show_a_row_per_class(tmp_path):
  """The teacher's and the student's sample grids during training (training.objectives)."""
  import jax
  from configs import tiny
  from dsno_jax.training import objectives, reporting
  config = tiny.get_config()  # 10 classes
  noise, labels = objectives.sample_inputs(config, jax.random.PRNGKey(0))
  per_class = objectives.PER_CLASS
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), per_class))
  assert noise.shape == (10 * per_class, 8, 8, 1)
  images = np.random.default_rng(0).integers(0, 256, noise.shape, dtype=np.uint8)

  class Writer:  # records what TensorBoard would get
    def write_images(self, step, images):
      self.step, self.images = step, images

  writer = Writer()
  path = reporting.write_samples(writer, str(tmp_path), "teacher", 5, images,
                                 objectives.sample_labels(config))
  assert os.path.getsize(path) > 1000
  grid = writer.images["samples"][0]
  assert grid.shape == (10 * 9 - 1, per_class * 9 - 1, 1)
  np.testing.assert_array_equal(grid[9 * 3:9 * 3 + 8, 9:17], images[3 * per_class + 1])  # class 3
  config.data.num_classes = 1
  noise, labels = objectives.sample_inputs(config, jax.random.PRNGKey(0))
  assert labels is None and objectives.sample_labels(config) is None
  assert noise.shape == (objectives.NUM_SAMPLES, 8, 8, 1)
