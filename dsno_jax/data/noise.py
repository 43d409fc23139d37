"""Seeded noise and labels per example index, shared by the trajectories and the samples."""
from typing import Tuple

import jax
import jax.numpy as jnp


def example_inputs(indices, *, seed: int, image_shape: Tuple[int, ...], num_classes: int):
  """(noise (B, H, W, C), labels (B,) int32) of examples `indices` (B,); jit-able.

  Example i's key is fold_in(PRNGKey(seed), i), split in two: one draws its noise, the other
  its label (uniform over classes; 0 when unconditional). Any example can thus be regenerated
  alone, on any number of devices; split keys keep the label independent of the noise.
  """
  keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i)))(
      jnp.asarray(indices))
  noise = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(keys[:, 0])
  if num_classes > 1:
    labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes, jnp.int32))(keys[:, 1])
  else:
    labels = jnp.zeros(jnp.shape(indices), jnp.int32)
  return noise, labels
