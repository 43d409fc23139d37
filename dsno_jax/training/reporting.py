"""Run reports with clu: TensorBoard and console metrics, progress, parameter table, sample grids."""
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from dsno_jax import pictures, storage
from dsno_jax.models import build
from dsno_jax.workdir import Workdir


class _UploadingWriter(metric_writers.MultiWriter):
  """A writer of local event files that copies them to a remote log directory when flushed,
  closed, and at the first write after every `upload_every_s` seconds.

  TensorFlow's summary writer reaches Cloud Storage through its own client, which cannot be
  pointed at an emulator; writing locally and uploading works with both. Uploading as the run
  goes means a crash or a hard kill loses only the last minutes of curves.
  """

  def __init__(self, local: str, remote: str, upload_every_s: float):
    super().__init__([metric_writers.create_default_writer(local)])
    self._local, self._remote = local, remote
    self._upload_every_s, self._uploaded = upload_every_s, time.monotonic()

  def _upload_if_due(self):
    if time.monotonic() - self._uploaded < self._upload_every_s:
      return
    try:
      self.flush()
    except Exception as e:  # pylint: disable=broad-except
      self._uploaded = time.monotonic()  # a failed upload (a 503) is retried at the next one
      logging.warning("uploading the TensorBoard events to %s failed (%s: %s); retrying in "
                      "%g s", self._remote, type(e).__name__, e, self._upload_every_s)

  def write_scalars(self, step, scalars):
    super().write_scalars(step, scalars)
    self._upload_if_due()

  def write_images(self, step, images):
    super().write_images(step, images)
    self._upload_if_due()

  def write_texts(self, step, texts):
    super().write_texts(step, texts)
    self._upload_if_due()

  def flush(self):
    super().flush()
    storage.upload_tree(self._local, self._remote)
    self._uploaded = time.monotonic()

  def close(self):
    super().close()
    storage.upload_tree(self._local, self._remote)


def tensorboard_writer(logdir: str, just_logging: bool = False,
                       upload_every_s: float = 300.0) -> metric_writers.MetricWriter:
  """TensorBoard events in `logdir` (local or remote: uploaded every `upload_every_s` seconds
  of writes, and when flushed or closed) plus console logging."""
  if just_logging or not storage.is_remote(logdir):
    return metric_writers.create_default_writer(logdir, just_logging=just_logging)
  return _UploadingWriter(storage.cache_path(logdir), logdir, upload_every_s)


def make_writer(workdir: str, role: str,
                upload_every_s: float = 300.0) -> metric_writers.MetricWriter:
  """TensorBoard events under WORKDIR/logs/ROLE plus console logging (process 0 writes)."""
  return tensorboard_writer(Workdir(workdir).logs(role), just_logging=jax.process_index() > 0,
                            upload_every_s=upload_every_s)


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


def write_samples(writer, workdir: str, role: str, step: int, images: np.ndarray,
                  labels=None) -> str:
  """A PNG grid at WORKDIR/samples/ROLE_STEP.png and a TensorBoard image; returns the path.

  With the images' labels (N,), a row per class, labelled in the PNG.
  """
  path = Workdir(workdir).training_samples(role, step)
  if labels is None:
    grid = pictures.image_grid(images)
    if jax.process_index() == 0:
      pictures.save_png(grid, path)
  else:
    grid, _ = pictures.class_grid(images, labels)
    if jax.process_index() == 0:
      pictures.plot_class_grid(images, labels, path, f"{role}, step {step}")
  writer.write_images(step, {"samples": grid[None]})
  return path
