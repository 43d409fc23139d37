"""Distribution-matching refinement of the DSNO student's one-step output (DMD/DMD2, Yin et al.
2024): a fake denoiser trained online on the student's samples, two time-scale updates."""
from typing import Callable, Dict, Iterator, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsno_jax import diffusion, models, parallel, storage, trees
from dsno_jax.data import noise as noise_lib
from dsno_jax.data import trajectories
from dsno_jax.models import io as model_io
from dsno_jax.teachers import loading
from dsno_jax.training import distribution_matching as dm
from dsno_jax.training import losses
from dsno_jax.training.loop import RunResult, train
from dsno_jax.training.objectives import NUM_SAMPLES, Objective
from dsno_jax.workdir import Workdir

GENERATOR, FAKE = "generator", "fake"  # the two halves of the refine run's parameters


def is_generator_step(step, fake_steps: int):
  """Whether update `step` (0-based) also moves the generator: the last of every fake_steps."""
  return step % fake_steps == fake_steps - 1


def check_refine_settings(settings):
  """ValueError naming the first refine field that is meaningless."""
  n = settings.fake_steps
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"refine.fake_steps={n!r}; expected a positive integer (fake-denoiser "
                     "updates per generator update)")
  dm.check_settings(settings.dmd_weighting, settings.t_min, settings.t_max)
  if settings.fake_loss_weighting not in losses.TEACHER_WEIGHTINGS:
    raise ValueError(f"refine.fake_loss_weighting={settings.fake_loss_weighting!r}; expected "
                     f"one of {losses.TEACHER_WEIGHTINGS}")
  for name in ("learning_rate", "fake_learning_rate"):
    if not settings[name] > 0:
      raise ValueError(f"refine.{name}={settings[name]!r}; expected a positive learning rate")
  if settings.regression_weight < 0:
    raise ValueError(f"refine.regression_weight={settings.regression_weight!r}; expected >= 0 "
                     "(0 = no trajectory regression)")


def make_optimizer(settings):
  """(Adam per half: the generator's at learning_rate, applied only on generator steps; the fake
  denoiser's at fake_learning_rate, every step; the generator's learning rate as the schedule).

  The generator's Adam is masked, not fed zeros, on fake-only steps, so its moments and bias
  correction count generator updates only.
  """
  def adam(lr):
    inner = optax.adam(lr, b1=settings.b1, b2=settings.b2, eps=settings.eps)
    if settings.grad_clip > 0:
      return optax.chain(optax.clip_by_global_norm(settings.grad_clip), inner)
    return inner

  n = settings.fake_steps
  generator = optax.transforms.conditionally_mask(
      adam(settings.learning_rate), lambda count: is_generator_step(count, n))
  tx = optax.multi_transform({GENERATOR: generator, FAKE: adam(settings.fake_learning_rate)},
                             {GENERATOR: GENERATOR, FAKE: FAKE})
  return tx, optax.constant_schedule(settings.learning_rate)


def _image_shape(config):
  return (config.data.image_size, config.data.image_size, config.data.channels)


def refine_objective(config, logsnr: Sequence[float], student_params: Optional[Callable],
                     teacher_params, noise_seed: Optional[int] = None) -> Objective:
  """The refine run: params {"generator": DSNO student, "fake": teacher-shaped UNet}.

  Batch {"noise" | "index", "targets", "label", "step"}: trajectory rows (only the regression
  term reads them) and each row's update number (the loop's step), which selects generator
  steps. Each step draws fresh noise and labels for G(z, y), the student's t=0 output; the
  fake denoiser takes a teacher-loss step on stop_gradient(G(z, y)), and on every
  `fake_steps`-th step the generator takes one along the DMD gradient (plus the weighted
  trajectory loss). A lax.cond runs the generator's forward-backward only on its own steps.
  student_params() -> the exported student (read when a run starts); teacher_params: the
  teacher's parameters (the real denoiser, and the fake one's start).
  """
  settings = config.refine
  check_refine_settings(settings)
  student = models.student_from_config(config)
  fake_model = models.teacher_from_config(config)
  logsnr = np.asarray(logsnr, np.float32)
  distance = losses.get_distance(config.train.loss, config.train.perceptual_weights)
  schedule, mean_type, clip_x = config.diffusion, config.teacher.mean_type, config.teacher.clip_x
  num_classes = config.data.num_classes
  # built here, outside any trace, so every jitted function closes over the same arrays
  real = loading.unet_teacher_denoiser(config, teacher_params)

  def fake_denoiser(fake_params):
    return diffusion.unet_denoiser(fake_model, fake_params, mean_type, clip_x)

  def generate(generator_params, z, y, rng):
    out = student.apply({"params": generator_params}, z, logsnr, y, train=True,
                        rngs={"dropout": rng})
    return out

  def loss_fn(params, batch, rng):
    rng_z, rng_y, rng_g, rng_dmd, rng_fake, rng_drop = jax.random.split(rng, 6)
    batch_size = batch["targets"].shape[0]
    z = jax.random.normal(rng_z, (batch_size,) + _image_shape(config))
    y = (jax.random.randint(rng_y, (batch_size,), 0, num_classes) if num_classes > 1 else None)
    fake_now = fake_denoiser(jax.lax.stop_gradient(params[FAKE]))

    def generator_branch(generator_params):
      x = generate(generator_params, z, y, rng_g)[:, -1].astype(jnp.float32)
      grad, aux = dm.dmd_gradient(x, y, rng_dmd, real, fake_now,
                                  weighting=settings.dmd_weighting, t_min=settings.t_min,
                                  t_max=settings.t_max, logsnr_min=schedule.logsnr_min,
                                  logsnr_max=schedule.logsnr_max)
      loss = dm.dmd_loss(x, grad)
      regression = jnp.zeros((), jnp.float32)
      if settings.regression_weight > 0:
        if noise_seed is None:
          noise = batch["noise"]
        else:
          noise, _ = noise_lib.example_inputs(batch["index"], seed=noise_seed,
                                              image_shape=_image_shape(config),
                                              num_classes=num_classes)
        labels = batch["label"] if num_classes > 1 else None
        prediction = generate(generator_params, noise, labels, rng_g)
        regression, _ = losses.student_loss(prediction, batch["targets"], logsnr, distance,
                                            config.train.time_weighting)
      total = loss + settings.regression_weight * regression
      return total, (jax.lax.stop_gradient(x), loss, regression, aux["dmd_grad_norm"],
                     aux["fake_real_gap"])

    def fake_only_branch(generator_params):
      x = generate(jax.lax.stop_gradient(generator_params), z, y, rng_g)[:, -1]
      zero = jnp.zeros((), jnp.float32)
      return zero, (jax.lax.stop_gradient(x.astype(jnp.float32)), zero, zero, zero, zero)

    generator_step = is_generator_step(batch["step"][0], settings.fake_steps)
    generator_loss, (x, dmd, regression, grad_norm, gap) = jax.lax.cond(
        generator_step, generator_branch, fake_only_branch, params[GENERATOR])

    def fake_output(zt, logsnr_t, labels):
      return fake_model.apply({"params": params[FAKE]}, zt, logsnr_t, labels, train=True,
                              rngs={"dropout": rng_drop})

    fake_loss, fake_aux = losses.teacher_loss(
        fake_output, x, y, rng_fake, mean_type=mean_type, weighting=settings.fake_loss_weighting,
        logsnr_min=schedule.logsnr_min, logsnr_max=schedule.logsnr_max)
    # Disjoint gradients: the generator's come only from its loss (x is a stop_gradient in
    # the fake loss), the fake denoiser's only from its own (stop_gradient in the DMD term).
    return generator_loss + fake_loss, {
        "dmd_loss": dmd, "regression": regression, "dmd_grad_norm": grad_norm,
        "fake_real_gap": gap, "fake_loss": fake_loss, "fake_mse_x": fake_aux["mse_x"],
        "generator_step": generator_step.astype(jnp.float32)}

  def sample_fn(params, rng):
    noise = jax.random.normal(rng, (NUM_SAMPLES,) + _image_shape(config))
    labels = jnp.arange(NUM_SAMPLES) % num_classes if num_classes > 1 else None
    return student.apply({"params": params[GENERATOR]}, noise, logsnr, labels,
                         train=False)[:, -1]

  def fresh(rng):
    rng_s, rng_t = jax.random.split(rng)
    return {GENERATOR: models.init_student(config, rng_s), FAKE: models.init_teacher(config, rng_t)}

  def start(rng):
    del rng
    if student_params is None:
      raise ValueError("a new refine run needs the exported student")
    # the fake denoiser starts as the teacher (DMD, Sec. 3.2)
    return {GENERATOR: student_params(), FAKE: teacher_params}

  noise_key = "noise" if noise_seed is None else "index"
  return Objective("refine", settings, loss_fn, fresh, start,
                   (noise_key, "targets", "label", "step"), sample_fn, optimizer=make_optimizer)


def with_steps(batches: Iterator[Dict[str, np.ndarray]], start_step: int
               ) -> Iterator[Dict[str, np.ndarray]]:
  """Each batch with "step" (b,) int32: its update number, the same in every row."""
  for step, batch in enumerate(batches, start_step):
    rows = len(next(iter(batch.values())))
    yield dict(batch, step=np.full((rows,), step, np.int32))


def load_exported_student(config, workdir: str) -> Dict:
  """The parameters of WORKDIR/export, checked to be the student this config builds."""
  path = Workdir(workdir).student_export
  try:
    params, _, role = model_io.load_model(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"no exported student at {path}: run --mode=export first ({e})"
                            ) from None
  if role != "student":
    raise ValueError(f"{path} holds a {role}, expected the exported student")
  trees.check_shapes(params, models.param_shapes(models.init_student, config),
                     f"the student exported at {path} is not the student of this config")
  return params


def refine_student(config, workdir: str, mesh=None) -> RunResult:
  """Refines WORKDIR/export against the configured teacher, resuming from the newest refine
  checkpoint (WORKDIR/checkpoints/refine); the trajectories feed the regression term."""
  parallel.initialize_distributed(config)
  if not storage.isdir(Workdir(workdir).student_export):
    raise FileNotFoundError(f"no exported student at {Workdir(workdir).student_export}: run "
                            "--mode=train and --mode=export first")
  if config.teacher.kind != "unet" and not config.teacher.checkpoint:
    raise ValueError(f"teacher.kind={config.teacher.kind!r}: refinement initialises its fake "
                     "denoiser from a UNet teacher; set teacher.kind='unet'")
  directory = Workdir(workdir).trajectories(config)
  logsnr = trajectories.check_logsnrs(config, directory)
  metadata = trajectories.read_metadata(directory)
  trajectories.check_noise(directory, metadata)
  noise_seed = int(metadata["seed"]) if metadata["noise"] == "seeded" else None

  teacher_params, identity = loading.load_teacher_params(config, workdir)
  logging.info("refine: the teacher and the fake denoiser's start: %s", identity)
  objective = refine_objective(config, logsnr, lambda: load_exported_student(config, workdir),
                               teacher_params, noise_seed=noise_seed)

  def make_batches(start_step):
    rows = trajectories.batch_iterator(directory, global_batch_size=config.refine.batch_size,
                                       seed=config.seed, start_step=start_step,
                                       num_workers=config.data.num_workers)
    return with_steps(rows, start_step)

  return train(config, workdir, objective, make_batches, mesh=mesh)
