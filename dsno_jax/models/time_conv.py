"""TimeConv: a convolution along the K output times, parameterised in Fourier space."""
import flax.linen as nn
import jax
import jax.numpy as jnp


def _uniform_scaled(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype) * scale
  return init


class TimeConv(nn.Module):
  """h + leaky_relu(irfft(W * rfft(h)[:num_modes])) along axis 1 (time), in float32.

  h: (B, K, H, W, C) -> (B, K, H, W, C). Weights `weight_real`/`weight_imag` are
  (C_in, C_out, num_modes); frequencies at or above num_modes pass nothing.
  """
  num_modes: int = 2

  @nn.compact
  def __call__(self, h):
    c = h.shape[-1]
    k = h.shape[1]
    init = _uniform_scaled(1.0 / (c * c))
    shape = (c, c, self.num_modes)
    w = (self.param("weight_real", init, shape, jnp.float32)
         + 1j * self.param("weight_imag", init, shape, jnp.float32))
    x = h.astype(jnp.float32)
    spectrum = jnp.fft.rfft(x, axis=1)  # (B, K//2+1, H, W, C)
    used = min(self.num_modes, spectrum.shape[1])
    y = jnp.einsum("bfhwi,iof->bfhwo", spectrum[:, :used], w[..., :used])
    y = jnp.pad(y, ((0, 0), (0, spectrum.shape[1] - used), (0, 0), (0, 0), (0, 0)))
    update = jnp.fft.irfft(y, n=k, axis=1)
    return (x + nn.leaky_relu(update, 0.01)).astype(h.dtype)
