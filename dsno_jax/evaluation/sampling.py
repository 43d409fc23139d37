"""Sampling for evaluation: DSNO's one step (K outputs, the last is the sample), and the teacher's
ODE solvers from the same noise, both logged with progress and an ETA."""
import io
import functools
import json
import time
from typing import Callable, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from dsno_jax import diffusion, export, models, ode, parallel, pictures, storage
from dsno_jax.data import noise as noise_lib
from dsno_jax.workdir import Workdir

# Samples draw their noise from a stream of their own, never from the training trajectories'.
SAMPLE_SEED_OFFSET = 1_000_003
_LOG_EVERY_S = 10.0
PNG_FOLDER = "png"  # WORKDIR/samples/png: one PNG per sample (eval.save_png)
GRID_SAMPLES = 100  # samples in the grid of an unconditional model
GRID_PER_CLASS = 10  # samples per class (row) in the grid of a class-conditional model


class Progress:
  """Logs 'what: done/total, items/s, ETA' at most every _LOG_EVERY_S seconds and at the end."""

  def __init__(self, what: str, total: int):
    self.what, self.total, self.done = what, int(total), 0
    self.start = self.last_log = time.time()

  def update(self, n: int):
    self.done += int(n)
    now = time.time()
    if now - self.last_log < _LOG_EVERY_S and self.done < self.total:
      return
    self.last_log = now
    rate = self.done / max(now - self.start, 1e-9)
    if self.done < self.total:
      logging.info("%s: %d/%d, %.1f/s, ETA %.0f s", self.what, self.done, self.total, rate,
                   (self.total - self.done) / max(rate, 1e-9))
    else:
      logging.info("%s: %d in %.1f s", self.what, self.total, now - self.start)


def draw_logged(fn: Callable, params, num_examples: int, batch_size: int, mesh: Mesh,
                what: str, columns: Tuple[np.ndarray, ...] = ()) -> Tuple:
  """`parallel.draw` of examples 0..num_examples-1 (with their `columns` rows), batch by batch
  with progress logged; each example's value still depends only on its index and columns."""
  progress, pieces = Progress(what, num_examples), []
  batch_size = min(batch_size, num_examples)  # a few examples need no batch of thousands
  for start in range(0, num_examples, batch_size):
    n = min(batch_size, num_examples - start)
    offset = functools.partial(lambda p, indices, *rows, start: fn(p, indices + start, *rows),
                               start=start)
    chunk = tuple(np.asarray(c)[start:start + n] for c in columns)
    pieces.append(parallel.draw(offset, params, n, batch_size, mesh, chunk))
    progress.update(n)
  return tuple(np.concatenate(p) for p in zip(*pieces))


def sample_inputs(config, indices):
  """(noise (B, H, W, C), labels (B,)) of the evaluation's examples `indices`: the same for the
  student and every teacher row.

  Labels go round the classes (index i has class i mod num_classes), so that every metric sees
  the classes in equal numbers: FD against the near-balanced data moves with the class mix, and
  uniform draws of 1,000 labels vary each class's share by some 10%.
  """
  size, channels = config.data.image_size, config.data.channels
  # num_classes=1: the noise alone (it does not depend on the class count); labels below
  noise, labels = noise_lib.example_inputs(indices, seed=config.seed + SAMPLE_SEED_OFFSET,
                                           image_shape=(size, size, channels), num_classes=1)
  if config.data.num_classes > 1:
    labels = (jnp.asarray(indices) % config.data.num_classes).astype(jnp.int32)
  return noise, labels


def check_labels(config, labels, num_examples: int) -> np.ndarray:
  """`labels` (an int or (num_examples,) ints) as int32 (num_examples,), or a ValueError naming
  what the model accepts."""
  num_classes = config.data.num_classes
  if num_classes <= 1:
    raise ValueError(f"labels={labels!r} given to an unconditional model (data.num_classes="
                     f"{num_classes}); expected labels=None")
  labels = np.broadcast_to(np.asarray(labels), (num_examples,)) if np.ndim(labels) == 0 \
      else np.asarray(labels)
  if (labels.shape != (num_examples,) or not np.issubdtype(labels.dtype, np.integer)
      or labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes):
    raise ValueError(f"labels of shape {labels.shape}, dtype {labels.dtype}, values "
                     f"{np.unique(labels)[:10].tolist()}...; expected one integer or "
                     f"{num_examples} integers in [0, {num_classes})")
  return labels.astype(np.int32)


def _inputs(config, indices, given):
  """sample_inputs of `indices`, with the labels replaced by `given` (a tuple of one (B,) array)."""
  noise, labels = sample_inputs(config, indices)
  return noise, (given[0] if given else labels)


def make_sampler(config, mesh, given_labels: bool = False) -> Callable:
  """jit (params, indices (B,)[, labels (B,)] on `data`) -> (noise, labels, outputs
  (B, K, H, W, C)).

  Example i's noise comes from the same per-index keys as the trajectories, offset by
  SAMPLE_SEED_OFFSET, and (unless `given_labels`) its label is i mod num_classes
  (`sample_inputs`), so any sample can be redrawn alone on any number of devices.
  """
  model = models.student_from_config(config)
  logsnr = jnp.asarray(diffusion.save_logsnrs(config))
  num_classes = config.data.num_classes

  def draw(params, indices, *given):
    noise, labels = _inputs(config, indices, given)
    y = labels if num_classes > 1 else None
    return noise, labels, model.apply({"params": params}, noise, logsnr, y, train=False)

  data = NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(draw, in_shardings=(NamedSharding(mesh, PartitionSpec()), data)
                 + (data,) * given_labels, out_shardings=(data, data, data))


def draw_samples(config, params, num_samples: int, batch_size: int, mesh=None, labels=None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(noise, labels, outputs) of examples 0..num_samples-1 as numpy, on every host; `labels`
  (num_samples,) replace the examples' own."""
  mesh = mesh or parallel.make_mesh()
  columns = () if labels is None else (check_labels(config, labels, num_samples),)
  return draw_logged(make_sampler(config, mesh, bool(columns)), params, num_samples,
                     batch_size, mesh, "DSNO samples", columns)


def make_teacher_sampler(config, mesh, solver: str, num_steps: int = 1,
                         tolerance: float = 1e-4, given_labels: bool = False) -> Callable:
  """jit (denoise, indices (B,)[, labels (B,)] on `data`) -> (labels, x_hat at t=0
  (B, H, W, C), nfe (B,), successful (B,)): the teacher's PF-ODE sample from the noise of
  `sample_inputs`.

  Fixed-step solvers take `num_steps` uniform-t steps (exactly num_steps evaluations);
  adaptive ones run at rtol = atol = tolerance and report the evaluations each sample made.
  """
  schedule = config.diffusion
  conditional = config.data.num_classes > 1

  def solve(denoise, indices, *given):
    noise, labels = _inputs(config, indices, given)
    x_hat, stats = ode.trajectory_and_stats(
        denoise, noise, (0.0,), solver=solver, num_steps=num_steps, grid="uniform_t",
        y=labels if conditional else None, rtol=tolerance, atol=tolerance,
        logsnr_min=schedule.logsnr_min, logsnr_max=schedule.logsnr_max)
    return labels, x_hat[:, -1], stats["nfe"] + stats["target_nfe"], stats["successful"]

  # Every device solves its own rows (shard_map): left to the SPMD partitioner, diffrax's
  # loop would be pinned to one device.
  batch, whole = PartitionSpec("data"), PartitionSpec()
  in_specs = (whole, batch) + (batch,) * given_labels
  solve = jax.shard_map(solve, mesh=mesh, in_specs=in_specs, out_specs=(batch,) * 4,
                        check_vma=False)
  data, replicated = NamedSharding(mesh, batch), NamedSharding(mesh, whole)
  return jax.jit(solve, in_shardings=(replicated, data) + (data,) * given_labels,
                 out_shardings=(data,) * 4)


def compile_teacher_sampler(config, denoise, mesh, solver: str, nfe: int = 1,
                            tolerance: float = 1e-4):
  """make_teacher_sampler(...) lowered and compiled for `denoise` and the batches of
  `teacher_samples` (config.eval.batch_size, rounded as `parallel.draw` rounds it): what
  teacher_samples takes as `sampler` when labels are the examples' own."""
  batch = parallel.round_up_batch(min(config.eval.batch_size, config.eval.num_samples),
                                  mesh.devices.size)
  whole = NamedSharding(mesh, PartitionSpec())
  denoise = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=whole), denoise)
  indices = jax.ShapeDtypeStruct((batch,), jnp.int32,
                                 sharding=NamedSharding(mesh, PartitionSpec("data")))
  jitted = make_teacher_sampler(config, mesh, solver, nfe, tolerance)
  return jitted.lower(denoise, indices).compile()


def teacher_samples(config, denoise, solver: str, mesh, *, nfe: int = 1, tolerance: float = 1e-4,
                    num_samples: Optional[int] = None, labels=None, sampler=None
                    ) -> Tuple[np.ndarray, np.ndarray, float]:
  """(uint8 samples (N, H, W, C), labels (N,), mean NFE per sample) of the teacher with
  `solver` at `nfe` (fixed-step) or `tolerance` (adaptive); N = num_samples, by default
  config.eval.num_samples; `labels` (N,) replace the examples' own; `sampler`: the program of
  `compile_teacher_sampler` for these settings (it fits the evaluation's own examples only, so
  with `labels` or another N one is compiled here instead), or None to compile one here.

  A fixed-step solver at "NFE n" makes exactly n network evaluations per sample (ode.nfe).
  """
  adaptive = solver in ode.ADAPTIVE_SOLVERS
  if not adaptive:
    made = ode.nfe(solver, nfe, "uniform_t", (0.0,), config.diffusion.logsnr_min,
                   config.diffusion.logsnr_max)
    if made != nfe:
      raise ValueError(f"teacher row {solver}:{nfe} would make {made} evaluations; expected "
                       f"{nfe} (a uniform-t grid with one step per evaluation)")
  num_samples = config.eval.num_samples if num_samples is None else num_samples
  columns = () if labels is None else (check_labels(config, labels, num_samples),)
  what = f"teacher {solver} " + (f"tol {tolerance:g}" if adaptive else f"NFE {nfe}")
  if sampler is None or columns or num_samples != config.eval.num_samples:
    sampler = make_teacher_sampler(config, mesh, solver, nfe, tolerance, bool(columns))
  labels, x_hat, count, successful = draw_logged(sampler, denoise, num_samples,
                                                 config.eval.batch_size, mesh, what, columns)
  if not successful.all():
    logging.warning("%s: %d of %d adaptive solves ran out of steps (MAX_ADAPTIVE_STEPS=%d)",
                    what, int(np.sum(~successful)), len(successful), ode.MAX_ADAPTIVE_STEPS)
  return pictures.to_uint8(x_hat), labels, float(np.mean(count))


def write_png_folder(directory: str, images_u8: np.ndarray, labels=None) -> str:
  """One PNG per image (000000.png, ...), plus EDM's dataset.json {"labels": [[name, label]]}
  when labels are given: the folder layout EDM's fid.py and dataset tool read."""
  storage.makedirs(directory)
  names = [f"{i:06d}.png" for i in range(len(images_u8))]
  for name, image in zip(names, images_u8):
    pictures.save_png(image, storage.join(directory, name))
  if labels is not None:
    storage.write_text(storage.join(directory, "dataset.json"),
                       json.dumps({"labels": [[n, int(y)] for n, y in zip(names, labels)]}))
  return directory


def grid_samples(config, params, batch_size: int, mesh) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """(uint8 one-step samples (N, H, W, C), their labels (N,) or None) for a sample grid:
  GRID_PER_CLASS of each of the first pictures.CLASS_ROWS classes, or GRID_SAMPLES when
  unconditional."""
  labels = (pictures.grid_labels(config.data.num_classes, GRID_PER_CLASS)
            if config.data.num_classes > 1 else None)
  n = GRID_SAMPLES if labels is None else len(labels)
  _, _, outputs = draw_samples(config, params, n, batch_size, mesh, labels)
  return pictures.to_uint8(outputs[:, -1]), labels


def save_grid(images_u8, labels, path: str, title: str) -> str:
  """A grid with a labelled row per class, or (labels None) a plain grid scaled towards 64 px."""
  if labels is not None:
    return pictures.plot_class_grid(images_u8, labels, path, title)
  return pictures.save_png(pictures.image_grid(images_u8), path,
                           max(1, 64 // images_u8.shape[1]))


def sample(config, workdir: str) -> str:
  """Writes WORKDIR/samples/{samples.npz, grid.png, trajectories.png} (and png/ with
  eval.save_png; grid_refined.png when --mode=refine exported a refined student); returns the
  npz path.

  samples.npz holds `arr_0` (uint8 (N, H, W, C)) and, class-conditional, `arr_1` (labels
  (N,)): the layout ADM's evaluator reads. The grids of a class-conditional student show a row
  per class.
  """
  parallel.initialize_distributed(config)
  mesh = parallel.make_mesh()
  params, exported = export.load_student(workdir)
  # the exported config builds the network; the run's config says how many samples
  exported.seed = config.seed
  noise, labels, outputs = draw_samples(exported, params, config.eval.num_samples,
                                        config.eval.batch_size, mesh)
  run = Workdir(workdir)
  grids = {"grid.png": ("DSNO",) + grid_samples(exported, params, config.eval.batch_size, mesh)}
  if storage.isdir(run.refined_export):
    refined_params, refined = export.load_student(workdir, refined=True)
    refined.seed = config.seed
    grids["grid_refined.png"] = ("DSNO refined",) + grid_samples(
        refined, refined_params, config.eval.batch_size, mesh)
  images = pictures.to_uint8(outputs[:, -1])
  conditional = exported.data.num_classes > 1
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, *((images, labels) if conditional else (images,)))
    storage.write_bytes(run.samples_npz, buffer.getvalue())
    if config.eval.save_png:
      write_png_folder(storage.join(run.samples, PNG_FOLDER), images,
                       labels if conditional else None)
    for name, (model, grid_images, grid_labels) in grids.items():
      save_grid(grid_images, grid_labels, storage.join(run.samples, name),
                f"{model}: one-step samples" + (", a row per class" if conditional else ""))
    save_times = tuple(exported.trajectory.save_times)
    pictures.plot_trajectories(noise[:8], outputs[:8], save_times,
                               storage.join(run.samples, "trajectories.png"),
                               logsnrs=diffusion.save_logsnrs(exported),
                               title="DSNO: noise, then its K outputs from one evaluation")
  logging.info("wrote %d one-step samples to %s", config.eval.num_samples, run.samples_npz)
  return run.samples_npz
