"""Refinement (DMD): a zero gradient when fake equals teacher, a Gaussian reached exactly,
8 devices equal 1, a stopped run resumes as if never stopped."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import training_helpers as helpers

from dsno_jax import diffusion, models
from dsno_jax.teachers import exact
from dsno_jax.training import distribution_matching as dm
from dsno_jax.training import loop, refine

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
  batches = lambda start: refine.with_steps(helpers.pool_batches(
      pool, global_batch_size=config.refine.batch_size, seed=config.seed, start_step=start,
      sigterm_at_step=sigterm_at_step), start)
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
  batch = next(refine.with_steps(helpers.pool_batches(pool, global_batch_size=8, seed=0), 1))
  grads, aux = jax.grad(objective.loss_fn, has_aux=True)(params, batch, jax.random.PRNGKey(3))
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
                       ("fake_loss_weighting", "x")):
    with pytest.raises(ValueError, match=f"refine.{field}"):
      refine.check_refine_settings(refine_config(**{field: value}).refine)
