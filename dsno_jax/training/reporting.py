"""Run reports with clu: TensorBoard and console metrics, progress, parameter table, sample grids."""
import jax
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from dsno_jax import pictures, storage
from dsno_jax.models import build
from dsno_jax.workdir import Workdir


class _UploadingWriter(metric_writers.MultiWriter):
  """A writer of local event files that copies them to a remote log directory when flushed.

  TensorFlow's summary writer reaches Cloud Storage through its own client, which cannot be
  pointed at an emulator; writing locally and uploading works with both.
  """

  def __init__(self, local: str, remote: str):
    super().__init__([metric_writers.create_default_writer(local)])
    self._local, self._remote = local, remote

  def flush(self):
    super().flush()
    storage.upload_tree(self._local, self._remote)

  def close(self):
    super().close()
    storage.upload_tree(self._local, self._remote)


def tensorboard_writer(logdir: str, just_logging: bool = False) -> metric_writers.MetricWriter:
  """TensorBoard events in `logdir` (local or remote) plus console logging."""
  if just_logging or not storage.is_remote(logdir):
    return metric_writers.create_default_writer(logdir, just_logging=just_logging)
  return _UploadingWriter(storage.cache_path(logdir), logdir)


def make_writer(workdir: str, role: str) -> metric_writers.MetricWriter:
  """TensorBoard events under WORKDIR/logs/ROLE plus console logging (process 0 writes)."""
  return tensorboard_writer(Workdir(workdir).logs(role), just_logging=jax.process_index() > 0)


def progress(num_steps: int, writer) -> periodic_actions.ReportProgress:
  """Steps/s and ETA, written about once a minute."""
  return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                         every_secs=60.0)


def log_parameters(params, workdir: str, role: str) -> str:
  """Writes the table of names, shapes and sizes to WORKDIR/logs/params_ROLE.md (no statistics:
  parameters may be sharded over hosts) and logs its total; returns the table's path."""
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  total = build.count_params(shapes)
  path = Workdir(workdir).parameter_table(role)
  if jax.process_index() == 0:
    table = parameter_overview.get_parameter_overview(shapes, include_stats=False)
    storage.write_text(path, f"# {role} parameters: {total:,}\n\n```text\n{table}\n```\n")
    logging.info("%s: %s parameters (table: %s)", role, f"{total:,}", path)
  return path


def write_samples(writer, workdir: str, role: str, step: int, images: np.ndarray) -> str:
  """A PNG grid at WORKDIR/samples/ROLE_STEP.png and a TensorBoard image; returns the path."""
  grid = pictures.image_grid(images)
  path = Workdir(workdir).training_samples(role, step)
  if jax.process_index() == 0:
    pictures.save_png(grid, path)
  writer.write_images(step, {"samples": grid[None]})
  return path
