"""Exact teachers: Gaussian mixtures with a closed-form denoiser, and the single-Gaussian flow."""
from typing import Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import diffusion


def _as_batch(logsnr, z):
  """logsnr (scalar or (B,)) as a (B,) array in z's dtype."""
  logsnr = jnp.asarray(logsnr, z.dtype)
  if logsnr.ndim > 1 or (logsnr.ndim == 1 and logsnr.shape[0] not in (1, z.shape[0])):
    raise ValueError(f"logsnr has shape {logsnr.shape}; expected a scalar or ({z.shape[0]},)")
  return jnp.broadcast_to(logsnr, z.shape[:1])


@flax.struct.dataclass
class GaussianMixture:
  """Mixture of isotropic Gaussians N(means[k], variances[k] I) with weights[k].

  means (M, H, W, C), variances (M,), weights (M,) (normalised by the denoiser).
  A pytree, so it can be closed over or passed through jax.jit.
  """
  means: jax.Array
  variances: jax.Array
  weights: jax.Array

  def __post_init__(self):
    # Pytree unflattening may pass placeholders without shapes; check real arrays only.
    if not all(hasattr(a, "shape") for a in (self.means, self.variances, self.weights)):
      return
    m = self.means.shape[0] if self.means.ndim == 4 else None
    if m is None or self.variances.shape != (m,) or self.weights.shape != (m,):
      raise ValueError(
          f"GaussianMixture needs means (M, H, W, C), variances (M,), weights (M,); got "
          f"{self.means.shape}, {self.variances.shape}, {self.weights.shape}")

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  def _check_z(self, z):
    if z.ndim != 4 or z.shape[1:] != self.means.shape[1:]:
      expected = ", ".join(map(str, self.means.shape[1:]))
      raise ValueError(f"z has shape {z.shape}; expected (B, {expected})")

  def denoise(self, z, logsnr, y=None):
    """E[x | z] at log-SNR `logsnr` (scalar or (B,)); z (B, H, W, C) -> x_hat (B, H, W, C).

    With labels y (B,), the posterior mean within component y only. Computed in z's dtype,
    responsibilities in log space so it is stable for logsnr in [-20, 20].
    """
    z = jnp.asarray(z)
    self._check_z(z)
    dtype = z.dtype
    means = self.means.astype(dtype)
    variances = self.variances.astype(dtype)
    alpha, sigma = diffusion.alpha_sigma(_as_batch(logsnr, z))  # (B,)
    a = alpha[:, None, None, None, None]  # (B, 1, 1, 1, 1) against (B, M, H, W, C)
    total_var = alpha[:, None] ** 2 * variances + sigma[:, None] ** 2  # (B, M)
    gain = alpha[:, None] * variances / total_var  # (B, M)
    residual = z[:, None] - a * means  # (B, M, H, W, C)
    x_given_k = means + gain[:, :, None, None, None] * residual
    if y is not None:
      y = jnp.asarray(y)
      if y.shape != z.shape[:1]:
        raise ValueError(f"labels y have shape {y.shape}; expected ({z.shape[0]},)")
      return jnp.take_along_axis(x_given_k, y[:, None, None, None, None].astype(jnp.int32), 1)[:, 0]
    dim = np.prod(z.shape[1:])
    sq_dist = jnp.sum(residual ** 2, axis=(2, 3, 4))  # (B, M)
    log_weights = jnp.log(self.weights.astype(dtype) / jnp.sum(self.weights.astype(dtype)))
    log_lik = -0.5 * (sq_dist / total_var + dim * jnp.log(total_var))
    resp = jax.nn.softmax(log_weights + log_lik, axis=1)  # (B, M)
    return jnp.einsum("bm,bmhwc->bhwc", resp, x_given_k)

  def sample(self, key, n: int) -> Tuple[jax.Array, jax.Array]:
    """n draws: (x (n, H, W, C), labels (n,) int32)."""
    k_label, k_noise = jax.random.split(key)
    labels = jax.random.categorical(k_label, jnp.log(self.weights), shape=(n,)).astype(jnp.int32)
    noise = jax.random.normal(k_noise, (n,) + self.means.shape[1:], self.means.dtype)
    std = jnp.sqrt(self.variances)[labels][:, None, None, None]
    return self.means[labels] + std * noise, labels


def gaussian_flow(z_from, mean, variance, logsnr_from, logsnr_to):
  """Exact PF-ODE map of the data N(mean, variance I) from logsnr_from to logsnr_to.

  Each standardised coordinate (z - alpha mean)/sqrt(alpha^2 variance + sigma^2) is constant
  along the flow. z_from (B, H, W, C); mean broadcastable to it; log-SNRs scalars or (B,).
  """
  z_from = jnp.asarray(z_from)
  a0, s0 = diffusion.alpha_sigma(diffusion._expand(jnp.asarray(logsnr_from, z_from.dtype), z_from))
  a1, s1 = diffusion.alpha_sigma(diffusion._expand(jnp.asarray(logsnr_to, z_from.dtype), z_from))
  scale = jnp.sqrt((a1 ** 2 * variance + s1 ** 2) / (a0 ** 2 * variance + s0 ** 2))
  return a1 * mean + scale * (z_from - a0 * mean)


def digits_mixture(image_size: int = 8) -> GaussianMixture:
  """One component per class of sklearn's digits (offline), pixels in [-1, 1].

  Class means, isotropic per-class variance (mean squared deviation over pixels and
  examples) and class-frequency weights; means (10, image_size, image_size, 1). Sizes other
  than 8 resize the images bilinearly before the statistics are taken.
  """
  if int(image_size) != image_size or image_size < 1:
    raise ValueError(f"image_size={image_size!r}; expected a positive integer")
  from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
  digits = load_digits()
  images = np.asarray(digits.images, np.float64) / 8.0 - 1.0  # [0, 16] -> [-1, 1]
  if image_size != images.shape[1]:
    images = np.asarray(jax.image.resize(
        jnp.asarray(images, jnp.float32), (images.shape[0], image_size, image_size), "bilinear"),
        np.float64)
  labels = np.asarray(digits.target)
  classes = np.unique(labels)
  means = np.stack([images[labels == c].mean(0) for c in classes])
  variances = np.array([((images[labels == c] - means[i]) ** 2).mean()
                        for i, c in enumerate(classes)])
  weights = np.array([(labels == c).mean() for c in classes])
  return GaussianMixture(means=jnp.asarray(means[..., None], jnp.float32),
                         variances=jnp.asarray(variances, jnp.float32),
                         weights=jnp.asarray(weights, jnp.float32))
