"""TimeConv: a convolution along the K output times, parameterised in Fourier space.

DSNO's temporal convolution layer (Zheng et al., ICML 2023, Section 3 and Figure 1): the
first `num_modes` Fourier coefficients along time are mixed across channels by learned
complex weights. Two formulations of the same function, chosen by dsno_jax.backend:
  "fft": jnp.fft.rfft / irfft along the time axis (accelerators have native FFTs);
  "dft": the K-point real DFT and its inverse as small matmuls with cosine/sine matrices,
    faster on XLA:CPU for the few output times DSNO uses (4 in the paper).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import backend


def _uniform_scaled(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype) * scale
  return init


def dft_matrices(k: int, modes: int):
  """Real matrices of the K-point rfft (first `modes` bins) and of irfft(n=K) from them.

  rfft: Re X_f = sum_t cos(2 pi f t / K) x_t, Im X_f = -sum_t sin(2 pi f t / K) x_t.
  irfft: x_t = sum_f c_f (Re Y_f cos(2 pi f t / K) - Im Y_f sin(2 pi f t / K)) / K with
  c_f = 1 at DC and Nyquist, 2 elsewhere; irfft ignores the imaginary DC and Nyquist parts,
  and so do these (their sines are 0).
  """
  f = np.arange(modes)[:, None]
  t = np.arange(k)[None, :]
  angle = 2 * np.pi * f * t / k
  weight = np.where((f == 0) | (2 * f == k), 1.0, 2.0) / k
  matrices = (np.cos(angle), -np.sin(angle), (weight * np.cos(angle)).T,
              (-weight * np.sin(angle)).T)
  return [jnp.asarray(m, jnp.float32) for m in matrices]


def _spectral_update_fft(x, w, k: int, used: int):
  spectrum = jnp.fft.rfft(x, axis=1)  # (B, K//2+1, H, W, C)
  y = jnp.einsum("bfhwi,iof->bfhwo", spectrum[:, :used], w[..., :used])
  y = jnp.pad(y, ((0, 0), (0, spectrum.shape[1] - used), (0, 0), (0, 0), (0, 0)))
  return jnp.fft.irfft(y, n=k, axis=1)


def _spectral_update_dft(x, w_real, w_imag, k: int, used: int):
  cos, sin, inv_cos, inv_sin = dft_matrices(k, used)
  xr = jnp.einsum("ft,bthwc->bfhwc", cos, x)
  xi = jnp.einsum("ft,bthwc->bfhwc", sin, x)
  mix = lambda a, w: jnp.einsum("bfhwi,iof->bfhwo", a, w[..., :used])
  yr = mix(xr, w_real) - mix(xi, w_imag)
  yi = mix(xr, w_imag) + mix(xi, w_real)
  return (jnp.einsum("tf,bfhwo->bthwo", inv_cos, yr)
          + jnp.einsum("tf,bfhwo->bthwo", inv_sin, yi))


class TimeConv(nn.Module):
  """h + leaky_relu(irfft(W * rfft(h)[:num_modes])) along axis 1 (time), in float32.

  h: (B, K, H, W, C) -> (B, K, H, W, C). Weights `weight_real`/`weight_imag` are
  (C_in, C_out, num_modes); frequencies at or above num_modes pass nothing.
  """
  num_modes: int = 2
  # "fft" | "dft" (see the module docstring); by default the backend's choice
  formulation: str = dataclasses.field(default_factory=backend.time_conv_formulation)

  @nn.compact
  def __call__(self, h):
    if self.formulation not in backend.TIME_CONV_FORMULATIONS:
      raise ValueError(f"TimeConv formulation={self.formulation!r}; expected one of "
                       f"{backend.TIME_CONV_FORMULATIONS}")
    c = h.shape[-1]
    k = h.shape[1]
    init = _uniform_scaled(1.0 / (c * c))
    shape = (c, c, self.num_modes)
    w_real = self.param("weight_real", init, shape, jnp.float32)
    w_imag = self.param("weight_imag", init, shape, jnp.float32)
    x = h.astype(jnp.float32)
    used = min(self.num_modes, k // 2 + 1)
    if self.formulation == "dft":
      update = _spectral_update_dft(x, w_real, w_imag, k, used)
    else:
      update = _spectral_update_fft(x, w_real + 1j * w_imag, k, used)
    return (x + nn.leaky_relu(update, 0.01)).astype(h.dtype)
