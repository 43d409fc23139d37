"""Variance-preserving diffusion in log-SNR: the cosine schedule, alpha/sigma, output types.

The output parameterisations (x, eps, v, and `both`) are those of Progressive Distillation
(Salimans & Ho, ICLR 2022, Section 4), whose teachers DSNO distils.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ("x", "eps", "v", "both")


def _schedule_constants(logsnr_min: float, logsnr_max: float):
  b = np.arctan(np.exp(-0.5 * logsnr_max))
  a = np.arctan(np.exp(-0.5 * logsnr_min)) - b
  return a, b


def logsnr_schedule_cosine(t, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
  """Log-SNR at time t in [0, 1] (t=0 data, t=1 noise): -2 log tan(a t + b)."""
  a, b = _schedule_constants(logsnr_min, logsnr_max)
  return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t) + b))


def t_from_logsnr(logsnr, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
  """Inverse of `logsnr_schedule_cosine`."""
  a, b = _schedule_constants(logsnr_min, logsnr_max)
  return (jnp.arctan(jnp.exp(-0.5 * jnp.asarray(logsnr))) - b) / a


def _expand(a, x):
  """Right-pads a (leading-dims array) with unit axes so it broadcasts against x."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def alpha_sigma(logsnr):
  """alpha = sqrt(sigmoid(lam)), sigma = sqrt(sigmoid(-lam))."""
  logsnr = jnp.asarray(logsnr)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def diffuse(x, eps, logsnr):
  """z = alpha x + sigma eps; logsnr has x's leading dims (e.g. (B,))."""
  alpha, sigma = alpha_sigma(_expand(logsnr, x))
  return alpha * x + sigma * eps


def eps_from_x(z, x_hat, logsnr):
  alpha, sigma = alpha_sigma(_expand(logsnr, z))
  return (z - alpha * x_hat) / sigma


def x_from_eps(z, eps_hat, logsnr):
  alpha, sigma = alpha_sigma(_expand(logsnr, z))
  return (z - sigma * eps_hat) / alpha


def v_from_x_eps(x, eps, logsnr):
  alpha, sigma = alpha_sigma(_expand(logsnr, x))
  return alpha * eps - sigma * x


def x_from_v(z, v_hat, logsnr):
  alpha, sigma = alpha_sigma(_expand(logsnr, z))
  return alpha * z - sigma * v_hat


def out_channels(mean_type: str, channels: int) -> int:
  """Channels of a network output of this type (2C for `both`)."""
  _check_mean_type(mean_type)
  return 2 * channels if mean_type == "both" else channels


def _check_mean_type(mean_type):
  if mean_type not in MEAN_TYPES:
    raise ValueError(f"mean_type={mean_type!r}; expected one of {MEAN_TYPES}")


def x_from_output(output, z, logsnr, mean_type: str, clip_x: bool = False):
  """x-hat from a network output of `mean_type`; logsnr has z's leading dims.

  For `both` the output holds [x, eps] on the channel axis and the two estimates
  are mixed with w = sigma^2 = sigmoid(-logsnr) on the direct x (Salimans & Ho 2022,
  Section 4).
  """
  _check_mean_type(mean_type)
  if mean_type == "x":
    x_hat = output
  elif mean_type == "eps":
    x_hat = x_from_eps(z, output, logsnr)
  elif mean_type == "v":
    x_hat = x_from_v(z, output, logsnr)
  else:
    c = z.shape[-1]
    if output.shape[-1] != 2 * c:
      raise ValueError(f"mean_type='both' needs {2 * c} output channels, got {output.shape[-1]}")
    x_x, eps = output[..., :c], output[..., c:]
    w = jax.nn.sigmoid(-_expand(logsnr, z))
    x_hat = w * x_x + (1.0 - w) * x_from_eps(z, eps, logsnr)
  return jnp.clip(x_hat, -1.0, 1.0) if clip_x else x_hat


Denoiser = Callable[..., jax.Array]  # (z (B,H,W,C), logsnr (B,), y (B,) | None) -> x_hat


def make_denoiser(apply_fn: Callable, mean_type: str, clip_x: bool = False) -> Denoiser:
  """Wraps `apply_fn(z, logsnr, y) -> raw output` as D(z, logsnr, y) -> x_hat."""
  _check_mean_type(mean_type)

  def denoise(z, logsnr, y=None):
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, z.dtype), z.shape[:1])
    out = apply_fn(z, logsnr, y).astype(z.dtype)
    return x_from_output(out, z, logsnr, mean_type, clip_x)

  return denoise


def unet_denoiser(model, params, mean_type: str, clip_x: bool = False) -> Denoiser:
  """The denoiser of a `models.UNet` with these parameters (evaluation mode)."""
  def apply_fn(z, logsnr, y):
    return model.apply({"params": params}, z, logsnr, y, train=False)
  return make_denoiser(apply_fn, mean_type, clip_x)


def time_weights(logsnr, kind: str):
  """DSNO per-time loss weights: clip(exp(lam/2), 1, 1e4) (`snr`) or 1 (`uniform`)."""
  logsnr = jnp.asarray(logsnr)
  if kind == "snr":
    return jnp.clip(jnp.exp(0.5 * logsnr), 1.0, 1e4)
  if kind == "uniform":
    return jnp.ones_like(logsnr)
  raise ValueError(f"time_weighting={kind!r}; expected 'snr' or 'uniform'")


def schedule_from_config(config) -> Callable:
  """t -> logsnr with the config's log-SNR range."""
  lo, hi = config.diffusion.logsnr_min, config.diffusion.logsnr_max
  return lambda t: logsnr_schedule_cosine(t, lo, hi)


def save_logsnrs(config, save_times: Optional[tuple] = None) -> np.ndarray:
  """Float32 log-SNRs (K,) of the trajectory save times (t=0 maps to logsnr_max)."""
  times = np.asarray(config.trajectory.save_times if save_times is None else save_times, np.float64)
  return np.asarray(schedule_from_config(config)(times), np.float32)
