"""The small classifier head of DMD2's GAN term: one logit per image from a UNet's middle
features (Yin et al. 2024, "Improved Distribution Matching Distillation", Sec. 4.3)."""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dsno_jax.models.blocks import conv3x3
from dsno_jax.models.norm import GroupNorm


class GANHead(nn.Module):
  """GroupNorm-swish-conv twice, then a spatial mean, swish and a linear logit.

  __call__(features (B, h, w, C)) -> logits (B,) float32: positive means "real". The last
  layer starts at zero, so a new head is undecided (every logit 0).
  """
  dtype: Any = jnp.float32  # compute dtype; parameters are float32

  @nn.compact
  def __call__(self, features):
    if features.ndim != 4:
      raise ValueError(f"features have shape {features.shape}; expected rank 4 (B, h, w, C)")
    channels = features.shape[-1]
    # PD's 32 groups where the width allows it (any width works)
    groups = math.gcd(32, channels)
    h = features.astype(self.dtype)
    for i in range(2):
      h = GroupNorm(num_groups=groups, epsilon=1e-6, dtype=self.dtype, name=f"norm_{i}")(
          h, swish=True)
      h = conv3x3(channels, self.dtype, f"conv_{i}")(h)
    h = nn.swish(jnp.mean(h.astype(jnp.float32), axis=(1, 2)))
    logit = nn.Dense(1, kernel_init=nn.initializers.zeros, param_dtype=jnp.float32,
                     name="logit")(h)
    return logit[:, 0]
