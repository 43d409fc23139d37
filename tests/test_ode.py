"""PF-ODE solvers in diffrax, fixed-step grids and trajectory() on exact teachers."""
import functools
import re

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsno_jax import diffusion, ode, teachers

SAVE_TIMES = (0.5625, 0.25, 0.0625, 0.0)
BATCH = 8


@pytest.fixture(scope="module")
def mixture():
  return teachers.digits_mixture(8)


@pytest.fixture(scope="module")
def z1():
  return jax.random.normal(jax.random.PRNGKey(0), (BATCH, 8, 8, 1))


@pytest.fixture(scope="module")
def solve(mixture):
  """solve(solver, num_steps) -> the jitted trajectory at SAVE_TIMES (compiled once each)."""
  @functools.lru_cache(maxsize=None)
  def make(solver, num_steps):
    return jax.jit(lambda z: ode.trajectory(mixture.denoise, z, SAVE_TIMES, solver=solver,
                                            num_steps=num_steps))
  return lambda solver, num_steps: make(solver, num_steps)


@pytest.fixture(scope="module")
def reference(mixture, z1):
  """Float64 Dopri8 at tolerance 1e-10: (B, K, H, W, C)."""
  with jax.enable_x64(True):
    z64 = jnp.asarray(np.asarray(z1), jnp.float64)
    return np.asarray(jax.jit(lambda z: ode.trajectory(
        mixture.denoise, z, SAVE_TIMES, solver="dopri8", rtol=1e-10, atol=1e-10))(z64))


def _rmse(a, b):
  return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_ddim_solver_equals_python_loop_and_saves_x_hat_at_solution(mixture, z1):
  num_steps = 16
  with jax.enable_x64(True):
    z = jnp.asarray(np.asarray(z1), jnp.float64)
    got = jax.jit(lambda z: ode.trajectory(mixture.denoise, z, SAVE_TIMES, solver="ddim",
                                           num_steps=num_steps))(z)
    denoise = jax.jit(mixture.denoise)
    lam = ode.logsnr_grid(num_steps, "uniform_t", SAVE_TIMES)
    save_lam = diffusion.logsnr_schedule_cosine(np.array(SAVE_TIMES))
    targets = {}
    z = np.asarray(z)
    for lam_t, lam_u in zip(lam[:-1], lam[1:]):
      alpha_t, sigma_t = diffusion.alpha_sigma(lam_t)
      alpha_u, sigma_u = diffusion.alpha_sigma(lam_u)
      x = np.asarray(denoise(z, jnp.full((BATCH,), lam_t)))
      eps = (z - alpha_t * x) / sigma_t
      z = np.asarray(alpha_u * x + sigma_u * eps)
      for k, value in enumerate(save_lam):
        if np.isclose(lam_u, value, rtol=0, atol=1e-9):
          # x-hat at t=0 is read off the solution (no evaluation), elsewhere the denoiser's
          targets[k] = (z / alpha_u if SAVE_TIMES[k] == 0.0
                        else np.asarray(denoise(z, jnp.full((BATCH,), lam_u))))
  assert sorted(targets) == list(range(len(SAVE_TIMES)))  # the grid holds every save time
  want = np.stack([targets[k] for k in range(len(SAVE_TIMES))], axis=1)
  assert got.shape == (BATCH, len(SAVE_TIMES), 8, 8, 1)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_adaptive_solve_follows_the_closed_form_gaussian_flow(mixture, z1):
  # With labels, each example's teacher is the single Gaussian of its class.
  y = jnp.arange(BATCH) % 10
  x_hat, stats = jax.jit(lambda z: ode.trajectory_and_stats(
      mixture.denoise, z, SAVE_TIMES, solver="tsit5", y=y, rtol=1e-6, atol=1e-6))(z1)
  save_lam = jnp.asarray(diffusion.logsnr_schedule_cosine(np.array(SAVE_TIMES)))
  for k, lam in enumerate(np.asarray(save_lam)):
    lam = jnp.full((BATCH,), 20.0 if SAVE_TIMES[k] == 0 else lam)
    z_exact = teachers.gaussian_flow(z1, mixture.means[y], mixture.variances[y][:, None, None, None],
                                     -20.0, lam)
    want = (z_exact / diffusion.alpha_sigma(20.0)[0] if SAVE_TIMES[k] == 0
            else mixture.denoise(z_exact, lam, y))
    np.testing.assert_allclose(x_hat[:, k], want, atol=1e-4)
  assert stats["nfe"].shape == (BATCH,) and int(stats["nfe"].min()) > 20
  assert stats["target_nfe"] == len(SAVE_TIMES) - 1 and bool(stats["successful"].all())


def _order(solve, reference, solver, steps, z1):
  errors = [_rmse(solve(solver, n)(z1)[:, -1], reference[:, -1]) for n in steps]
  return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


def test_convergence_orders_on_the_digits_mixture(solve, reference, z1):
  steps = (64, 128, 256)
  ddim_order, ddim_errors = _order(solve, reference, "ddim", steps, z1)
  phi2m_order, phi2m_errors = _order(solve, reference, "phi2m", steps, z1)
  print(f"orders: ddim {ddim_order:.2f} {ddim_errors}, phi2m {phi2m_order:.2f} {phi2m_errors}")
  assert 0.8 < ddim_order < 1.2, (ddim_order, ddim_errors)
  assert 1.7 < phi2m_order < 2.4, (phi2m_order, phi2m_errors)
  # accuracy in the range measured for this teacher (benchmarks/README.md, solvers.py: DDIM
  # 64 steps 1.2e-2)
  assert 4e-3 < ddim_errors[0] < 3e-2, ddim_errors
  # the 3-step history pays: phi3m beats phi2m at equal NFE
  phi3m_error = _rmse(solve("phi3m", 64)(z1)[:, -1], reference[:, -1])
  assert phi3m_error < 0.7 * phi2m_errors[0], (phi3m_error, phi2m_errors[0])
  # DPM-Solver++(2M) as published: between DDIM and phi2m at 64 steps (benchmarks/README.md)
  dpmpp2m_error = _rmse(solve("dpmpp2m", 64)(z1)[:, -1], reference[:, -1])
  assert phi2m_errors[0] < dpmpp2m_error < 0.5 * ddim_errors[0], (dpmpp2m_error, ddim_errors)


# --- DPM-Solver++ against an independent float64 numpy implementation ------------------------


def _numpy_denoiser(mixture):
  """E[x | z] of the mixture in float64 numpy, written out from the Gaussian posterior."""
  means = np.asarray(mixture.means, np.float64).reshape(mixture.num_components, -1)
  variances = np.asarray(mixture.variances, np.float64)
  log_weights = np.log(np.asarray(mixture.weights, np.float64) / np.sum(mixture.weights))

  def denoise(z, lam):
    flat = z.reshape(z.shape[0], -1)
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
    total = alpha ** 2 * variances + sigma ** 2  # (M,)
    residual = flat[:, None] - alpha * means[None]  # (B, M, D)
    log_p = log_weights - 0.5 * (np.sum(residual ** 2, -1) / total
                                 + flat.shape[1] * np.log(total))
    resp = np.exp(log_p - log_p.max(1, keepdims=True))
    resp /= resp.sum(1, keepdims=True)
    x_given_k = means[None] + (alpha * variances / total)[None, :, None] * residual
    return np.einsum("bm,bmd->bd", resp, x_given_k).reshape(z.shape)

  return denoise


def _numpy_dpmpp(denoise, z, lams, order):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) / (3M) (the authors' third-order multistep
  update), in lambda = lam/2, with lower orders for the first steps and a first-order last step;
  returns z at lams[-1]."""
  lam_half = np.asarray(lams, np.float64) / 2
  history = []  # (lambda, x-hat) of the previous step starts, latest last
  for i in range(len(lams) - 1):
    x = denoise(z, lams[i])
    (l_s, l_t) = lam_half[i], lam_half[i + 1]
    h = l_t - l_s
    alpha_t, sigma_s, sigma_t = [np.sqrt(1 / (1 + np.exp(-2 * l_t))),
                                 np.sqrt(1 / (1 + np.exp(2 * l_s))),
                                 np.sqrt(1 / (1 + np.exp(2 * l_t)))]
    k = 1 if i == len(lams) - 2 else min(order, i + 1)
    if k == 1:
      d = x
    elif k == 2:
      r = (l_s - history[-1][0]) / h
      d = (1 + 1 / (2 * r)) * x - 1 / (2 * r) * history[-1][1]
    if k <= 2:
      z = sigma_t / sigma_s * z - alpha_t * np.expm1(-h) * d
    else:
      (l_2, x_2), (l_1, x_1) = history[-2:]
      r0, r1 = (l_s - l_1) / h, (l_1 - l_2) / h
      d1_0, d1_1 = (x - x_1) / r0, (x_1 - x_2) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      phi_1 = np.expm1(-h)
      phi_2 = phi_1 / h + 1
      phi_3 = phi_2 / h - 0.5
      z = sigma_t / sigma_s * z - alpha_t * phi_1 * x + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2
    history.append((l_s, x))
  return z


@pytest.mark.parametrize("solver,order", [("dpmpp2m", 2), ("dpmpp3m", 3)])
def test_dpmpp_equals_the_published_update_in_float64_numpy(mixture, z1, solver, order):
  for grid, num_steps in (("uniform_t", 12), ("edm", 7)):
    lams = ode.logsnr_grid(num_steps, grid)
    want = _numpy_dpmpp(_numpy_denoiser(mixture), np.asarray(z1, np.float64), lams, order)
    want = want / np.sqrt(1 / (1 + np.exp(-20.0)))  # x-hat at t=0 is z/alpha
    with jax.enable_x64(True):
      got = jax.jit(lambda z: ode.trajectory(mixture.denoise, z, (0.0,), solver=solver,
                                             num_steps=num_steps, grid=grid))(
                                                 jnp.asarray(np.asarray(z1), jnp.float64))
    assert np.abs(want).max() > 0.5  # a real sample
    np.testing.assert_allclose(np.asarray(got)[:, -1], want, rtol=0, atol=1e-6)


def test_dpmpp_local_error_falls_as_h_cubed(mixture):
  """One step from the exact solution and exact history (each class's Gaussian flows in closed
  form): the local error of a second-order update falls as h^3. So does the published 3M's:
  its second-difference term carries half the Taylor coefficient (see ode.DPMSolverPP), so it
  is second order too, with a smaller constant."""
  y = jnp.arange(4) % 10
  mean, var = mixture.means[y], mixture.variances[y][:, None, None, None]
  with jax.enable_x64(True):
    z1 = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1), jnp.float64)
    exact = lambda lam: teachers.gaussian_flow(z1, mean, var, -20.0, lam)
    term = ode.pf_ode_term(mixture.denoise, y)
    first_errors = {}
    for solver in ("dpmpp2m", "dpmpp3m"):
      errors = []
      for dl in (0.4, 0.2, 0.1):
        lam0 = 0.0
        state = (mixture.denoise(exact(lam0 - dl), lam0 - dl, y),
                 mixture.denoise(exact(lam0 - 2 * dl), lam0 - 2 * dl, y),
                 jnp.float64(lam0 - dl), jnp.float64(lam0 - 2 * dl), jnp.int32(2))
        z_next = ode.make_solver(solver).step(term, lam0, lam0 + dl, exact(lam0), None, state,
                                              False)[0]
        errors.append(_rmse(z_next, exact(lam0 + dl)))
      slopes = -np.diff(np.log2(errors))
      assert np.all(np.abs(slopes - 3) < 0.3), (solver, errors, slopes)
      first_errors[solver] = errors[0]
    assert first_errors["dpmpp3m"] < 0.5 * first_errors["dpmpp2m"], first_errors


# --- honest NFE: every network evaluation counted -------------------------------------------


def _counting(denoise):
  """(denoise that records, through a host callback, how many examples each call evaluates;
  the list of those counts)."""
  count = []

  def counted(z, logsnr, y=None):
    jax.debug.callback(lambda n: count.append(int(n)), z.shape[0])  # append: atomic
    return denoise(z, logsnr, y)

  return counted, count


@pytest.mark.parametrize("solver", ode.FIXED_STEP_SOLVERS)
def test_fixed_step_nfe_is_the_evaluations_made(mixture, z1, solver):
  denoise, count = _counting(mixture.denoise)
  for save_times, num_steps in (((0.0,), 5), (SAVE_TIMES, 9)):
    count.clear()
    x_hat, stats = jax.jit(lambda z: ode.trajectory_and_stats(
        denoise, z, save_times, solver=solver, num_steps=num_steps))(z1[:2])
    jax.effects_barrier()  # every callback has run
    made = sum(count) / 2  # per example
    nfe = ode.nfe(solver, num_steps, "uniform_t", save_times)
    assert made == nfe + ode.target_nfe(solver, save_times)
    assert np.all(np.asarray(stats["nfe"]) == nfe)
    assert stats["target_nfe"] == ode.target_nfe(solver, save_times) == 0
  # one evaluation per step, the interior save times included; a sample at "NFE 5" makes 5
  assert made == 9 == ode.nfe(solver, 9, "uniform_t", SAVE_TIMES) and ode.nfe(solver, 5) == 5


def test_a_trajectory_of_each_config_makes_one_evaluation_per_step(mixture, z1):
  """ImageNet-64 (DDIM, 16 steps) and digits (phi2m, 32 steps) at the save times of
  configs/base.py: the x-hats at the interior save times come from the steps that start there
  and the one at t=0 is z/alpha, so a trajectory costs its step count (it cost 16 + 3 and
  32 + 3 when each interior save time had an evaluation of its own)."""
  from configs import digits, imagenet64
  for get_config, want in ((imagenet64.get_config, 16), (digits.get_config, 32)):
    trajectory = get_config().trajectory
    save_times = tuple(trajectory.save_times)
    assert save_times == SAVE_TIMES
    denoise, count = _counting(mixture.denoise)
    x_hat, stats = jax.jit(lambda z: ode.trajectory_and_stats(
        denoise, z, save_times, solver=trajectory.solver, num_steps=trajectory.num_steps,
        grid=trajectory.grid))(z1[:2])
    jax.effects_barrier()  # every callback has run
    assert sum(count) / 2 == want == ode.nfe(trajectory.solver, trajectory.num_steps,
                                             trajectory.grid, save_times)
    assert ode.target_nfe(trajectory.solver, save_times) == stats["target_nfe"] == 0
    assert np.all(np.asarray(stats["nfe"]) == want) and bool(stats["successful"].all())
    assert np.isfinite(np.asarray(x_hat)).all()


def _saved_z_then_denoise(denoise, z1, save_times, solver, num_steps, y):
  """The targets as computed before the step-start x-hats were kept: diffrax's fixed-step solve
  saving z at the save times, then a plain denoiser call at each saved z (z/alpha at t=0)."""
  save_lam = ode.logsnr_of_times(save_times, -20.0, 20.0)
  dtype = z1.dtype
  sol = diffrax.diffeqsolve(
      ode.pf_ode_term(denoise, y), ode.make_solver(solver, 20.0), -20.0, 20.0, None, z1,
      saveat=diffrax.SaveAt(ts=jnp.asarray(save_lam, dtype)),
      stepsize_controller=diffrax.StepTo(ts=jnp.asarray(
          ode.logsnr_grid(num_steps, "uniform_t", save_times), dtype)),
      max_steps=num_steps)
  targets = [denoise(z, jnp.full(z.shape[:1], lam, dtype), y)
             for z, lam in zip(sol.ys, save_lam) if lam < 20.0]
  if save_lam[-1] == 20.0:
    targets.append(sol.ys[-1] / diffusion.alpha_sigma(jnp.asarray(20.0, dtype))[0])
  return jnp.stack(targets, axis=1)


@pytest.mark.parametrize("solver", ode.FIXED_STEP_SOLVERS)
def test_step_start_x_hats_equal_the_denoiser_at_the_saved_z(mixture, z1, solver):
  """The stored targets are the solver steps' own x-hats; they equal a separate denoiser
  evaluation at z of diffrax's solve, for every save time (t=1 included) and with labels."""
  save_times = (1.0,) + SAVE_TIMES
  y = jnp.arange(BATCH) % 10
  got, stats = jax.jit(lambda z: ode.trajectory_and_stats(
      mixture.denoise, z, save_times, solver=solver, num_steps=12, y=y))(z1)
  want = jax.jit(lambda z: _saved_z_then_denoise(mixture.denoise, z, save_times, solver, 12, y))(
      z1)
  assert got.shape == want.shape == (BATCH, len(save_times), 8, 8, 1)
  assert bool(stats["successful"].all()) and np.abs(np.asarray(want)).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 solves


def test_step_start_x_hats_of_a_unet_teacher_equal_the_denoiser_at_the_saved_z(z1):
  from configs import tiny
  from dsno_jax import models
  config = tiny.get_config()
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
      models.param_shapes(models.init_teacher, config))
  denoise = diffusion.unet_denoiser(models.teacher_from_config(config), params,
                                     config.teacher.mean_type)
  y = jnp.arange(BATCH) % 10
  got = jax.jit(lambda z: ode.trajectory(denoise, z, SAVE_TIMES, solver="dpmpp3m", num_steps=6,
                                         y=y))(z1)
  want = jax.jit(lambda z: _saved_z_then_denoise(denoise, z, SAVE_TIMES, "dpmpp3m", 6, y))(z1)
  assert np.abs(np.asarray(want)).max() > 0.1  # the random network does not output zeros
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_grid_without_a_save_time_is_refused_or_reported(mixture, z1):
  """A concrete grid is checked up front; a traced one (a jit argument) at run time, reported
  in 'successful' with NaN targets, without host callbacks."""
  save = ode.logsnr_of_times(SAVE_TIMES, -20.0, 20.0)
  good = ode.logsnr_grid(8, "uniform_t", SAVE_TIMES)
  bad = ode.logsnr_grid(8, "uniform_t", (0.0,))  # holds t=0.25 but not 0.5625 and 0.0625
  with pytest.raises(ValueError, match="not points of grid_logsnrs"):
    ode.integrate(mixture.denoise, z1, save, grid_logsnrs=bad)
  with pytest.raises(ValueError, match="increasing 1-D grid"):
    ode.integrate(mixture.denoise, z1, save, grid_logsnrs=good[::-1])
  run = jax.jit(lambda z, grid: ode.integrate(mixture.denoise, z, save, solver="phi2m",
                                              grid_logsnrs=grid))
  assert host_calls(run.lower(z1, good).compile()) == []
  x_good, stats_good = run(z1, good)
  x_bad, stats_bad = run(z1, bad)
  assert bool(stats_good["successful"].all()) and np.isfinite(np.asarray(x_good)).all()
  assert not bool(stats_bad["successful"].any())
  x_bad = np.asarray(x_bad)
  assert np.isnan(x_bad[:, [0, 2]]).all() and np.isfinite(x_bad[:, [1, 3]]).all()
  x_final, _ = jax.jit(lambda z: ode.integrate(mixture.denoise, z, save[3:], solver="phi2m",
                                                grid_logsnrs=bad))(z1)
  np.testing.assert_allclose(x_bad[:, 3], x_final[:, 0], rtol=1e-6, atol=1e-6)  # the t=0 one


@pytest.mark.parametrize("solver", ode.ADAPTIVE_SOLVERS)
def test_adaptive_nfe_is_the_evaluations_made(mixture, z1, solver):
  """The count reported from diffrax's step statistics equals a callback count, on the
  diffrax version setup.py admits (one example: a vmapped loop evaluates finished examples)."""
  denoise, count = _counting(mixture.denoise)
  x_hat, stats = jax.jit(lambda z: ode.trajectory_and_stats(
      denoise, z, (0.0,), solver=solver, rtol=1e-3, atol=1e-3))(z1[:1])
  jax.effects_barrier()  # every callback has run
  assert stats["target_nfe"] == 0 and bool(stats["successful"].all())
  assert sum(count) == int(stats["nfe"][0]) > 20, (sum(count), stats["nfe"])


HOST_TRANSFER_OPCODES = ("kSend", "kSendDone", "kRecv", "kRecvDone", "kInfeed", "kOutfeed")


def host_calls(compiled) -> list:
  """The operations of a compiled program that stop for the host: custom calls to a Python
  callback (jax.debug.callback/print, pure_callback, io_callback) and host transfers.

  Reads the instructions' opcodes and call targets, not the program text, whose metadata
  names the Python source (a test called "..._callbacks" would match itself)."""
  found = []
  for module in compiled.runtime_executable().hlo_modules():
    for computation in module.computations():
      for instruction in computation.instructions():
        opcode = getattr(instruction.opcode, "name", str(instruction.opcode).split(".")[-1])
        if opcode in HOST_TRANSFER_OPCODES:
          found.append(f"{opcode} {instruction.name}")
        elif opcode == "kCustomCall":
          target = re.search(r'custom_call_target="([^"]*)"', instruction.to_string())
          if target and "callback" in target.group(1).lower():
            found.append(f"{target.group(1)} {instruction.name}")
  return found


def test_host_calls_finds_a_callback_inside_a_loop():
  def body(i, x):
    jax.debug.callback(lambda v: None, x.sum())
    return 2 * x
  with_callback = jax.jit(lambda x: jax.lax.fori_loop(0, 3, body, x))
  without = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, x: 2 * x, x))
  x = jnp.ones(4)
  assert any("callback" in c for c in host_calls(with_callback.lower(x).compile()))
  assert host_calls(without.lower(x).compile()) == []


def test_sharded_batch_matches_unsharded_without_host_callbacks(solve, z1):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  run = solve("dpmpp2m", 64)
  assert host_calls(run.lower(z1).compile()) == []  # no host syncs inside
  sharded = jax.device_put(z1, NamedSharding(mesh, PartitionSpec("data")))
  got = run(sharded)
  np.testing.assert_allclose(got, run(z1), rtol=1e-5, atol=2e-5)  # float32 reduction order
  assert len(got.sharding.device_set) == len(jax.devices())


@pytest.mark.parametrize("grid", ode.GRIDS)
def test_grids_contain_save_times_and_keep_the_step_count(grid):
  for num_steps in (4, 7, 64, 100):
    lam = ode.logsnr_grid(num_steps, grid, SAVE_TIMES)
    t = ode.time_grid(num_steps, grid, SAVE_TIMES)
    assert lam[0] == -20.0 and lam[-1] == 20.0 and np.all(np.diff(lam) > 0)
    assert t[0] == 1.0 and t[-1] == 0.0 and np.all(np.diff(t) < 0)
    assert set(SAVE_TIMES) <= set(t.tolist())
    save_lam = ode.logsnr_of_times(SAVE_TIMES, -20.0, 20.0)
    assert set(save_lam.tolist()) <= set(lam.tolist())
    assert ode.nfe("ddim", num_steps, grid, SAVE_TIMES) == len(lam) - 1
    assert len(lam) - 1 == num_steps or (num_steps < 8 and len(lam) - 1 <= num_steps + 3)
  assert len(ode.logsnr_grid(1, grid, SAVE_TIMES)) - 1 == 4  # every save time needs a step


def test_grid_shapes():
  lam = ode.logsnr_grid(8, "uniform_logsnr")
  np.testing.assert_allclose(np.diff(lam), 5.0)
  np.testing.assert_allclose(ode.time_grid(8, "uniform_t"), np.linspace(1, 0, 9), atol=1e-12)
  u = np.exp(-ode.logsnr_grid(8, "edm") / (2 * 7.0))  # (sigma/alpha)^(1/rho)
  np.testing.assert_allclose(np.diff(u), np.diff(u)[0], rtol=1e-9)
  # save times at t=1 (the noise itself) are allowed
  assert ode.time_grid(8, "uniform_t", (1.0, 0.5, 0.0))[0] == 1.0
  assert ode.nfe("tsit5", 8) is None


def test_bad_arguments_raise(mixture, z1):
  denoise = mixture.denoise
  cases = [
      (dict(solver="euler"), "solver='euler'"),
      (dict(grid="cosine"), "grid='cosine'"),
      (dict(num_steps=0), "num_steps=0"),
      (dict(num_steps=2.5), "num_steps=2.5"),
      (dict(save_times=(0.5, 1.5)), "in \\[0, 1\\]"),
      (dict(save_times=(-0.1,)), "in \\[0, 1\\]"),
      (dict(save_times=(0.25, 0.5)), "decreasing"),
      (dict(save_times=(0.5, 0.5)), "decreasing"),
      (dict(save_times=()), "non-empty"),
      (dict(solver="tsit5", rtol=0.0), "rtol"),
      (dict(y=jnp.zeros((3,), jnp.int32)), "labels y"),
      (dict(logsnr_min=5.0, logsnr_max=-5.0), "logsnr_min"),
  ]
  for kwargs, message in cases:
    kwargs = {"save_times": SAVE_TIMES, **kwargs}
    with pytest.raises(ValueError, match=message):
      ode.trajectory(denoise, z1, **kwargs)
  with pytest.raises(ValueError, match="z1 has shape"):
    ode.trajectory(denoise, z1[0], SAVE_TIMES)
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda t: ode.trajectory(denoise, z1, t))(jnp.array([0.5, 0.0]))
