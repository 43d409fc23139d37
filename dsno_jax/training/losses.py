"""Training objectives: the teacher's diffusion loss and DSNO's weighted per-time distance."""
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from dsno_jax import diffusion
from dsno_jax.training import perceptual

# --- DSNO (the paper, Sec. 4: regression on the teacher's trajectories) ------------------------


def l1_distance(prediction, target):
  """(B, K, H, W, C) x2 -> (K,): mean |P - T| over batch and pixels."""
  return jnp.mean(jnp.abs(prediction - target), axis=(0, 2, 3, 4))


def l2_distance(prediction, target):
  """(B, K, H, W, C) x2 -> (K,): mean (P - T)^2 over batch and pixels."""
  return jnp.mean(jnp.square(prediction - target), axis=(0, 2, 3, 4))


# name -> distance(prediction (B,K,H,W,C), target (B,K,H,W,C)) -> (K,).
DISTANCES: Dict[str, Callable] = {"l1": l1_distance, "l2": l2_distance}
# VGG16 feature distances (training/perceptual.py); they need converted pretrained weights.
PERCEPTUAL_DISTANCES = ("vgg", "lpips")


def get_distance(name: str, perceptual_weights: str = "") -> Callable:
  """The per-time distance `name`; vgg/lpips load their weights from perceptual_weights (.npz)."""
  if name in DISTANCES:
    return DISTANCES[name]
  if name in PERCEPTUAL_DISTANCES:
    return perceptual.distance_from_file(name, perceptual_weights)
  raise ValueError(f"train.loss={name!r}; expected one of "
                   f"{sorted(DISTANCES) + list(PERCEPTUAL_DISTANCES)}")


def student_loss(prediction, targets, logsnr, distance: Callable,
                 time_weighting: str) -> Tuple[jax.Array, jax.Array]:
  """mean_k(w_k d_k) and the per-time distances d (K,).

  prediction, targets: (B, K, H, W, C); logsnr: (K,) of the K output times.
  """
  if prediction.shape != targets.shape:
    raise ValueError(f"prediction {prediction.shape} and targets {targets.shape} differ; "
                     "expected (B, K, H, W, C) both")
  per_time = distance(prediction.astype(jnp.float32), targets.astype(jnp.float32))
  weights = diffusion.time_weights(logsnr, time_weighting)
  return jnp.mean(weights * per_time), per_time


# --- the teacher (diffusion training) ----------------------------------------------------------

TEACHER_WEIGHTINGS = ("snr_trunc", "eps", "v")


def teacher_weight(logsnr, kind: str):
  """Weight on the x-space squared error that gives each objective.

  The eps and v errors are exact multiples of the x error at fixed z: eps_err =
  -(alpha/sigma) x_err and v_err = -x_err/sigma, so mse_eps = SNR mse_x and
  mse_v = (1 + SNR) mse_x; `snr_trunc` is Progressive Distillation's max(SNR, 1).
  """
  snr = jnp.exp(logsnr)
  if kind == "snr_trunc":
    return jnp.maximum(snr, 1.0)
  if kind == "eps":
    return snr
  if kind == "v":
    return 1.0 + snr
  raise ValueError(f"teacher.train.loss_weighting={kind!r}; expected one of {TEACHER_WEIGHTINGS}")


def teacher_loss(output_fn: Callable, images, labels, rng, *, mean_type: str, weighting: str,
                 logsnr_min: float, logsnr_max: float) -> Tuple[jax.Array, Dict]:
  """Continuous-time diffusion loss on the cosine schedule.

  output_fn(z (B,H,W,C), logsnr (B,), y) -> the raw network output of `mean_type`;
  images: (B, H, W, C) in [-1, 1]. t ~ U(0, 1) and eps ~ N(0, I) are drawn from rng for
  the whole (global) batch, so they do not depend on how the batch is split over devices.
  """
  rng_t, rng_eps = jax.random.split(rng)
  x = images.astype(jnp.float32)
  t = jax.random.uniform(rng_t, x.shape[:1])
  logsnr = diffusion.logsnr_schedule_cosine(t, logsnr_min, logsnr_max)
  eps = jax.random.normal(rng_eps, x.shape)
  z = diffusion.diffuse(x, eps, logsnr)
  output = output_fn(z, logsnr, labels).astype(jnp.float32)
  x_hat = diffusion.x_from_output(output, z, logsnr, mean_type, clip_x=False)
  mse_x = jnp.mean(jnp.square(x_hat - x), axis=(1, 2, 3))
  loss = jnp.mean(teacher_weight(logsnr, weighting) * mse_x)
  return loss, {"mse_x": jnp.mean(mse_x)}
