"""Distribution matching (DMD, Yin et al. 2024): the generator's gradient from a real and a fake
denoiser, as a loss; DMD2's optional GAN losses on a classifier's logits."""
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from dsno_jax import diffusion

DMD_WEIGHTINGS = ("dmd", "uniform")
GAN_LOSSES = ("hinge", "non_saturating")


def check_settings(weighting: str, t_min: float, t_max: float):
  """ValueError naming the refine field that is meaningless."""
  if weighting not in DMD_WEIGHTINGS:
    raise ValueError(f"refine.dmd_weighting={weighting!r}; expected one of {DMD_WEIGHTINGS}")
  if not 0.0 <= t_min < t_max <= 1.0:
    raise ValueError(f"refine.t_min={t_min!r}, refine.t_max={t_max!r}; expected "
                     "0 <= t_min < t_max <= 1 (diffusion times of the cosine schedule)")


def dmd_gradient(x, y, rng, real_denoise: Callable, fake_denoise: Callable, *,
                 weighting: str = "dmd", t_min: float = 0.02, t_max: float = 0.98,
                 logsnr_min: float = -20.0, logsnr_max: float = 20.0
                 ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The distribution-matching gradient at generator samples x (B, H, W, C), no gradient flowing.

  With t ~ U(t_min, t_max) and z_t = alpha_t x + sigma_t eps, grad = w (x_fake - x_real) where
  x_real, x_fake are the two denoisers' x-hats at z_t; the difference of the two scores is
  alpha_t (x_fake - x_real) / sigma_t^2, so this is DMD's KL gradient up to a per-example weight.
  `dmd` weighting: w = 1 / mean|x - x_real| per example (DMD, Sec. 3.2, eq. 8); `uniform`: 1.
  denoise(z (B,H,W,C), logsnr (B,), y) -> x_hat (B,H,W,C).
  """
  x = jax.lax.stop_gradient(x.astype(jnp.float32))
  rng_t, rng_eps = jax.random.split(rng)
  t = jax.random.uniform(rng_t, x.shape[:1], minval=t_min, maxval=t_max)
  logsnr = diffusion.logsnr_schedule_cosine(t, logsnr_min, logsnr_max)
  z = diffusion.diffuse(x, jax.random.normal(rng_eps, x.shape), logsnr)
  x_real = jax.lax.stop_gradient(real_denoise(z, logsnr, y).astype(jnp.float32))
  x_fake = jax.lax.stop_gradient(fake_denoise(z, logsnr, y).astype(jnp.float32))
  axes = tuple(range(1, x.ndim))
  if weighting == "dmd":
    # A floor keeps the weight finite where the teacher already reproduces the sample.
    scale = 1.0 / jnp.maximum(jnp.mean(jnp.abs(x - x_real), axis=axes, keepdims=True), 1e-5)
  elif weighting == "uniform":
    scale = jnp.ones(x.shape[:1] + (1,) * (x.ndim - 1), x.dtype)
  else:
    raise ValueError(f"refine.dmd_weighting={weighting!r}; expected one of {DMD_WEIGHTINGS}")
  grad = scale * (x_fake - x_real)
  return grad, {"dmd_grad_norm": jnp.mean(jnp.sqrt(jnp.sum(grad ** 2, axis=axes))),
                "fake_real_gap": jnp.mean(jnp.abs(x_fake - x_real))}


def dmd_loss(x, grad) -> jax.Array:
  """0.5 mean (x - stop_gradient(x - grad))^2: its gradient in x is grad / x.size, so descent
  moves every sample along -grad (towards the real denoiser, away from the fake one)."""
  x = x.astype(jnp.float32)
  target = jax.lax.stop_gradient(x - grad)
  return 0.5 * jnp.mean(jnp.square(x - target))


def _check_gan_loss(kind: str):
  if kind not in GAN_LOSSES:
    raise ValueError(f"refine.gan_loss={kind!r}; expected one of {GAN_LOSSES}")


def discriminator_loss(real_logits, fake_logits, kind: str) -> jax.Array:
  """The classifier's loss: real_logits (B,) should be high, fake_logits (B',) low.

  hinge: mean relu(1 - real) + mean relu(1 + fake) (Lim & Ye 2017);
  non_saturating: mean softplus(-real) + mean softplus(fake), the cross-entropy of
  sigmoid(logit) = P(real) (Goodfellow et al. 2014).
  """
  _check_gan_loss(kind)
  real_logits, fake_logits = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def generator_gan_loss(fake_logits, kind: str) -> jax.Array:
  """The generator's adversarial loss on its samples' logits (B,): hinge -mean(fake);
  non_saturating mean softplus(-fake) (-log P(real), whose gradient stays large while the
  classifier rejects the samples)."""
  _check_gan_loss(kind)
  fake_logits = fake_logits.astype(jnp.float32)
  if kind == "hinge":
    return -jnp.mean(fake_logits)
  return jnp.mean(jax.nn.softplus(-fake_logits))
