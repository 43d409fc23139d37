"""Random parameter trees for tests: numpy-filled from shapes, so no init is compiled."""
import jax
import numpy as np


def random_params(shapes, seed: int = 0, scale: float = 0.05):
  """A tree like `shapes` (ShapeDtypeStructs or arrays) of float32 N(0, scale^2) values."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)
