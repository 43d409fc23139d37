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
from dsno_jax.training import objectives
from dsno_jax.training.objectives import Objective
from dsno_jax.workdir import Workdir

# The parts of the refine run's parameters; HEAD (the GAN classifier) only with the GAN term.
GENERATOR, FAKE, HEAD = "generator", "fake", "head"
# The two kinds of update, each its own compiled program (Objective.step_kind).
GENERATOR_UPDATE, FAKE_UPDATE = "generator_update", "fake_update"


def has_gan(settings) -> bool:
  """Whether the GAN term is on: its classifier head trains (refine.gan_discriminator_weight)."""
  return settings.gan_discriminator_weight > 0


def is_generator_step(step, fake_steps: int) -> bool:
  """Whether update `step` (0-based) also moves the generator: the last of every fake_steps, so
  the generator's first update already sees a fake denoiser trained on its samples (DMD2's
  code puts it first in the cycle, where the fake denoiser still equals the teacher)."""
  return step % fake_steps == fake_steps - 1


def step_kind(step: int, fake_steps: int) -> str:
  """GENERATOR_UPDATE or FAKE_UPDATE: the kind of update `step` (0-based), chosen on the host."""
  return GENERATOR_UPDATE if is_generator_step(step, fake_steps) else FAKE_UPDATE


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
  if not settings.weight_decay >= 0:
    raise ValueError(f"refine.weight_decay={settings.weight_decay!r}; expected >= 0 (AdamW's "
                     "decoupled decay per unit learning rate; 0 = Adam)")
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
  if not 0.0 < settings.gan_t_max <= 1.0:
    raise ValueError(f"refine.gan_t_max={settings.gan_t_max!r}; expected 0 < gan_t_max <= 1 "
                     "(the GAN term's noise, t ~ U(0, gan_t_max) of the cosine schedule)")
  if settings.gan_loss not in dm.GAN_LOSSES:
    raise ValueError(f"refine.gan_loss={settings.gan_loss!r}; expected one of {dm.GAN_LOSSES}")


def _fake_part(tree) -> Dict:
  """The fake denoiser's part of a params-shaped tree: FAKE, and HEAD with the GAN term."""
  return {k: v for k, v in tree.items() if k != GENERATOR}


def make_optimizer(settings):
  """(AdamW per part: the generator's at learning_rate, the fake denoiser's (with the GAN head,
  which trains at its time-scale, as in DMD2) at fake_learning_rate; the generator's learning
  rate as the schedule).

  Its update takes the static `kind` of the update: a FAKE_UPDATE leaves the generator's
  parameters and AdamW state exactly as they were, so its moments and bias correction count
  generator updates only.
  """
  def adamw(lr):
    inner = optax.adamw(lr, b1=settings.b1, b2=settings.b2, eps=settings.eps,
                        weight_decay=settings.weight_decay)
    if settings.grad_clip > 0:
      return optax.chain(optax.clip_by_global_norm(settings.grad_clip), inner)
    return inner

  generator, fake = adamw(settings.learning_rate), adamw(settings.fake_learning_rate)

  def init(params):
    return {GENERATOR: generator.init(params[GENERATOR]), FAKE: fake.init(_fake_part(params))}

  def update(grads, state, params, *, kind):
    if kind not in (GENERATOR_UPDATE, FAKE_UPDATE):
      raise ValueError(f"kind={kind!r}; expected {GENERATOR_UPDATE!r} or {FAKE_UPDATE!r}")
    updates, fake_state = fake.update(_fake_part(grads), state[FAKE], _fake_part(params))
    if kind == GENERATOR_UPDATE:
      updates[GENERATOR], generator_state = generator.update(grads[GENERATOR], state[GENERATOR],
                                                             params[GENERATOR])
    else:
      # adding -0.0 leaves every float as it is, -0.0 included
      updates[GENERATOR] = jax.tree_util.tree_map(lambda p: jnp.full_like(p, -0.0),
                                                  params[GENERATOR])
      generator_state = state[GENERATOR]
    return updates, {GENERATOR: generator_state, FAKE: fake_state}

  return (optax.GradientTransformationExtraArgs(init, update),
          optax.constant_schedule(settings.learning_rate))


def _image_shape(config):
  return (config.data.image_size, config.data.image_size, config.data.channels)


def _fake_model(config) -> models.UNet:
  """The fake denoiser: the teacher's UNet in the teacher's compute dtype, so that at the start
  (fake = teacher) the two denoisers agree to the bit and the DMD gradient is zero."""
  return models.teacher_from_config(config).clone(dtype=models.build.teacher_dtype(config))


def _gan_head(config) -> models.GANHead:
  return models.GANHead(dtype=models.build.teacher_dtype(config))


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
      _fake_model(config), p, x, jnp.zeros((1,)), y, train=False), fake_params)
  return _gan_head(config).init(rng, jnp.zeros(features.shape, jnp.float32))["params"]


def param_shapes(config) -> Dict:
  """Shapes/dtypes of the refine run's parameters (fresh_params), without allocating them."""
  return jax.eval_shape(lambda: fresh_params(config, jax.random.PRNGKey(0)))


def _per_row(key, rows, draw):
  """draw(fold_in(key, row)) for every row (B,): the values are sharded as the rows are, and
  each depends on its row alone, whatever the number of devices."""
  return jax.vmap(lambda row: draw(jax.random.fold_in(key, row)))(rows)


def refine_objective(config, logsnr: Sequence[float], student_params: Optional[Callable],
                     teacher_params, noise_seed: Optional[int] = None) -> Objective:
  """The refine run: params {"generator": DSNO student, "fake": teacher-shaped UNet, and with the
  GAN term "head": its classifier}; the teacher's parameters are its frozen parameters; the EMA
  follows the generator alone.

  Batch {"row"}: each row's position in the global batch (with_rows), which keys the row's
  noise and label for G(z, y), the student's t=0 output; with refine.regression_weight > 0 also
  the trajectory rows {"noise" | "index", "targets", "label"}; with the GAN term real images
  {"real_image" (B, H, W, C) in [-1, 1], "real_label"}. Every network runs with dropout off
  (DMD2's networks have none).

  Two kinds of update (step_kind, chosen on the host, each compiled on its own): a FAKE_UPDATE
  takes a teacher-loss step of the fake denoiser on stop_gradient(G(z, y)); a GENERATOR_UPDATE
  (every fake_steps-th) also takes one of the generator along the DMD gradient (plus the
  weighted trajectory loss). Neither sits inside a lax.cond.

  The GAN term (DMD2, Sec. 4.3), when refine.gan_discriminator_weight > 0: a classifier head on
  the fake denoiser's middle features tells noised real images from noised generator samples
  (both at t ~ U(0, gan_t_max)); its loss, times gan_discriminator_weight, trains the head and
  the fake denoiser's backbone below the middle block, as DMD2 does; on generator updates the
  generator's adversarial loss through the fake backbone and head (no gradient into them),
  times gan_weight, joins its DMD loss.

  loss_fn(params, batch, rng, teacher, *, kind): the teacher's parameters come as the step's
  argument, so they are not compiled in as constants and are sharded like the parameters.
  student_params() -> the exported student (read when a run starts); teacher_params: the
  teacher's parameters (the real denoiser, and the fake one's start).
  """
  settings = config.refine
  check_refine_settings(settings)
  student = models.student_from_config(config)
  fake_model = _fake_model(config)
  head = _gan_head(config)
  gan = has_gan(settings)
  logsnr = np.asarray(logsnr, np.float32)
  distance = losses.get_distance(config.train.loss, config.train.perceptual_weights)
  schedule, mean_type, clip_x = config.diffusion, config.teacher.mean_type, config.teacher.clip_x
  num_classes = config.data.num_classes
  image_shape = _image_shape(config)

  def generate(generator_params, z, y):
    """The student's K outputs (B, K, H, W, C), dropout off."""
    return student.apply({"params": generator_params}, z, logsnr, y, train=False)

  def gan_logits(fake_params, head_params, x, labels, rng):
    """Logits (B,) of x (B, H, W, C) noised at t ~ U(0, gan_t_max), one t per image."""
    rng_t, rng_eps = jax.random.split(rng)
    t = jax.random.uniform(rng_t, x.shape[:1], maxval=settings.gan_t_max)
    logsnr_t = diffusion.logsnr_schedule_cosine(t, schedule.logsnr_min, schedule.logsnr_max)
    z = diffusion.diffuse(x, jax.random.normal(rng_eps, x.shape), logsnr_t)
    features = models.middle_features(fake_model, fake_params, z, logsnr_t, labels, train=False)
    return head.apply({"params": head_params}, features)

  def generator_loss(generator_params, params, batch, z, y, x, real, rng_dmd, rng_gan):
    """The generator's loss at its samples x = G(z, y) (B, H, W, C) and its metrics."""
    fake_now = diffusion.unet_denoiser(fake_model, jax.lax.stop_gradient(params[FAKE]),
                                       mean_type, clip_x)
    grad, aux = dm.dmd_gradient(x, y, rng_dmd, real, fake_now, weighting=settings.dmd_weighting,
                                t_min=settings.t_min, t_max=settings.t_max,
                                logsnr_min=schedule.logsnr_min, logsnr_max=schedule.logsnr_max)
    loss = dm.dmd_loss(x, grad)
    regression = jnp.zeros((), jnp.float32)
    if settings.regression_weight > 0:
      if noise_seed is None:
        noise = batch["noise"]
      else:
        noise, _ = noise_lib.example_inputs(batch["index"], seed=noise_seed,
                                            image_shape=image_shape, num_classes=num_classes)
      labels = batch["label"] if num_classes > 1 else None
      regression, _ = losses.student_loss(generate(generator_params, noise, labels),
                                          batch["targets"], logsnr, distance,
                                          config.train.time_weighting)
    adversarial = jnp.zeros((), jnp.float32)
    if settings.gan_weight > 0:
      logits = gan_logits(jax.lax.stop_gradient(params[FAKE]),
                          jax.lax.stop_gradient(params[HEAD]), x, y, rng_gan)
      adversarial = dm.generator_gan_loss(logits, settings.gan_loss)
    total = loss + settings.regression_weight * regression + settings.gan_weight * adversarial
    return total, {"dmd_loss": loss, "regression": regression, "gan_generator_loss": adversarial,
                   "dmd_grad_norm": aux["dmd_grad_norm"], "fake_real_gap": aux["fake_real_gap"]}

  def loss_fn(params, batch, rng, teacher, *, kind):
    real = loading.unet_teacher_denoiser(config, teacher)
    rng_z, rng_y, rng_dmd, rng_fake = jax.random.split(rng, 4)
    # the GAN's keys apart from those, so the other draws are the same with it or without
    rng_gan_generator, rng_gan_discriminator = jax.random.split(jax.random.fold_in(rng, 1))
    rows = batch["row"]
    batch_size = rows.shape[0]
    z = _per_row(rng_z, rows, lambda key: jax.random.normal(key, image_shape))
    y = (_per_row(rng_y, rows, lambda key: jax.random.randint(key, (), 0, num_classes))
         if num_classes > 1 else None)
    if kind == GENERATOR_UPDATE:
      x = generate(params[GENERATOR], z, y)[:, -1].astype(jnp.float32)
      loss, metrics = generator_loss(params[GENERATOR], params, batch, z, y, x, real, rng_dmd,
                                     rng_gan_generator)
      x = jax.lax.stop_gradient(x)
    elif kind == FAKE_UPDATE:
      # no gradient into the generator: its backward pass is not even traced
      x = jax.lax.stop_gradient(generate(params[GENERATOR], z, y)[:, -1]).astype(jnp.float32)
      loss = jnp.zeros((), jnp.float32)
      metrics = {name: loss for name in ("dmd_loss", "regression", "gan_generator_loss",
                                         "dmd_grad_norm", "fake_real_gap")}
    else:
      raise ValueError(f"kind={kind!r}; expected {GENERATOR_UPDATE!r} or {FAKE_UPDATE!r}")

    def fake_output(zt, logsnr_t, labels):
      return fake_model.apply({"params": params[FAKE]}, zt, logsnr_t, labels, train=False)

    fake_loss, fake_aux = losses.teacher_loss(
        fake_output, x, y, rng_fake, mean_type=mean_type, weighting=settings.fake_loss_weighting,
        logsnr_min=schedule.logsnr_min, logsnr_max=schedule.logsnr_max)
    metrics.update(fake_loss=fake_loss, fake_mse_x=fake_aux["mse_x"],
                   generator_step=jnp.asarray(float(kind == GENERATOR_UPDATE)))
    if not gan:
      metrics.pop("gan_generator_loss")
    else:
      # one pass over real images and the (stop-gradient) samples together
      both = jnp.concatenate([batch["real_image"].astype(jnp.float32), x])
      labels = (jnp.concatenate([batch["real_label"], y]) if num_classes > 1 else None)
      logits = gan_logits(params[FAKE], params[HEAD], both, labels, rng_gan_discriminator)
      real_logits, sample_logits = logits[:batch_size], logits[batch_size:]
      discriminator = dm.discriminator_loss(real_logits, sample_logits, settings.gan_loss)
      fake_loss = fake_loss + settings.gan_discriminator_weight * discriminator
      metrics.update(discriminator_loss=discriminator, real_logit=jnp.mean(real_logits),
                     sample_logit=jnp.mean(sample_logits))
    # Disjoint gradients: the generator's come only from its loss (x is a stop_gradient in
    # the fake and discriminator losses), the fake denoiser's and the head's only from theirs
    # (stop_gradient in the DMD and adversarial terms).
    return loss + fake_loss, metrics

  def sample_fn(ema_params, rng):
    noise, labels = objectives.sample_inputs(config, rng)
    return generate(ema_params, noise, labels)[:, -1]

  def start(rng):
    if student_params is None:
      raise ValueError("a new refine run needs the exported student")
    # the fake denoiser starts as the teacher (DMD, Sec. 3.2)
    params = {GENERATOR: student_params(), FAKE: teacher_params}
    if gan:
      params[HEAD] = _init_head(config, teacher_params, jax.random.fold_in(rng, 2))
    return params

  batch_keys = ("row",)
  if settings.regression_weight > 0:
    batch_keys += ("noise" if noise_seed is None else "index", "targets", "label")
  if gan:
    batch_keys += ("real_image", "real_label")
  return Objective("refine", settings, loss_fn, lambda rng: fresh_params(config, rng), start,
                   batch_keys, sample_fn, optimizer=make_optimizer,
                   frozen_params=lambda: teacher_params,
                   step_kind=lambda step: step_kind(step, settings.fake_steps),
                   averaged=lambda params: params[GENERATOR],
                   sample_labels=objectives.sample_labels(config))


def row_batches(global_batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
  """Endless batches {"row" (b,) int32}: this process's positions in the global batch."""
  rows = parallel.process_share(global_batch_size).astype(np.int32)
  while True:
    yield {"row": rows.copy()}


def with_rows(batches: Iterator[Dict[str, np.ndarray]], global_batch_size: int
              ) -> Iterator[Dict[str, np.ndarray]]:
  """Each batch with "row" (row_batches)."""
  for batch, rows in zip(batches, row_batches(global_batch_size)):
    yield dict(batch, **rows)


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
  checkpoint (WORKDIR/checkpoints/refine); the trajectories' metadata gives the student's output
  times, and their rows are read only for the regression term."""
  parallel.initialize_distributed(config)
  # DMD2's batches need not divide a pod's device count: every device gets an equal share
  config.refine.batch_size = parallel.round_up_batch(
      config.refine.batch_size, mesh.devices.size if mesh else jax.device_count(),
      grad_accum=config.refine.grad_accum, name="refine.batch_size")
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

  batch_size = config.refine.batch_size

  def make_batches(start_step):
    rows = row_batches(batch_size)
    if config.refine.regression_weight > 0:
      rows = with_rows(trajectories.batch_iterator(
          directory, global_batch_size=batch_size, seed=config.seed, start_step=start_step,
          num_workers=config.data.num_workers, cache_gb=config.data.cache_gb), batch_size)
    if source is not None:
      rows = with_real_images(rows, images_lib.batch_iterator(
          source, global_batch_size=batch_size, seed=config.seed, start_step=start_step,
          random_flip=config.data.random_flip, num_workers=config.data.num_workers))
    return rows

  return train(config, workdir, objective, make_batches, mesh=mesh)
