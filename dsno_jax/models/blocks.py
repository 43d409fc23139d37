"""Building blocks of the Progressive-Distillation UNet: embeddings, ResnetBlock, AttnBlock.

The layout (names, shapes, GroupNorm of 32 groups, FiLM from the embedding) is that of the
Progressive-Distillation checkpoints (Salimans & Ho, ICLR 2022), so they load unchanged.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax.models.norm import GroupNorm

Dtype = Any


def group_norm(name: str, dtype: Dtype) -> GroupNorm:
  """PD's GroupNorm (32 groups, epsilon 1e-6); call it with film_scale/film_shift/swish."""
  return GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)


def conv3x3(features: int, dtype: Dtype, name: str, strides=(1, 1),
            kernel_init=nn.initializers.lecun_normal()) -> nn.Conv:
  """PD's 3x3 "SAME" convolution with bias: float32 parameters, computed in `dtype`."""
  return nn.Conv(features, (3, 3), strides=strides, padding="SAME", kernel_init=kernel_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def logsnr_input(logsnr, kind: str, scale_range=(-10.0, 10.0)):
  """Maps log-SNR to the scalar the sinusoidal embedding sees (in [0, 1] for inv_cos)."""
  if kind == "inv_cos":
    return jnp.arctan(jnp.exp(-0.5 * jnp.clip(logsnr, -20.0, 20.0))) / (0.5 * np.pi)
  if kind == "linear":
    return (logsnr - scale_range[0]) / (scale_range[1] - scale_range[0])
  if kind == "sigmoid":
    return jax.nn.sigmoid(logsnr)
  raise ValueError(f"logsnr_input_type={kind!r}; expected 'inv_cos', 'linear' or 'sigmoid'")


def sinusoidal_embedding(s, dim: int):
  """(N,) -> (N, dim): [sin, cos] of 1000*s at frequencies exp(-log(1e4) i/(half-1))."""
  half = dim // 2
  freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  angles = 1000.0 * s.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample_nearest(x):
  """(N, H, W, C) -> (N, 2H, 2W, C) by repeating each pixel."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return x.reshape(n, 2 * h, 2 * w, c)


def downsample_avg(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv, FiLM from the embedding, GroupNorm-swish-dropout-conv, residual.

  x: (N, H, W, C), emb: (N, emb_ch), one embedding row per frame.
  """
  dropout: float
  out_ch: Optional[int] = None
  resample: Optional[str] = None  # None | "up" | "down"
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    c = x.shape[-1]
    out_ch = c if self.out_ch is None else self.out_ch
    h = group_norm("norm1", self.dtype)(x, swish=True)
    if self.resample is not None:
      resample = {"up": upsample_nearest, "down": downsample_avg}[self.resample]
      h, x = resample(h), resample(x)
    h = conv3x3(out_ch, self.dtype, "conv1")(h)
    film = nn.Dense(2 * out_ch, dtype=self.dtype, name="temb_proj")(nn.swish(emb))
    scale, shift = jnp.split(film, 2, axis=-1)
    h = group_norm("norm2", self.dtype)(h, scale, shift, swish=True)
    h = nn.Dropout(rate=self.dropout)(h, deterministic=self.deterministic)
    h = conv3x3(out_ch, self.dtype, "conv2", kernel_init=nn.initializers.zeros)(h)
    if c != out_ch:
      x = nn.Dense(out_ch, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H*W positions of each frame, residual."""
  num_heads: Optional[int]
  head_dim: Optional[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, hgt, wid, c = x.shape
    num_heads, head_dim = attention_heads(c, self.num_heads, self.head_dim)
    h = group_norm("norm", self.dtype)(x).reshape(n, hgt * wid, c)
    qkv = [nn.DenseGeneral((num_heads, head_dim), dtype=self.dtype, name=name)(h)
           for name in ("q", "k", "v")]
    h = nn.dot_product_attention(*qkv, dtype=self.dtype)
    h = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                        name="proj_out")(h)
    return x + h.reshape(x.shape)


def attention_heads(channels: int, num_heads: Optional[int], head_dim: Optional[int]):
  """(num_heads, head_dim) from exactly one of the two."""
  if (num_heads is None) == (head_dim is None):
    raise ValueError(f"give exactly one of num_heads={num_heads} and head_dim={head_dim}")
  if head_dim is None:
    if channels % num_heads:
      raise ValueError(f"{channels} channels do not split into num_heads={num_heads}")
    return num_heads, channels // num_heads
  if channels % head_dim:
    raise ValueError(f"{channels} channels do not split into heads of head_dim={head_dim}")
  return channels // head_dim, head_dim
