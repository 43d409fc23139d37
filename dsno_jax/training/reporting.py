"""Run reports with clu: TensorBoard and console metrics, progress, parameter table, sample grids."""
import jax
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from dsno_jax import pictures
from dsno_jax.workdir import Workdir


def make_writer(workdir: str, role: str) -> metric_writers.MetricWriter:
  """TensorBoard events under WORKDIR/logs/ROLE plus console logging (process 0 writes)."""
  return metric_writers.create_default_writer(
      Workdir(workdir).logs(role), just_logging=jax.process_index() > 0)


def progress(num_steps: int, writer) -> periodic_actions.ReportProgress:
  """Steps/s and ETA, written about once a minute."""
  return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                         every_secs=60.0)


def log_parameters(params) -> None:
  """Names, shapes and sizes (no statistics: parameters may be sharded over hosts)."""
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  parameter_overview.log_parameter_overview(shapes, include_stats=False,
                                            msg="parameters", jax_logging_process=0)


def write_samples(writer, workdir: str, role: str, step: int, images: np.ndarray) -> str:
  """A PNG grid at WORKDIR/samples/ROLE_STEP.png and a TensorBoard image; returns the path."""
  grid = pictures.image_grid(images)
  path = Workdir(workdir).training_samples(role, step)
  if jax.process_index() == 0:
    pictures.save_png(grid, path)
  writer.write_images(step, {"samples": grid[None]})
  return path
