"""The probability-flow ODE in log-SNR time, its solvers as diffrax solvers, and trajectory()."""
from typing import Callable, ClassVar, Dict, Optional, Sequence, Tuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import diffusion

# ddim: DPM-Solver++(1); dpmpp2m/dpmpp3m: DPM-Solver++(2M)/(3M) as published (Lu et al. 2022);
# phi2m/phi3m: this project's multistep variant that interpolates in the VP angle (PhiMultistep).
FIXED_STEP_SOLVERS = ("ddim", "dpmpp2m", "dpmpp3m", "phi2m", "phi3m")
ADAPTIVE_SOLVERS = ("tsit5", "dopri5", "dopri8")
SOLVERS = FIXED_STEP_SOLVERS + ADAPTIVE_SOLVERS
GRIDS = ("uniform_t", "uniform_logsnr", "edm")
EDM_RHO = 7.0
# Adaptive solves stop with an error rather than run forever; 1e-10 tolerances need ~1e3 steps.
MAX_ADAPTIVE_STEPS = 100_000


# --- the ODE --------------------------------------------------------------------------------
# The diffrax time variable is the log-SNR lam (increasing from logsnr_min at t=1 to
# logsnr_max at t=0). In lam the field is smooth everywhere, including the t=0 end, whereas
# dlam/dt grows like exp(logsnr_max/2) there and would make adaptive steps in t crawl.


class PFODETerm(diffrax.AbstractTerm):
  """dz/dlam = (alpha/2) (D(z, lam) - alpha z) for a denoiser D(z (B,H,W,C), logsnr (B,), y)."""
  denoise: Callable
  labels: Optional[jax.Array] = None

  def x_hat(self, logsnr, z):
    """D(z, logsnr, labels): the denoiser at a scalar log-SNR, in z's dtype."""
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, z.dtype), z.shape[:1])
    return self.denoise(z, logsnr, self.labels).astype(z.dtype)

  def vf(self, t, y, args):
    alpha, _ = diffusion.alpha_sigma(jnp.asarray(t, y.dtype))
    return 0.5 * alpha * (self.x_hat(t, y) - alpha * y)

  def contr(self, t0, t1, **kwargs):
    return t1 - t0

  def prod(self, vf, control):
    return jnp.asarray(control, vf.dtype) * vf


def pf_ode_term(denoise: Callable, y=None) -> PFODETerm:
  """The PF-ODE term of `denoise(z (B,H,W,C), logsnr (B,), y) -> x_hat` (diffrax time = lam)."""
  # A fresh closure: diffrax hashes non-array leaves, and a bound method of a pytree teacher
  # (e.g. GaussianMixture.denoise) would hash its arrays.
  return PFODETerm(lambda z, logsnr, labels: denoise(z, logsnr, labels), y)


def _unwrap(terms, t0, t1):
  """The PFODETerm inside diffrax's direction wrapper, and the step ends as log-SNRs."""
  direction = 1
  while not isinstance(terms, PFODETerm):
    direction, terms = direction * terms.direction, terms.term
  return terms, t0 * direction, t1 * direction


def _coefficients(logsnr_from, logsnr_to, dtype):
  a0, s0 = diffusion.alpha_sigma(jnp.asarray(logsnr_from, dtype))
  a1, s1 = diffusion.alpha_sigma(jnp.asarray(logsnr_to, dtype))
  return a0, s0, a1, s1


class DDIM(diffrax.AbstractSolver):
  """The DDIM step from lam_t to lam_u: x = D(z_t), eps = (z_t - alpha_t x)/sigma_t,
  z_u = alpha_u x + sigma_u eps (the exact first-order exponential integrator in data
  prediction: DPM-Solver++(1), Lu et al. 2022, Section 4).

  The state is (x of the last step start,): every fixed-step solver's state starts with it
  (`step_x_hat`), so a save time on the grid gets its x-hat from the step that starts there.
  """
  term_structure: ClassVar = PFODETerm
  interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

  def order(self, terms):
    return 1

  def init(self, terms, t0, t1, y0, args):
    return (jnp.zeros_like(y0),)

  def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
    del solver_state, made_jump
    term, t0, t1 = _unwrap(terms, t0, t1)
    a0, s0, a1, s1 = _coefficients(t0, t1, y0.dtype)
    x_hat = term.x_hat(t0, y0)
    eps = (y0 - a0 * x_hat) / s0
    y1 = a1 * x_hat + s1 * eps
    return y1, None, dict(y0=y0, y1=y1), (x_hat,), diffrax.RESULTS.successful

  def func(self, terms, t0, y0, args):
    return terms.vf(t0, y0, args)


def angle(logsnr):
  """phi = arctan(sigma/alpha) in [0, pi/2]: alpha = cos(phi), sigma = sin(phi); affine in t
  for the cosine schedule."""
  return jnp.arctan(jnp.exp(-0.5 * logsnr))


# Gauss-Legendre rule on [-1, 1] for the multistep weights: the integrands are smooth in tau,
# and 16 nodes give them to 2e-8 relative for steps up to the whole log-SNR range.
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(16)


def _history_weights(logsnr_nodes, logsnr_from, logsnr_to):
  """c_j = int_0^h exp(-(h - tau)) l_j(tau) dtau for the Lagrange basis l_j in v = angle^2.

  The nodes are the log-SNRs of the x-hats (current first); tau = (lam - lam_from)/2 and
  h = (lam_to - lam_from)/2. Returns the weights of the previous nodes (j >= 1); the
  current one's is 1 - exp(-h) minus their sum, as the l_j sum to one.
  """
  h = (logsnr_to - logsnr_from) / 2
  tau = h * (jnp.asarray(_GAUSS_NODES, h.dtype) + 1) / 2
  weight = jnp.exp(tau - h) * h * jnp.asarray(_GAUSS_WEIGHTS, h.dtype) / 2
  v = angle(logsnr_from + 2 * tau) ** 2
  v_nodes = [angle(lam) ** 2 for lam in logsnr_nodes]
  weights = []
  for j in range(1, len(v_nodes)):
    basis = jnp.ones_like(v)
    for i, v_i in enumerate(v_nodes):
      if i != j:
        basis = basis * (v - v_i) / (v_nodes[j] - v_i)
    weights.append(jnp.sum(weight * basis))
  return weights


def _multistep_history(y0):
  """A multistep solver's state before its first step: (x_hat at the last two step starts,
  latest first (`step_x_hat`), their log-SNRs, steps taken)."""
  zero_t = jnp.zeros((), y0.dtype)
  return (jnp.zeros_like(y0), jnp.zeros_like(y0), zero_t, zero_t, jnp.zeros((), jnp.int32))


class DPMSolverPP(diffrax.AbstractSolver):
  """DPM-Solver++(2M) or (3M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2, and the third-order
  multistep update of the authors' dpm_solver_pytorch.py, which diffusers copies): multistep
  in lambda = log(alpha/sigma) = logsnr/2.

  With h = lambda_u - lambda_t, x0 = D(z_t) and the x-hats of the previous step starts,
  z_u = (sigma_u/sigma_t) z_t - alpha_u expm1(-h) x0 + a finite-difference correction. The
  first steps use the orders the history allows (the first is DDIM); the last step is first
  order (DDIM), which the authors' sampler does below 10 steps (`lower_order_final`) and this
  one at every step count. As published, the 3M update weights its second difference D2 with
  half the Taylor coefficient, so it does not integrate a quadratic x-hat exactly: its local
  error is O(h^3), like 2M's, with a smaller constant (tests/test_ode.py measures both).
  Needs a fixed grid (diffrax.StepTo): the history sits at the previous step starts.
  """
  order_: int = eqx.field(static=True, default=2)  # 2 (2M) or 3 (3M)
  # The log-SNR where the solve ends (its last step is first order); diffrax tells a solver
  # only its first step's end.
  logsnr_end: float = 20.0
  term_structure: ClassVar = PFODETerm
  interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

  def order(self, terms):
    return self.order_

  def init(self, terms, t0, t1, y0, args):
    return _multistep_history(y0)

  def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
    del made_jump
    x_prev1, x_prev2, lam_prev1, lam_prev2, count = solver_state
    lam_end = jnp.asarray(self.logsnr_end, y0.dtype)
    term, t0, t1 = _unwrap(terms, t0, t1)
    dtype = y0.dtype
    lam0, lam1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
    _, s0, a1, s1 = _coefficients(lam0, lam1, dtype)
    x0 = term.x_hat(lam0, y0)
    order = jnp.where(lam1 >= lam_end, 1, jnp.minimum(count + 1, self.order_))
    h = (lam1 - lam0) / 2
    # Steps not taken yet stand in at unit spacing, so the unused branches stay finite.
    h_0 = jnp.where(count >= 1, (lam0 - lam_prev1) / 2, h)
    h_1 = jnp.where(count >= 2, (lam_prev1 - lam_prev2) / 2, h)
    phi_1 = jnp.expm1(-h)
    r0 = h_0 / h
    d1_0 = (x0 - x_prev1) / r0
    second = -0.5 * phi_1 * d1_0
    correction = jnp.where(order == 2, second, 0.0)
    if self.order_ >= 3:
      r1 = h_1 / h
      d1_1 = (x_prev1 - x_prev2) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      phi_2 = phi_1 / h + 1.0
      phi_3 = phi_2 / h - 0.5
      correction = jnp.where(order == 3, phi_2 * d1 - phi_3 * d2, correction)
    y1 = (s1 / s0) * y0 + a1 * (-phi_1 * x0 + correction)
    new_state = (x0, x_prev1, lam0, lam_prev1, count + 1)
    return y1, None, dict(y0=y0, y1=y1), new_state, diffrax.RESULTS.successful

  def func(self, terms, t0, y0, args):
    return terms.vf(t0, y0, args)


class PhiMultistep(diffrax.AbstractSolver):
  """This project's multistep exponential integrator in data prediction (phi2m, phi3m): the
  update of DPM-Solver++(2M)/(3M) (Lu et al. 2022) with another interpolant of x-hat.

  z_u = (sigma_u/sigma_t) z_t + alpha_u int_0^h exp(-(h - tau)) P(tau) dtau, with tau half
  the log-SNR past the step start and P the polynomial through the current x-hat and the
  previous one or two (kept in the solver state). How it differs from DPM-Solver++ (the
  `dpmpp2m`/`dpmpp3m` solvers): P is a polynomial in v = phi^2, the squared VP angle
  phi = arctan(sigma/alpha), not in log-SNR, and the last step keeps the full order. x-hat is
  smooth in phi at the noise end and even in sigma/alpha at the data end, where a log-SNR line
  overshoots across the long final steps of a uniform-t grid, so no lower-order final step is
  needed. The weights are exact integrals of that basis (16-node Gauss-Legendre in tau). The
  first steps use the orders available (the first is DDIM). Needs a fixed grid
  (diffrax.StepTo): the history sits at the previous step starts.
  """
  history: int = eqx.field(static=True, default=2)  # x-hats used: 2 (phi2m) or 3 (phi3m)
  term_structure: ClassVar = PFODETerm
  interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

  def order(self, terms):
    return self.history

  def init(self, terms, t0, t1, y0, args):
    return _multistep_history(y0)

  def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
    del made_jump
    x_prev1, x_prev2, lam_prev1, lam_prev2, count = solver_state
    term, t0, t1 = _unwrap(terms, t0, t1)
    dtype = y0.dtype
    lam0, lam1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
    _, s0, a1, s1 = _coefficients(lam0, lam1, dtype)
    x0 = term.x_hat(lam0, y0)
    order = jnp.minimum(count + 1, self.history)
    # History nodes not in use yet are moved off the current one so every weight is finite.
    node1 = jnp.where(order >= 2, lam_prev1, lam0 - 1)
    node2 = jnp.where(order >= 3, lam_prev2, node1 - 1)
    (c1,) = _history_weights((lam0, node1), lam0, lam1)
    correction = jnp.where(order == 2, c1 * (x_prev1 - x0), 0.0)
    if self.history >= 3:
      c1, c2 = _history_weights((lam0, node1, node2), lam0, lam1)
      correction = jnp.where(order == 3, c1 * (x_prev1 - x0) + c2 * (x_prev2 - x0), correction)
    y1 = (s1 / s0) * y0 + a1 * (-jnp.expm1(-(lam1 - lam0) / 2) * x0 + correction)
    new_state = (x0, x_prev1, lam0, lam_prev1, count + 1)
    return y1, None, dict(y0=y0, y1=y1), new_state, diffrax.RESULTS.successful

  def func(self, terms, t0, y0, args):
    return terms.vf(t0, y0, args)


def make_solver(solver: str, logsnr_end: float = 20.0) -> diffrax.AbstractSolver:
  """The diffrax solver named `solver` (one of SOLVERS) for a solve that ends at logsnr_end."""
  _check_solver(solver)
  return {
      "ddim": DDIM, "dpmpp2m": lambda: DPMSolverPP(order_=2, logsnr_end=logsnr_end),
      "dpmpp3m": lambda: DPMSolverPP(order_=3, logsnr_end=logsnr_end),
      "phi2m": lambda: PhiMultistep(history=2), "phi3m": lambda: PhiMultistep(history=3),
      "tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8,
  }[solver]()


def step_x_hat(solver_state) -> jax.Array:
  """x-hat = D(z_i, lam_i) (B, H, W, C) at the start of the fixed-step solver step that returned
  `solver_state`: DDIM, DPMSolverPP and PhiMultistep keep it first in their state."""
  return solver_state[0]


# --- time grids -----------------------------------------------------------------------------


def _check_solver(solver):
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r}; expected one of {SOLVERS}")


def _check_grid(grid):
  if grid not in GRIDS:
    raise ValueError(f"grid={grid!r}; expected one of {GRIDS}")


def _check_logsnr_range(logsnr_min, logsnr_max):
  if not logsnr_min < logsnr_max:
    raise ValueError(f"logsnr_min={logsnr_min!r} must be below logsnr_max={logsnr_max!r}")


def check_save_times(save_times) -> np.ndarray:
  """save_times as float64 (K,), or ValueError unless concrete, in [0, 1], strictly decreasing."""
  try:
    times = np.asarray(save_times, np.float64)
  except (TypeError, jax.errors.TracerArrayConversionError) as e:
    raise ValueError(f"save_times must be concrete numbers (a tuple), got {save_times!r}") from e
  if times.ndim != 1 or times.size == 0:
    raise ValueError(f"save_times={save_times!r}; expected a non-empty 1-D sequence")
  if not np.all(np.isfinite(times)) or times.min() < 0.0 or times.max() > 1.0:
    raise ValueError(f"save_times={save_times!r}; every time must lie in [0, 1]")
  if np.any(np.diff(times) >= 0):
    raise ValueError(f"save_times={save_times!r}; expected strictly decreasing times (t=1 is noise)")
  return times


def logsnr_of_times(t, logsnr_min, logsnr_max) -> np.ndarray:
  """Float64 log-SNR of concrete times, with the ends exact (t=1: logsnr_min, t=0: logsnr_max)."""
  t = np.asarray(t, np.float64)
  with jax.ensure_compile_time_eval(), jax.enable_x64(True):
    lam = np.asarray(diffusion.logsnr_schedule_cosine(t, logsnr_min, logsnr_max))
  return np.where(t == 1.0, logsnr_min, np.where(t == 0.0, logsnr_max, lam))


def _t64(logsnr, logsnr_min, logsnr_max) -> np.ndarray:
  with jax.ensure_compile_time_eval(), jax.enable_x64(True):
    t = np.asarray(diffusion.t_from_logsnr(np.asarray(logsnr, np.float64), logsnr_min, logsnr_max))
  return np.clip(t, 0.0, 1.0)


def _grid_variable(grid, logsnr_min, logsnr_max):
  """(u(lam), lam(u)) for the variable in which `grid` is uniform."""
  if grid == "uniform_t":
    return (lambda lam: _t64(lam, logsnr_min, logsnr_max),
            lambda u: logsnr_of_times(u, logsnr_min, logsnr_max))
  if grid == "uniform_logsnr":
    return (lambda lam: np.asarray(lam, np.float64), lambda u: np.asarray(u, np.float64))
  # edm: uniform in (sigma/alpha)^(1/rho) = exp(-lam / (2 rho))
  return (lambda lam: np.exp(-np.asarray(lam, np.float64) / (2 * EDM_RHO)),
          lambda u: -2 * EDM_RHO * np.log(u))


def logsnr_grid(num_steps: int, grid: str = "uniform_t", save_times: Sequence[float] = (0.0,),
                logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> np.ndarray:
  """Float64 log-SNRs of a fixed-step grid, increasing from logsnr_min (t=1) to logsnr_max (t=0).

  `num_steps` points uniform in the grid's variable (t, log-SNR, or (sigma/alpha)^(1/7) for
  `edm`); each save time replaces its nearest interior grid point, so the grid contains the
  save times exactly with the step count unchanged, unless two save times share a nearest
  point (then the extra one is inserted as an additional step).
  """
  _check_grid(grid)
  _check_logsnr_range(logsnr_min, logsnr_max)
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}; expected an integer >= 1")
  num_steps = int(num_steps)
  save_logsnrs = logsnr_of_times(check_save_times(save_times), logsnr_min, logsnr_max)
  to_u, from_u = _grid_variable(grid, logsnr_min, logsnr_max)
  u_ends = to_u(np.array([logsnr_min, logsnr_max]))
  lam = from_u(np.linspace(u_ends[0], u_ends[1], num_steps + 1))
  lam[0], lam[-1] = logsnr_min, logsnr_max
  position = (to_u(save_logsnrs) - u_ends[0]) / (u_ends[1] - u_ends[0]) * num_steps
  claimed, extra = {0, num_steps}, []
  for pos, value in zip(position, save_logsnrs):
    if value in (logsnr_min, logsnr_max):
      continue
    i = int(np.clip(np.rint(pos), 1, num_steps - 1)) if num_steps > 1 else 0
    if i in claimed:
      extra.append(value)
    else:
      lam[i] = value
      claimed.add(i)
  return np.unique(np.concatenate([lam, np.asarray(extra, np.float64)]))


def time_grid(num_steps: int, grid: str = "uniform_t", save_times: Sequence[float] = (0.0,),
              logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> np.ndarray:
  """The grid of `logsnr_grid` as times t, decreasing from 1 to 0 (save times exact)."""
  lam = logsnr_grid(num_steps, grid, save_times, logsnr_min, logsnr_max)
  t = _t64(lam, logsnr_min, logsnr_max)
  times = check_save_times(save_times)
  # the t of a save point is the given one, not its round trip through the schedule
  for s, value in zip(times, logsnr_of_times(times, logsnr_min, logsnr_max)):
    t[lam == value] = s
  t[0], t[-1] = 1.0, 0.0
  return t


def nfe(solver: str, num_steps: int, grid: str = "uniform_t", save_times: Sequence[float] = (0.0,),
        logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Optional[int]:
  """Denoiser evaluations of the ODE solve of a fixed-step solver: one per grid step.

  None for the adaptive solvers, whose count depends on the data (`trajectory_and_stats`
  reports it). For a fixed-step solver this is every evaluation of `trajectory`: the x-hat at
  a save time is the one of the step that starts there, and at t=0 it is z/alpha
  (`target_nfe` is 0).
  """
  _check_solver(solver)
  _check_grid(grid)
  if solver in ADAPTIVE_SOLVERS:
    return None
  return len(logsnr_grid(num_steps, grid, save_times, logsnr_min, logsnr_max)) - 1


def target_nfe(solver: str, save_times: Sequence[float]) -> int:
  """Denoiser evaluations for the x-hats at the save times beyond those of the ODE solve.

  Fixed-step solvers: none, as every save time is a grid point and the step that starts there
  evaluates its x-hat. Adaptive solvers: one per save time but t=0, since their stages do not
  land on the save times. At t=0 (logsnr_max) x-hat is read off the solution as z/alpha with
  no evaluation: the denoiser there is the identity up to sigma/alpha = exp(-logsnr_max/2)
  (4.5e-5 at 20).
  """
  _check_solver(solver)
  times = check_save_times(save_times)
  if solver in FIXED_STEP_SOLVERS:
    return 0
  return int(np.count_nonzero(times > 0.0))


# --- trajectories -----------------------------------------------------------------------------


def _adaptive_nfe(solver, num_steps):
  """Evaluations diffrax makes for `num_steps` attempted adaptive steps (FSAL tableaus): per
  step the stages less the one reused, plus one for the initial step-size probe. These are
  diffrax's internals, counted with a callback in tests/test_ode.py for the diffrax version
  that setup.py admits."""
  per_step = {"tsit5": 6, "dopri5": 6, "dopri8": 13}[solver]
  return per_step * num_steps + 1


def _check_concrete_grid(grid_logsnrs, save, dtype, logsnr_min, logsnr_max):
  """ValueError unless a concrete grid runs from logsnr_min to logsnr_max, increasing, through
  every save log-SNR (compared in `dtype`, as the solve does); a traced grid is checked at run
  time instead (`_fixed_step_solve`)."""
  try:
    grid = np.asarray(grid_logsnrs).astype(dtype)
  except (TypeError, jax.errors.TracerArrayConversionError):
    return
  ends = np.asarray([logsnr_min, logsnr_max], np.float64).astype(dtype)
  if (grid.ndim != 1 or grid.size < 2 or np.any(np.diff(grid) <= 0)
      or np.any(grid[[0, -1]] != ends)):
    raise ValueError(f"grid_logsnrs={grid_logsnrs!r}; expected an increasing 1-D grid from "
                     f"logsnr_min={logsnr_min} to logsnr_max={logsnr_max}")
  missing = np.setdiff1d(save.astype(dtype), grid)
  if missing.size:
    raise ValueError(f"save_logsnrs {missing.tolist()} are not points of grid_logsnrs; build the "
                     "grid with logsnr_grid(..., save_times) so that it contains them")


def _fixed_step_solve(term: PFODETerm, solver: diffrax.AbstractSolver, grid, z1, save_interior
                      ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The fixed-step solve as a scan of `solver.step` along grid (N+1,) log-SNRs.

  Returns (z at grid[-1] (B, H, W, C), x-hat at each of the save_interior (K,) log-SNRs
  (K, B, H, W, C), ok: scalar bool). That x-hat is the one the step starting at the save
  log-SNR evaluated (`step_x_hat`), so it costs nothing. A save log-SNR that no step starts at
  (a traced grid without it) leaves NaN there and ok False, as does a grid that does not
  increase (`integrate` checks its ends).
  """
  dtype = z1.dtype
  num_saves = save_interior.shape[0]
  state = solver.init(term, grid[0], grid[1], z1, None)
  x_hats = jnp.full((num_saves,) + z1.shape, jnp.nan, dtype)

  def one_step(carry, step_ends):
    z, state, x_hats, found, ok = carry
    lam0, lam1 = step_ends
    z, _, _, state, result = solver.step(term, lam0, lam1, z, None, state, False)
    ok = ok & (result == diffrax.RESULTS.successful)
    if num_saves:
      # The grid may be traced, so which steps start at a save log-SNR is found at run time.
      hit = lam0 == save_interior
      k = jnp.argmax(hit)
      slot = jnp.where(jnp.any(hit), step_x_hat(state), x_hats[k])
      x_hats = jax.lax.dynamic_update_index_in_dim(x_hats, slot, k, 0)
      found = found | hit
    return (z, state, x_hats, found, ok), None

  carry = (z1, state, x_hats, jnp.zeros((num_saves,), bool), jnp.asarray(True))
  (z, _, x_hats, found, ok), _ = jax.lax.scan(one_step, carry, (grid[:-1], grid[1:]))
  return z, x_hats, ok & jnp.all(found) & jnp.all(grid[1:] > grid[:-1])


def integrate(denoise: Callable, z1, save_logsnrs, *, solver: str = "ddim", grid_logsnrs=None,
              y=None, rtol=1e-5, atol=1e-5, logsnr_min: float = -20.0, logsnr_max: float = 20.0
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The solve behind `trajectory`, with a grid and tolerances that may be traced (jit arguments).

  save_logsnrs (K,) concrete, increasing, in [logsnr_min, logsnr_max]; grid_logsnrs (N+1,)
  increasing from logsnr_min to logsnr_max and containing save_logsnrs (fixed-step solvers
  only). Returns (x_hat (B, K, H, W, C), {'nfe': (B,) int32 ODE evaluations, 'target_nfe': the
  evaluations for the x-hats at the save times beyond those, 'successful': (B,) bool}).

  Fixed-step solvers run as a scan of their `step` whose step-start x-hats are the targets at
  the save times, so 'target_nfe' is 0. Adaptive solvers run in diffrax.diffeqsolve and
  evaluate the denoiser again at each save time but logsnr_max ('target_nfe' of them). At
  logsnr_max x-hat is z/alpha (see `target_nfe`). Failures (an adaptive solve running past
  MAX_ADAPTIVE_STEPS, a traced grid that misses a save log-SNR or the ends) are reported in
  'successful' rather than raised: raising would put host callbacks into the compiled program.
  """
  _check_solver(solver)
  try:
    save = np.asarray(save_logsnrs, np.float64)
  except (TypeError, jax.errors.TracerArrayConversionError) as e:
    raise ValueError("save_logsnrs must be concrete (they decide which x-hats cost an "
                     f"evaluation), got {save_logsnrs!r}") from e
  if save.ndim != 1 or save.size == 0 or np.any(np.diff(save) <= 0):
    raise ValueError(f"save_logsnrs={save_logsnrs!r}; expected a non-empty increasing 1-D array")
  if save[0] < logsnr_min or save[-1] > logsnr_max:
    raise ValueError(f"save_logsnrs={save_logsnrs!r}; expected values in [logsnr_min, "
                     f"logsnr_max] = [{logsnr_min}, {logsnr_max}]")
  z1 = jnp.asarray(z1)
  dtype, batch = z1.dtype, z1.shape[0]
  t0, t1 = jnp.asarray(logsnr_min, dtype), jnp.asarray(logsnr_max, dtype)
  alpha_end, _ = diffusion.alpha_sigma(t1)
  at_end = save >= logsnr_max
  interior = int(np.count_nonzero(~at_end))

  if solver in FIXED_STEP_SOLVERS:
    if grid_logsnrs is None:
      raise ValueError(f"solver={solver!r} needs grid_logsnrs (a fixed grid)")
    _check_concrete_grid(grid_logsnrs, save, dtype, logsnr_min, logsnr_max)
    grid = jnp.asarray(grid_logsnrs, dtype)
    if grid.ndim != 1 or grid.shape[0] < 2:
      raise ValueError(f"grid_logsnrs has shape {grid.shape}; expected (N+1,) with N >= 1 steps")
    num_steps = grid.shape[0] - 1
    z_end, x_interior, ok = _fixed_step_solve(
        pf_ode_term(denoise, y), make_solver(solver, t1), grid, z1,
        jnp.asarray(save[:interior], dtype))
    ok = ok & (grid[0] == t0) & (grid[-1] == t1)
    x_hats = [jnp.moveaxis(x_interior, 0, 1)] if interior else []
    if interior < save.size:
      x_hats.append((z_end / alpha_end)[:, None])
    count = jnp.full((batch,), num_steps, jnp.int32)
    successful = jnp.full((batch,), ok)
    target_count = 0
  else:
    # Each example gets its own steps, so results do not depend on the batch it sits in
    # (nor on how the batch is sharded).
    saveat = diffrax.SaveAt(ts=jnp.asarray(save, dtype))
    controller = diffrax.PIDController(rtol=rtol, atol=atol,
                                       step_ts=jnp.asarray(save, dtype))

    def solve_one(z, labels):
      sol = diffrax.diffeqsolve(
          pf_ode_term(denoise, labels), make_solver(solver), t0, t1, None, z[None],
          saveat=saveat, stepsize_controller=controller, max_steps=MAX_ADAPTIVE_STEPS, throw=False)
      return sol.ys[:, 0], sol.stats["num_steps"], sol.result == diffrax.RESULTS.successful

    labels = None if y is None else jnp.asarray(y)[:, None]
    z_saved, steps, successful = jax.vmap(solve_one)(z1, labels)
    count = _adaptive_nfe(solver, steps).astype(jnp.int32)
    # The denoiser at the solution, the interior save times folded into the batch.
    x_hats = []
    if interior:
      z_flat = z_saved[:, :interior].reshape((batch * interior,) + z1.shape[1:])
      y_flat = None if y is None else jnp.repeat(jnp.asarray(y), interior)
      logsnr_flat = jnp.tile(jnp.asarray(save[:interior], dtype), batch)
      x_hats.append(denoise(z_flat, logsnr_flat, y_flat).astype(dtype).reshape(
          z_saved[:, :interior].shape))
    if interior < save.size:
      x_hats.append(z_saved[:, interior:] / alpha_end)
    target_count = interior
  x_hat = jnp.concatenate(x_hats, axis=1) if len(x_hats) > 1 else x_hats[0]
  return x_hat, {"nfe": count, "target_nfe": target_count, "successful": successful}


def trajectory_and_stats(denoise: Callable, z1, save_times: Sequence[float], *,
                         solver: str = "ddim", num_steps: int = 512, grid: str = "uniform_t",
                         y=None, rtol: float = 1e-5, atol: float = 1e-5,
                         logsnr_min: float = -20.0, logsnr_max: float = 20.0
                         ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """`trajectory` plus stats: {'nfe': (B,) int32 evaluations of the ODE solve (`nfe`, or the
  count an adaptive solve made), 'target_nfe': evaluations for the x-hats at the save times
  beyond those (`target_nfe(solver, save_times)`: 0 for fixed-step solvers), 'successful': (B,)
  bool (False where an adaptive solve ran out of steps)}."""
  _check_solver(solver)
  _check_grid(grid)
  _check_logsnr_range(logsnr_min, logsnr_max)
  times = check_save_times(save_times)
  z1 = jnp.asarray(z1)
  if z1.ndim != 4:
    raise ValueError(f"z1 has shape {z1.shape}; expected (B, H, W, C)")
  if y is not None and jnp.shape(y) != z1.shape[:1]:
    raise ValueError(f"labels y have shape {jnp.shape(y)}; expected ({z1.shape[0]},)")
  grid_logsnrs = None
  if solver in FIXED_STEP_SOLVERS:
    grid_logsnrs = logsnr_grid(num_steps, grid, times, logsnr_min, logsnr_max)
  elif not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol={rtol!r}, atol={atol!r}; adaptive solvers need both > 0")
  return integrate(denoise, z1, logsnr_of_times(times, logsnr_min, logsnr_max),
                   solver=solver, grid_logsnrs=grid_logsnrs, y=y, rtol=rtol, atol=atol,
                   logsnr_min=logsnr_min, logsnr_max=logsnr_max)


def trajectory(denoise: Callable, z1, save_times: Sequence[float], *, solver: str = "ddim",
               num_steps: int = 512, grid: str = "uniform_t", y=None, rtol: float = 1e-5,
               atol: float = 1e-5, logsnr_min: float = -20.0, logsnr_max: float = 20.0
               ) -> jax.Array:
  """x-hat = D(z_t, lam(t)) at the save times along the PF-ODE solution from z1 at t=1 to t=0.

  denoise(z (B,H,W,C), logsnr (B,), y) -> x_hat; z1 (B,H,W,C) ~ N(0, I), taken as z at
  logsnr_min; save_times (K,) concrete, strictly decreasing in [0, 1] (t=0 uses
  lam = logsnr_max, where x-hat is z/alpha with no evaluation; elsewhere a fixed-step solver's
  x-hat is the one its step from that save time evaluated: see `target_nfe`). `solver`:
  ddim | dpmpp2m | dpmpp3m | phi2m | phi3m on the fixed `grid` of `num_steps` (uniform_t |
  uniform_logsnr | edm, containing the save times), or tsit5 | dopri5 | dopri8 with PID step
  control at (rtol, atol). Returns (B, K, H, W, C) in z1's dtype. Elementwise over the batch,
  jit-able with `denoise` closed over, and free of host callbacks (see `trajectory_and_stats`
  for the NFE and the per-example success flags).
  """
  return trajectory_and_stats(
      denoise, z1, save_times, solver=solver, num_steps=num_steps, grid=grid, y=y, rtol=rtol,
      atol=atol, logsnr_min=logsnr_min, logsnr_max=logsnr_max)[0]
