"""Refinement (DMD): a zero gradient when fake equals teacher, a Gaussian reached exactly, one
generator update towards the teacher in closed form, a fake-only update that leaves the
generator bit for bit, 8 devices equal 1, a stopped run resumes as if never stopped, the teacher
an argument of the step and never trained; the GAN term: its losses, a discriminator that
learns, no effect at gan_weight=0, no gradient from the generator's side into its classifier."""
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import training_helpers as helpers

from dsno_jax import diffusion, models, parallel
from dsno_jax.teachers import exact, loading
from dsno_jax.training import distribution_matching as dm
from dsno_jax.training import loop, refine, step

helpers.use_compilation_cache()
NUM_STEPS = 4


def refine_config(**settings):
  """A one-level x-prediction teacher and student; every second update moves the generator."""
  config = helpers.one_level_config()
  section = config.refine
  section.batch_size, section.num_steps, section.fake_steps = 8, NUM_STEPS, 2
  section.learning_rate, section.fake_learning_rate = 1e-3, 1e-3
  section.ema_decay, section.log_every, section.checkpoint_every = 0.9, 1, 2
  section.regression_weight = 0.5  # the trajectory term runs too
  # Adam's eps well above float noise: near-zero gradients then give near-zero updates on any
  # number of devices, instead of +-lr from the sign of their rounding
  section.eps = 1e-3
  for name, value in settings.items():
    section[name] = value
  return config


@pytest.fixture(scope="module")
def networks():
  """(teacher params, a student started from them) of refine_config, as numpy."""
  config = refine_config()
  teacher = jax.device_get(models.init_teacher(config, jax.random.PRNGKey(1)))
  # conv_out starts at zero: give the teacher (and the student copied from it) an output
  kernel = teacher["conv_out"]["kernel"]
  teacher["conv_out"]["kernel"] = 0.1 * np.random.default_rng(0).standard_normal(
      kernel.shape).astype(np.float32)
  student = models.student_params_from_teacher(
      teacher, models.init_student(config, jax.random.PRNGKey(2)), config.teacher.mean_type)
  return teacher, jax.device_get(student)


@pytest.fixture(scope="module")
def pool():
  return helpers.trajectory_pool(refine_config())


def run_refine(workdir, networks, pool, num_devices, sigterm_at_step=None, **settings):
  config = refine_config(**settings)
  teacher, student = networks
  objective = refine.refine_objective(config, diffusion.save_logsnrs(config), lambda: student,
                                      teacher)
  batches = lambda start: refine.with_rows(helpers.pool_batches(
      pool, global_batch_size=config.refine.batch_size, seed=config.seed, start_step=start,
      sigterm_at_step=sigterm_at_step), config.refine.batch_size)
  return loop.train(config, str(workdir), objective, batches, mesh=helpers.mesh_of(num_devices))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, networks, pool):
  return run_refine(tmp_path_factory.mktemp("one_device"), networks, pool, 1)


def test_dmd_gradient_is_zero_when_the_fake_denoiser_is_the_teacher(networks, pool):
  teacher, _ = networks
  config = refine_config()
  denoise = diffusion.unet_denoiser(models.teacher_from_config(config), teacher, "x", True)
  x = jnp.tanh(jnp.asarray(pool["targets"][:8, -1]))
  grad, _ = dm.dmd_gradient(x, jnp.asarray(pool["label"][:8]), jax.random.PRNGKey(0), denoise,
                            denoise)
  assert float(jnp.max(jnp.abs(grad))) < 1e-6
  assert float(dm.dmd_loss(x, grad)) < 1e-12
  # and through the refine objective: a generator step whose fake half is the teacher gives
  # the generator no distribution-matching gradient at all
  objective = refine.refine_objective(refine_config(regression_weight=0.0),
                                      diffusion.save_logsnrs(config), None, teacher)
  params = {refine.GENERATOR: networks[1], refine.FAKE: teacher}
  batch = next(refine.row_batches(8))
  grads, aux = jax.grad(objective.loss_fn, has_aux=True)(params, batch, jax.random.PRNGKey(3),
                                                         teacher, kind=refine.GENERATOR_UPDATE)
  assert float(aux["generator_step"]) == 1.0
  assert float(optax.tree.norm(grads[refine.GENERATOR])) < 1e-6
  assert float(optax.tree.norm(grads[refine.FAKE])) > 1e-4  # the fake half still learns


def test_refinement_moves_a_misscaled_gaussian_generator_to_the_target():
  """Target N(mu, v I) with its exact denoiser as the teacher; the generator x = a eps + b
  starts at the wrong scale and mean. The fake denoiser is the closed-form denoiser of the
  generator's current Gaussian N(b, a^2 I) (the limit of a perfectly trained fake network)."""
  mu = jnp.asarray([0.5, -0.3, 0.1, 0.8]).reshape(1, 2, 2, 1)
  target_var = 0.09
  teacher = exact.GaussianMixture(means=mu, variances=jnp.asarray([target_var]),
                                  weights=jnp.ones((1,)))
  params = {"a": jnp.asarray(1.0), "b": jnp.zeros((2, 2, 1))}
  tx = optax.adam(0.02)
  opt_state = tx.init(params)

  def loss(p, key):
    k_eps, k_dmd = jax.random.split(key)
    x = p["a"] * jax.random.normal(k_eps, (512, 2, 2, 1)) + p["b"]
    fake = exact.GaussianMixture(means=jax.lax.stop_gradient(p["b"])[None],
                                 variances=jax.lax.stop_gradient(p["a"] ** 2)[None],
                                 weights=jnp.ones((1,)))
    grad, _ = dm.dmd_gradient(x, None, k_dmd, teacher.denoise, fake.denoise)
    return dm.dmd_loss(x, grad)

  @jax.jit
  def step(p, opt_state, key):
    updates, opt_state = tx.update(jax.grad(loss)(p, key), opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  for i in range(400):
    params, opt_state = step(params, opt_state, jax.random.PRNGKey(i))
  np.testing.assert_allclose(params["b"], mu[0], atol=0.03)
  np.testing.assert_allclose(params["a"] ** 2, target_var, rtol=0.15)


def constant_output(params, value: float):
  """A copy of UNet or DSNO parameters whose every output is `value`: conv_out's kernel zero and
  its bias `value` (x-prediction: the exact denoiser of a point mass at that image)."""
  params = jax.tree_util.tree_map(np.array, params)
  params["conv_out"]["kernel"] = np.zeros_like(params["conv_out"]["kernel"])
  params["conv_out"]["bias"] = np.full_like(params["conv_out"]["bias"], value)
  return params


def one_update(teacher, params, kind):
  """(state after one `kind` update from `params`, the objective, a function running one more
  update) through the jitted refine step on one device, with no trajectory term."""
  config = refine_config(regression_weight=0.0)
  objective = refine.refine_objective(config, diffusion.save_logsnrs(config), None, teacher)
  mesh = helpers.mesh_of(1)
  run = step.jit_run(config, objective, mesh)
  batch = parallel.global_batch(next(refine.row_batches(config.refine.batch_size)), mesh)
  frozen = run.place_frozen(teacher)
  update = lambda state, kind: run.train_step(state, batch, frozen, kind)
  state, _ = update(run.init_state(params), kind)
  return state, objective, update


def test_one_generator_update_moves_the_generator_towards_the_teacher(networks):
  """Closed form, through the objective and the optimiser: the teacher is the exact denoiser of
  a point mass at the image mu_T (x-hat = mu_T at every z_t), the generator and the fake
  denoiser that of a point mass at mu_F. The DMD gradient is w (mu_F - mu_T) at every sample,
  so one generator update must carry the generator's mean from mu_F towards mu_T. (A real
  denoiser built from the fake's parameters gives no movement; a sign error the wrong way.)"""
  mu_teacher, mu_fake = 0.4, -0.2
  teacher = constant_output(networks[0], mu_teacher)
  params = {refine.GENERATOR: constant_output(networks[1], mu_fake),
            refine.FAKE: constant_output(networks[0], mu_fake)}
  state, objective, _ = one_update(teacher, params, refine.GENERATOR_UPDATE)
  samples = lambda p: np.asarray(objective.sample_fn(p, jax.random.PRNGKey(9)))
  np.testing.assert_allclose(samples(params[refine.GENERATOR]), mu_fake, atol=1e-6)
  moved = samples(jax.device_get(state.params[refine.GENERATOR])) - mu_fake
  # Adam's first step moves conv_out's bias by about the learning rate (1e-3) towards mu_T
  assert float(np.mean(moved)) > 5e-4, float(np.mean(moved))
  assert float(np.mean(moved > 0)) > 0.9, float(np.mean(moved > 0))


def bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_a_fake_only_update_leaves_the_generator_and_its_adam_state_bit_identical(networks):
  """After a generator update (against a fake denoiser apart from the teacher, so the
  generator's AdamW moments are not zero), a fake-only update changes the fake denoiser and
  leaves the generator's parameters and AdamW state bit for bit."""
  teacher, student = networks
  fake = jax.tree_util.tree_map(lambda x: 1.1 * x, teacher)
  state, _, update = one_update(teacher, {refine.GENERATOR: student, refine.FAKE: fake},
                                refine.GENERATOR_UPDATE)
  assert any(np.any(x != 0) for x in jax.tree_util.tree_leaves(
      jax.device_get(state.opt_state[refine.GENERATOR])) if x.dtype == np.float32)
  generator, adam = bits(state.params[refine.GENERATOR]), bits(state.opt_state[refine.GENERATOR])
  fake = bits(state.params[refine.FAKE])
  state, metrics = update(state, refine.FAKE_UPDATE)
  assert float(metrics["generator_step"]) == 0.0 and int(state.step) == 2
  assert bits(state.params[refine.GENERATOR]) == generator
  assert bits(state.opt_state[refine.GENERATOR]) == adam
  assert bits(state.params[refine.FAKE]) != fake  # while the fake denoiser trained


def test_eight_devices_equal_one_device(tmp_path, networks, pool, one_device_run):
  eight = run_refine(tmp_path, networks, pool, 8, fsdp=True)
  one = one_device_run
  assert int(eight.state.step) == int(one.state.step) == NUM_STEPS
  for name in ("params", "ema_params", "opt_state"):
    a = jax.tree_util.tree_leaves(jax.device_get(getattr(one.state, name)))
    b = jax.tree_util.tree_leaves(jax.device_get(getattr(eight.state, name)))
    for x, y in zip(a, b):
      np.testing.assert_allclose(x, y, atol=2e-5, rtol=0, err_msg=name)
  # both halves moved, the generator on its steps only
  _, student = networks
  moved = max(float(np.abs(x - y).max()) for x, y in zip(
      jax.tree_util.tree_leaves(student),
      jax.tree_util.tree_leaves(jax.device_get(one.state.params[refine.GENERATOR]))))
  assert moved > 5e-4
  steps = [h["generator_step"] for h in one.history]
  assert steps == [0.0, 1.0, 0.0, 1.0], steps
  assert all(h["dmd_loss"] == 0.0 for h, g in zip(one.history, steps) if not g)
  assert all(h["regression"] > 0.0 for h, g in zip(one.history, steps) if g)


def test_a_stopped_refine_run_resumes_and_ends_equal_to_an_uninterrupted_one(
    tmp_path, networks, pool, one_device_run):
  stopped = run_refine(tmp_path, networks, pool, 1, sigterm_at_step=1)
  step = int(stopped.state.step)
  assert stopped.preempted and 1 <= step < NUM_STEPS, step
  directory = tmp_path / "checkpoints" / "refine"
  assert max(int(p) for p in os.listdir(directory) if p.isdigit()) == step
  resumed = run_refine(tmp_path, networks, pool, 1)
  assert not resumed.preempted and resumed.history[0]["step"] == step + 1
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(one_device_run.state)),
                  jax.tree_util.tree_leaves(jax.device_get(resumed.state))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_bad_refine_settings_name_the_field():
  for field, value in (("fake_steps", 0), ("dmd_weighting", "kl"), ("t_min", 0.99),
                       ("fake_loss_weighting", "x"), ("gan_loss", "wgan"), ("gan_weight", -1.0),
                       ("gan_weight", 0.1), ("weight_decay", -0.1), ("gan_t_max", 0.0)):
    with pytest.raises(ValueError, match=f"refine.{field}"):
      refine.check_refine_settings(refine_config(**{field: value}).refine)


def _constant_bytes(stablehlo: str) -> int:
  """Bytes of the data a lowered program embeds: its non-splat dense constants (a splat is one
  value, whatever its shape)."""
  total = 0
  for shape, dtype in re.findall(
      r"stablehlo\.constant dense<[\[\"][^>]*> : tensor<((?:\d+x)*)(\w+)>", stablehlo):
    bits = int(re.sub(r"\D", "", dtype) or 8)
    total += math.prod(int(d) for d in shape.split("x") if d) * bits // 8
  return total


def test_gan_losses_equal_hand_computed_values():
  real, fake = jnp.asarray([2.0, 0.5]), jnp.asarray([-1.0, 0.3])
  # hinge: mean(relu(1 - [2, .5])) + mean(relu(1 + [-1, .3])) = 0.25 + 0.65
  np.testing.assert_allclose(dm.discriminator_loss(real, fake, "hinge"), 0.9, rtol=1e-6)
  np.testing.assert_allclose(dm.generator_gan_loss(fake, "hinge"), 0.35, rtol=1e-6)
  # softplus(-2) = 0.126928, softplus(-.5) = 0.474077, softplus(-1) = 0.313262,
  # softplus(.3) = 0.854355, softplus(1) = 1.313262, softplus(-.3) = 0.554355
  np.testing.assert_allclose(dm.discriminator_loss(real, fake, "non_saturating"),
                             (0.126928 + 0.474077) / 2 + (0.313262 + 0.854355) / 2, rtol=1e-5)
  np.testing.assert_allclose(dm.generator_gan_loss(fake, "non_saturating"),
                             (1.313262 + 0.554355) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match="refine.gan_loss='wgan'"):
    dm.discriminator_loss(real, fake, "wgan")


def gan_config(**settings):
  """The GAN term on; the generator never steps (fake_steps beyond the run): a constant
  generator against real images, noised at t <= 0.5 (where they differ visibly); no
  trajectory term, whose cost only slows the test. Adam's usual eps: the head's first gradients
  are small; the digits' Adam (b1 = 0: they grow quickly at first, and momentum would lag)."""
  return refine_config(**dict(dict(gan_discriminator_weight=1.0, gan_loss="hinge",
                                   fake_steps=1000, fake_learning_rate=3e-3, eps=1e-8, b1=0.0,
                                   weight_decay=0.0, grad_clip=1.0,
                                   gan_t_max=0.5, regression_weight=0.0), **settings))


def gan_batches(pool, start=0):
  """Trajectory rows with real images: a bright, smooth stroke pattern, easy to tell from the
  generator's faint samples."""
  xs = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
  real = np.clip(1.5 * np.cos(3.0 * xs)[:, None] * np.cos(2.0 * xs)[None, :], -1, 1)[..., None]
  for batch in refine.with_rows(helpers.pool_batches(pool, global_batch_size=8, seed=0,
                                                     start_step=start), 8):
    rows = len(batch["label"])
    yield dict(batch, real_image=np.broadcast_to(real, (rows,) + real.shape).copy(),
               real_label=batch["label"])


@pytest.fixture(scope="module")
def gan_run(networks, pool):
  """(state, discriminator losses, the jitted run, the teacher on the mesh, a batch, the teacher
  as given) after 10 updates of the fake denoiser and head. The teacher is given as device
  arrays, as a loaded teacher may be, which the fake denoiser starts from: buffers a donated
  state could take with it."""
  teacher, student = networks
  config = gan_config()
  teacher = jax.device_put(teacher)
  objective = refine.refine_objective(config, diffusion.save_logsnrs(config), lambda: student,
                                      teacher)
  mesh = helpers.mesh_of(1)
  run = step.jit_run(config, objective, mesh)
  state = run.init_state(objective.start_params(jax.random.PRNGKey(0)))
  frozen = run.place_frozen(objective.frozen_params())
  history = []
  for _, batch in zip(range(10), gan_batches(pool)):
    state, metrics = run.train_step(state, parallel.global_batch(batch, mesh), frozen,
                                    refine.FAKE_UPDATE)
    history.append(float(metrics["discriminator_loss"]))
  return state, history, run, frozen, parallel.global_batch(batch, mesh), teacher


def test_the_discriminator_learns_real_images_from_a_constant_generator(gan_run):
  history = gan_run[1]
  assert history[0] == pytest.approx(2.0, abs=1e-6)  # a new head: every logit 0
  # each update draws new noise levels, so the loss may tick up a little on the way down
  assert all(b < a + 1e-2 for a, b in zip(history, history[1:])), str(history)
  assert history[-1] < 0.8 * history[0], str(history)


def test_the_teacher_is_an_argument_of_the_step_and_never_trained(networks, gan_run):
  """The teacher's parameters reach the jitted step (here with the GAN term) as an argument,
  not compiled in, outside the train state; after steps that donate the state (whose fake
  denoiser started from the very arrays given as the teacher) both the arrays given and those
  the step reads still hold the teacher's values."""
  teacher, _ = networks
  state, _, run, frozen, batch, given = gan_run
  assert set(state.params) == {refine.GENERATOR, refine.FAKE, refine.HEAD}  # no teacher
  teacher_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(teacher))
  embedded = _constant_bytes(run.train_step.lower(state, batch, frozen,
                                                         refine.FAKE_UPDATE).as_text())
  assert embedded < 0.01 * teacher_bytes, (embedded, teacher_bytes)
  # the control: the same count sees a teacher closed over as constants
  config = gan_config()
  closed = jax.jit(lambda x: loading.unet_teacher_denoiser(config, teacher)(
      x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
  assert _constant_bytes(closed.lower(jnp.zeros((1, 8, 8, 1))).as_text()) > 0.5 * teacher_bytes
  for read_by_the_step in (frozen, given):
    for before, after in zip(jax.tree_util.tree_leaves(teacher),
                             jax.tree_util.tree_leaves(jax.device_get(read_by_the_step))):
      np.testing.assert_array_equal(before, after)
  moved = optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, teacher,
                                                 jax.device_get(state.params[refine.FAKE])))
  assert float(moved) > 0  # while the fake denoiser, started equal to it, trained


def test_gan_weight_zero_leaves_the_generator_update_as_without_gan(networks, pool, gan_run):
  """On a generator update, with a trained head: the generator's gradient at gan_weight=0
  equals the run without the GAN term; at gan_weight > 0 it does not, while the fake denoiser's
  and the head's gradients stay those of their own losses (the generator's adversarial loss
  sends nothing into them)."""
  teacher, _ = networks
  params = jax.device_get(gan_run[0].params)
  batch = next(gan_batches(pool, start=1))
  logsnr = diffusion.save_logsnrs(refine_config())

  def grads(config, params):
    objective = refine.refine_objective(config, logsnr, None, teacher)
    keys = objective.batch_keys
    loss = lambda p: objective.loss_fn(p, {k: batch[k] for k in keys}, jax.random.PRNGKey(5),
                                       teacher, kind=refine.GENERATOR_UPDATE)
    grads, aux = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert float(aux["generator_step"]) == 1.0
    return grads

  without = grads(gan_config(fake_steps=2, gan_discriminator_weight=0.0),
                  {k: params[k] for k in (refine.GENERATOR, refine.FAKE)})
  at_zero = grads(gan_config(fake_steps=2), params)
  on = grads(gan_config(fake_steps=2, gan_weight=1.0), params)
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(without[refine.GENERATOR]), leaves(at_zero[refine.GENERATOR])):
    np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-6)
  difference = optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, on[refine.GENERATOR],
                                                      without[refine.GENERATOR]))
  assert float(difference) > 1e-3 * float(optax.tree.norm(without[refine.GENERATOR]))
  for part in (refine.FAKE, refine.HEAD):
    assert float(optax.tree.norm(at_zero[part])) > 0, part  # their own losses do train them
    for a, b in zip(leaves(at_zero[part]), leaves(on[part])):
      np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-6, err_msg=part)
