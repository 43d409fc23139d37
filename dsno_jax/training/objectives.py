"""What a run trains: the teacher's diffusion objective and DSNO's trajectory objective."""
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import diffusion, models, ode, pictures
from dsno_jax.data import noise as noise_lib
from dsno_jax.training import losses

NUM_SAMPLES = 64  # images in the sample grid of an unconditional model
PER_CLASS = 8  # images per class (row) in the sample grid of a class-conditional model


class Objective(NamedTuple):
  """What one run trains: its settings section, loss and parameter initialisation.

  loss_fn(params, batch, rng) -> (loss, {name: scalar}); pure, on the global batch.
  fresh_params(rng) -> params; traceable (its shapes define checkpoint compatibility).
  start_params(rng) -> params of a new run (may read a teacher from disk).
  sample_fn(params, rng) -> images (N, H, W, C) in [-1, 1], or None for no grids.
  sample_labels: the labels (N,) of sample_fn's images, drawn as a row per class; None: a
  plain grid.
  optimizer(settings) -> (optax transformation, learning-rate schedule); None: the paper's Adam
  (state.make_optimizer).
  frozen_params() -> arrays the loss reads but never trains (the refine run's teacher), or None;
  loss_fn then takes them as a fourth argument. The jitted step receives them as an argument,
  sharded like the parameters and outside the train state: they are not compiled in as
  constants, not averaged and not checkpointed (a run reads them again when it starts).
  step_kind(n) -> the kind of update n (0-based), chosen on the host, or None (one kind): each
  kind is its own compiled program, so no branch of the update sits inside a `lax.cond` (where
  XLA:CPU runs a backward pass about 10x slower); loss_fn then takes `kind=` and the optimiser's
  update `kind=` as static keyword arguments.
  averaged(params) -> the part of the parameters the EMA follows, or None (all of them).
  """
  role: str  # "teacher" | "student" | "refine"
  settings: object  # config.teacher.train, config.train or config.refine
  loss_fn: Callable
  fresh_params: Callable
  start_params: Callable
  batch_keys: Tuple[str, ...]
  sample_fn: Optional[Callable] = None
  optimizer: Optional[Callable] = None
  frozen_params: Optional[Callable] = None
  sample_labels: Optional[np.ndarray] = None
  step_kind: Optional[Callable] = None
  averaged: Optional[Callable] = None


def _labels(batch, config):
  return batch["label"] if config.data.num_classes > 1 else None


def _image_shape(config):
  return (config.data.image_size, config.data.image_size, config.data.channels)


def sample_labels(config) -> Optional[np.ndarray]:
  """Labels of a run's sample grid: PER_CLASS of each of the first pictures.CLASS_ROWS
  classes, so the grid shows a row per class; None when unconditional."""
  if config.data.num_classes < 2:
    return None
  return pictures.grid_labels(config.data.num_classes, PER_CLASS)


def sample_inputs(config, rng) -> Tuple[jax.Array, Optional[jax.Array]]:
  """(noise (N, H, W, C), labels (N,) or None) of a run's sample grid (`sample_labels`)."""
  labels = sample_labels(config)
  n = NUM_SAMPLES if labels is None else len(labels)
  noise = jax.random.normal(rng, (n,) + _image_shape(config))
  return noise, None if labels is None else jnp.asarray(labels)


def teacher_objective(config) -> Objective:
  """Diffusion training of the teacher UNet on images (batch {"image", "label"})."""
  model = models.teacher_from_config(config)
  settings = config.teacher.train
  losses.teacher_weight(0.0, settings.loss_weighting)  # a bad name fails before compiling
  schedule = config.diffusion

  def loss_fn(params, batch, rng):
    rng_noise, rng_dropout = jax.random.split(rng)

    def output_fn(z, logsnr, y):
      return model.apply({"params": params}, z, logsnr, y, train=True,
                         rngs={"dropout": rng_dropout})

    return losses.teacher_loss(output_fn, batch["image"], _labels(batch, config), rng_noise,
                               mean_type=config.teacher.mean_type,
                               weighting=settings.loss_weighting,
                               logsnr_min=schedule.logsnr_min, logsnr_max=schedule.logsnr_max)

  def sample_fn(params, rng):
    z1, y = sample_inputs(config, rng)
    # the grid shows the teacher as trajectories will use it: in teacher.dtype
    denoise = diffusion.unet_denoiser(model.clone(dtype=models.build.teacher_dtype(config)),
                                      params, config.teacher.mean_type, config.teacher.clip_x)
    solve = config.trajectory
    x = ode.trajectory(denoise, z1, (0.0,), solver=solve.solver, num_steps=solve.num_steps,
                       grid=solve.grid, y=y, rtol=solve.rtol,
                       atol=solve.atol, logsnr_min=schedule.logsnr_min,
                       logsnr_max=schedule.logsnr_max)
    return x[:, -1]

  fresh = lambda rng: models.init_teacher(config, rng)
  return Objective("teacher", settings, loss_fn, fresh, fresh, ("image", "label"), sample_fn,
                   sample_labels=sample_labels(config))


def student_objective(config, logsnr: Sequence[float],
                      teacher_params: Optional[Callable] = None,
                      noise_seed: Optional[int] = None) -> Objective:
  """DSNO training on trajectories (batch {"noise", "targets", "label"}); DSNO paper, Sec. 4.

  logsnr (K,): the log-SNRs of the dataset's save times (the student's output times).
  teacher_params() -> teacher parameters to copy in when config.train.init_from_teacher.
  noise_seed: the dataset's seed when its noise is regenerated from (seed, index) instead of
  stored; the batch then carries "index" instead of "noise", and the noise is drawn on device.
  """
  model = models.student_from_config(config)
  settings = config.train
  distance = losses.get_distance(settings.loss, settings.perceptual_weights)
  diffusion.time_weights(jnp.zeros(()), settings.time_weighting)  # fails early on a bad name
  logsnr = np.asarray(logsnr, np.float32)
  if logsnr.shape != (len(config.trajectory.save_times),):
    raise ValueError(f"{logsnr.shape[0] if logsnr.ndim == 1 else logsnr.shape} log-SNRs for a "
                     f"student with K={len(config.trajectory.save_times)} output times")

  def loss_fn(params, batch, rng):
    if noise_seed is None:
      noise = batch["noise"]
    else:
      noise, _ = noise_lib.example_inputs(batch["index"], seed=noise_seed,
                                          image_shape=_image_shape(config),
                                          num_classes=config.data.num_classes)
    prediction = model.apply({"params": params}, noise, logsnr, _labels(batch, config),
                             train=True, rngs={"dropout": rng})
    loss, per_time = losses.student_loss(prediction, batch["targets"], logsnr, distance,
                                         settings.time_weighting)
    return loss, {f"d_{k}": per_time[k] for k in range(per_time.shape[0])}

  def sample_fn(params, rng):
    noise, y = sample_inputs(config, rng)
    out = model.apply({"params": params}, noise, logsnr, y, train=False)
    return out[:, -1]  # the last output time (t = 0): the one-step sample

  fresh = lambda rng: models.init_student(config, rng)

  def start(rng):
    params = fresh(rng)
    if not settings.init_from_teacher:
      return params
    if teacher_params is None:
      raise ValueError("train.init_from_teacher=True but no teacher parameters were given")
    return models.student_params_from_teacher(teacher_params(), params, config.teacher.mean_type,
                                              config.data.channels)

  noise_key = "noise" if noise_seed is None else "index"
  return Objective("student", settings, loss_fn, fresh, start, (noise_key, "targets", "label"),
                   sample_fn, sample_labels=sample_labels(config))
