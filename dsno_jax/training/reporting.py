"""Run reports with clu: TensorBoard and console metrics, progress, parameter table, sample grids."""
import math
import os

import jax
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions


def make_writer(workdir: str, role: str) -> metric_writers.MetricWriter:
  """TensorBoard events under WORKDIR/logs/ROLE plus console logging (process 0 writes)."""
  return metric_writers.create_default_writer(
      os.path.join(workdir, "logs", role), just_logging=jax.process_index() > 0)


def progress(num_steps: int, writer) -> periodic_actions.ReportProgress:
  """Steps/s and ETA, written about once a minute."""
  return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                         every_secs=60.0)


def log_parameters(params) -> None:
  """Names, shapes and sizes (no statistics: parameters may be sharded over hosts)."""
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  parameter_overview.log_parameter_overview(shapes, include_stats=False,
                                            msg="parameters", jax_logging_process=0)


def image_grid(images: np.ndarray) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> uint8 (rows*H, cols*W, C), nearly square, row-major."""
  n, h, w, c = images.shape
  cols = int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  pixels = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255)
  grid = np.zeros((rows * cols, h, w, c), np.uint8)
  grid[:n] = pixels.astype(np.uint8)
  return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def write_samples(writer, workdir: str, role: str, step: int, images: np.ndarray) -> str:
  """A PNG grid at WORKDIR/samples/ROLE_STEP.png and a TensorBoard image; returns the path."""
  from PIL import Image
  grid = image_grid(images)
  path = os.path.join(workdir, "samples", f"{role}_{step:08d}.png")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  writer.write_images(step, {"samples": grid[None]})
  return path
