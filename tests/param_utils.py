"""Random parameter trees for tests: numpy-filled from shapes, so no init is compiled."""
import jax
import numpy as np


def random_params(shapes, seed: int = 0, scale: float = 0.05):
  """A tree like `shapes` (ShapeDtypeStructs or arrays) of float32 N(0, scale^2) values."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def assert_trees_close(actual, expected, rtol=1e-5):
  """Each leaf within rtol of its largest magnitude.

  Some gradients are zero in exact arithmetic (a bias just before a GroupNorm with one channel
  per group, attention key biases) and hold only rounding noise, which no relative test can
  compare; so each leaf's scale is floored at 1e-2 of the largest value in the whole tree.
  """
  actual = [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(actual)]
  expected = [np.asarray(e, np.float64) for e in jax.tree_util.tree_leaves(expected)]
  assert len(actual) == len(expected)
  floor = 1e-2 * max(np.abs(e).max() for e in expected)
  for a, e in zip(actual, expected):
    assert a.shape == e.shape
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * max(np.abs(e).max(), floor, 1e-30))
