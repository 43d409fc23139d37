"""Distribution-matching refinement of the DSNO student's one-step output (DMD/DMD2, Yin et al.
2024): a fake denoiser trained online on the student's samples, two time-scale updates, an
optional GAN term on real images."""
from typing import Callable, Dict, Iterator, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsno_jax import diffusion, models, parallel, storage, trees
from dsno_jax.data import images as images_lib
from dsno_jax.data import noise as noise_lib
from dsno_jax.data import trajectories
from dsno_jax.models import io as model_io
from dsno_jax.teachers import loading
from dsno_jax.training import distribution_matching as dm
from dsno_jax.training import losses
from dsno_jax.training.loop import RunResult, train
from dsno_jax.training.objectives import NUM_SAMPLES, Objective
from dsno_jax.workdir import Workdir

# The parts of the refine run's parameters; HEAD (the GAN classifier) only with the GAN term.
GENERATOR, FAKE, HEAD = "generator", "fake", "head"


def has_gan(settings) -> bool:
  """Whether the GAN term is on: its classifier head trains (refine.gan_discriminator_weight)."""
  return settings.gan_discriminator_weight > 0


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
  for name in ("gan_weight", "gan_discriminator_weight"):
    if not settings[name] >= 0:
      raise ValueError(f"refine.{name}={settings[name]!r}; expected >= 0 (0 = off)")
  if settings.gan_weight > 0 and not has_gan(settings):
    raise ValueError(f"refine.gan_weight={settings.gan_weight!r} with "
                     "refine.gan_discriminator_weight=0: the generator would follow an untrained "
                     "classifier; set refine.gan_discriminator_weight > 0 (DMD2: 1e-2)")
  if settings.gan_loss not in dm.GAN_LOSSES:
    raise ValueError(f"refine.gan_loss={settings.gan_loss!r}; expected one of {dm.GAN_LOSSES}")


def make_optimizer(settings):
  """(Adam per part: the generator's at learning_rate, applied only on generator steps; the fake
  denoiser's, with the GAN head when there is one, at fake_learning_rate, every step; the
  generator's learning rate as the schedule).

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
  labels = {GENERATOR: GENERATOR, FAKE: FAKE}
  if has_gan(settings):
    labels[HEAD] = FAKE  # the discriminator trains at the fake denoiser's time-scale (DMD2)
  tx = optax.multi_transform({GENERATOR: generator, FAKE: adam(settings.fake_learning_rate)},
                             labels)
  return tx, optax.constant_schedule(settings.learning_rate)


def _image_shape(config):
  return (config.data.image_size, config.data.image_size, config.data.channels)


def _gan_head(config) -> models.GANHead:
  return models.GANHead(dtype=models.teacher_from_config(config).dtype)


def fresh_params(config, rng) -> Dict:
  """Fresh parameters of the refine run (traceable; their shapes are its checkpoints' shapes):
  {"generator": DSNO student, "fake": teacher-shaped UNet, "head": GAN head (with the GAN term
  only)}."""
  rng_s, rng_t, rng_h = jax.random.split(rng, 3)
  params = {GENERATOR: models.init_student(config, rng_s), FAKE: models.init_teacher(config, rng_t)}
  if has_gan(config.refine):
    params[HEAD] = _init_head(config, params[FAKE], rng_h)
  return params


def _init_head(config, fake_params, rng) -> Dict:
  x, y = models.build.dummy_inputs(config)
  features = jax.eval_shape(lambda p: models.middle_features(
      models.teacher_from_config(config), p, x, jnp.zeros((1,)), y, train=False), fake_params)
  return _gan_head(config).init(rng, jnp.zeros(features.shape, jnp.float32))["params"]


def param_shapes(config) -> Dict:
  """Shapes/dtypes of the refine run's parameters (fresh_params), without allocating them."""
  return jax.eval_shape(lambda: fresh_params(config, jax.random.PRNGKey(0)))


def refine_objective(config, logsnr: Sequence[float], student_params: Optional[Callable],
                     teacher_params, noise_seed: Optional[int] = None) -> Objective:
  """The refine run: params {"generator": DSNO student, "fake": teacher-shaped UNet, and with the
  GAN term "head": its classifier}; the teacher's parameters are its frozen parameters.

  Batch {"noise" | "index", "targets", "label", "step"}, and with the GAN term {"real_image",
  "real_label"}: trajectory rows (only the regression term reads them), each row's update number
  (the loop's step), which selects generator steps, and real images (B, H, W, C) in [-1, 1]
  with their labels. Each step draws fresh noise and labels for G(z, y), the student's t=0
  output; the fake denoiser takes a teacher-loss step on stop_gradient(G(z, y)), and on every
  `fake_steps`-th step the generator takes one along the DMD gradient (plus the weighted
  trajectory loss). A lax.cond runs the generator's forward-backward only on its own steps.

  The GAN term (DMD2, Sec. 4.3), when refine.gan_discriminator_weight > 0: a classifier head on
  the fake denoiser's middle features tells noised real images from noised generator samples
  (both at t ~ U(t_min, t_max)); its loss, times gan_discriminator_weight, trains the head and
  the fake denoiser's backbone below the middle block, as DMD2 does; on generator steps the
  generator's adversarial loss through the fake backbone and head (no gradient into them),
  times gan_weight, joins its DMD loss.

  loss_fn(params, batch, rng, teacher): the teacher's parameters come as the step's argument,
  so they are not compiled in as constants and are sharded like the parameters.
  student_params() -> the exported student (read when a run starts); teacher_params: the
  teacher's parameters (the real denoiser, and the fake one's start).
  """
  settings = config.refine
  check_refine_settings(settings)
  student = models.student_from_config(config)
  fake_model = models.teacher_from_config(config)
  head = _gan_head(config)
  gan = has_gan(settings)
  logsnr = np.asarray(logsnr, np.float32)
  distance = losses.get_distance(config.train.loss, config.train.perceptual_weights)
  schedule, mean_type, clip_x = config.diffusion, config.teacher.mean_type, config.teacher.clip_x
  num_classes = config.data.num_classes

  def fake_denoiser(fake_params):
    return diffusion.unet_denoiser(fake_model, fake_params, mean_type, clip_x)

  def generate(generator_params, z, y, rng):
    out = student.apply({"params": generator_params}, z, logsnr, y, train=True,
                        rngs={"dropout": rng})
    return out

  def gan_logits(fake_params, head_params, x, labels, rng, train: bool):
    """Logits (B,) of x (B, H, W, C) noised at t ~ U(t_min, t_max), one t per image."""
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
    t = jax.random.uniform(rng_t, x.shape[:1], minval=settings.t_min, maxval=settings.t_max)
    logsnr_t = diffusion.logsnr_schedule_cosine(t, schedule.logsnr_min, schedule.logsnr_max)
    z = diffusion.diffuse(x, jax.random.normal(rng_eps, x.shape), logsnr_t)
    features = models.middle_features(fake_model, fake_params, z, logsnr_t, labels, train=train,
                                      rngs={"dropout": rng_drop})
    return head.apply({"params": head_params}, features)

  def loss_fn(params, batch, rng, teacher):
    real = loading.unet_teacher_denoiser(config, teacher)
    rng_z, rng_y, rng_g, rng_dmd, rng_fake, rng_drop = jax.random.split(rng, 6)
    # the GAN's keys apart from those six, so the other draws are the same with it or without
    rng_gan_generator, rng_gan_discriminator = jax.random.split(jax.random.fold_in(rng, 1))
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
      adversarial = jnp.zeros((), jnp.float32)
      if settings.gan_weight > 0:
        logits = gan_logits(jax.lax.stop_gradient(params[FAKE]),
                            jax.lax.stop_gradient(params[HEAD]), x, y, rng_gan_generator,
                            train=False)
        adversarial = dm.generator_gan_loss(logits, settings.gan_loss)
      total = (loss + settings.regression_weight * regression
               + settings.gan_weight * adversarial)
      return total, (jax.lax.stop_gradient(x), loss, regression, adversarial,
                     aux["dmd_grad_norm"], aux["fake_real_gap"])

    def fake_only_branch(generator_params):
      x = generate(jax.lax.stop_gradient(generator_params), z, y, rng_g)[:, -1]
      zero = jnp.zeros((), jnp.float32)
      return zero, (jax.lax.stop_gradient(x.astype(jnp.float32)), zero, zero, zero, zero, zero)

    generator_step = is_generator_step(batch["step"][0], settings.fake_steps)
    generator_loss, (x, dmd, regression, adversarial, grad_norm, gap) = jax.lax.cond(
        generator_step, generator_branch, fake_only_branch, params[GENERATOR])

    def fake_output(zt, logsnr_t, labels):
      return fake_model.apply({"params": params[FAKE]}, zt, logsnr_t, labels, train=True,
                              rngs={"dropout": rng_drop})

    fake_loss, fake_aux = losses.teacher_loss(
        fake_output, x, y, rng_fake, mean_type=mean_type, weighting=settings.fake_loss_weighting,
        logsnr_min=schedule.logsnr_min, logsnr_max=schedule.logsnr_max)
    metrics = {"dmd_loss": dmd, "regression": regression, "dmd_grad_norm": grad_norm,
               "fake_real_gap": gap, "fake_loss": fake_loss, "fake_mse_x": fake_aux["mse_x"],
               "generator_step": generator_step.astype(jnp.float32)}
    if gan:
      # one pass over real images and the (stop-gradient) samples together
      both = jnp.concatenate([batch["real_image"].astype(jnp.float32), x])
      labels = (jnp.concatenate([batch["real_label"], y]) if num_classes > 1 else None)
      logits = gan_logits(params[FAKE], params[HEAD], both, labels, rng_gan_discriminator,
                          train=True)
      real_logits, sample_logits = logits[:batch_size], logits[batch_size:]
      discriminator = dm.discriminator_loss(real_logits, sample_logits, settings.gan_loss)
      fake_loss = fake_loss + settings.gan_discriminator_weight * discriminator
      metrics.update(gan_generator_loss=adversarial, discriminator_loss=discriminator,
                     real_logit=jnp.mean(real_logits), sample_logit=jnp.mean(sample_logits))
    # Disjoint gradients: the generator's come only from its loss (x is a stop_gradient in
    # the fake and discriminator losses), the fake denoiser's and the head's only from theirs
    # (stop_gradient in the DMD and adversarial terms).
    return generator_loss + fake_loss, metrics

  def sample_fn(params, rng):
    noise = jax.random.normal(rng, (NUM_SAMPLES,) + _image_shape(config))
    labels = jnp.arange(NUM_SAMPLES) % num_classes if num_classes > 1 else None
    return student.apply({"params": params[GENERATOR]}, noise, logsnr, labels,
                         train=False)[:, -1]

  def start(rng):
    if student_params is None:
      raise ValueError("a new refine run needs the exported student")
    # the fake denoiser starts as the teacher (DMD, Sec. 3.2)
    params = {GENERATOR: student_params(), FAKE: teacher_params}
    if gan:
      params[HEAD] = _init_head(config, teacher_params, jax.random.fold_in(rng, 2))
    return params

  noise_key = "noise" if noise_seed is None else "index"
  batch_keys = (noise_key, "targets", "label", "step")
  if gan:
    batch_keys += ("real_image", "real_label")
  return Objective("refine", settings, loss_fn, lambda rng: fresh_params(config, rng), start,
                   batch_keys, sample_fn, optimizer=make_optimizer,
                   frozen_params=lambda: teacher_params)


def with_steps(batches: Iterator[Dict[str, np.ndarray]], start_step: int
               ) -> Iterator[Dict[str, np.ndarray]]:
  """Each batch with "step" (b,) int32: its update number, the same in every row."""
  for step, batch in enumerate(batches, start_step):
    rows = len(next(iter(batch.values())))
    yield dict(batch, step=np.full((rows,), step, np.int32))


def with_real_images(batches: Iterator[Dict[str, np.ndarray]],
                     real: Iterator[Dict[str, np.ndarray]]) -> Iterator[Dict[str, np.ndarray]]:
  """Each batch with "real_image" (b, H, W, C) and "real_label" (b,) from the same step of
  `real` (images.batch_iterator's {"image", "label"})."""
  for batch, images in zip(batches, real):
    yield dict(batch, real_image=images["image"], real_label=images["label"])


def load_exported_student(config, workdir: str) -> Dict:
  """The parameters of WORKDIR/export, checked to be the student this config builds."""
  path = Workdir(workdir).student_export
  params, _ = model_io.load_student(path, "export")
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

  # the GAN term's real images: the teacher's training data, batch s fixed by (seed, s)
  source = images_lib.load_source(config, workdir) if has_gan(config.refine) else None

  def make_batches(start_step):
    rows = trajectories.batch_iterator(directory, global_batch_size=config.refine.batch_size,
                                       seed=config.seed, start_step=start_step,
                                       num_workers=config.data.num_workers,
                                       cache_gb=config.data.cache_gb)
    if source is not None:
      rows = with_real_images(rows, images_lib.batch_iterator(
          source, global_batch_size=config.refine.batch_size, seed=config.seed,
          start_step=start_step, random_flip=config.data.random_flip,
          num_workers=config.data.num_workers))
    return with_steps(rows, start_step)

  return train(config, workdir, objective, make_batches, mesh=mesh)
