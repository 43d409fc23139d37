"""Seeded noise and labels per example index, shared by the trajectories and the samples."""
from typing import Tuple

import jax
import jax.numpy as jnp


def example_inputs(indices, *, seed: int, image_shape: Tuple[int, ...], num_classes: int):
  """(noise (B, H, W, C), labels (B,) int32) of examples `indices` (B,); jit-able.

  Example i's noise is drawn from fold_in(PRNGKey(seed), i) and its label (uniform over
  classes; 0 when unconditional) from fold_in of that key with 1, so any example can be
  regenerated alone, on any number of devices.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(indices)
  noise = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(keys)
  if num_classes > 1:
    labels = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0,
                                                   num_classes, jnp.int32))(keys)
  else:
    labels = jnp.zeros(indices.shape, jnp.int32)
  return noise, labels
