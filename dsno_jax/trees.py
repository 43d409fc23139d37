"""Parameter trees by path: flattening, and the one check that a tree has the expected shapes."""
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax
import numpy as np

Path = str  # "down_0/block_1/conv1/kernel"


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten(tree) -> Dict[Path, Any]:
  """{"a/b/c": leaf} of a nested dict (or any pytree); `None` leaves are left out."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves
          if leaf is not None}


def unflatten(flat: Mapping[Path, Any]) -> Dict:
  """The nested dict of {"a/b/c": leaf}."""
  out: Dict = {}
  for path, leaf in flat.items():
    node = out
    *parents, name = path.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = leaf
  return out


def shapes(tree) -> Dict[Path, Tuple[int, ...]]:
  """{path: shape} of a tree of arrays, ShapeDtypeStructs or orbax array metadata."""
  return {path: tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))
          for path, leaf in flatten(tree).items()}


class Mismatch(NamedTuple):
  """How a given tree differs from an expected one (all lists of paths or descriptions)."""
  missing: List[Path]
  unexpected: List[Path]
  wrong: List[str]  # "path: (a, b), expected (c, d)"

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.wrong)

  def describe(self, limit: Optional[int] = None) -> str:
    """Three lines: missing, unexpected, wrongly shaped (each cut at `limit` entries if given)."""
    def cut(items):
      if limit is None or len(items) <= limit:
        return str(items)
      return f"{items[:limit]} ... ({len(items)} in all)"
    return (f"  missing: {cut(self.missing)}\n  unexpected: {cut(self.unexpected)}\n"
            f"  wrongly shaped: {cut(self.wrong)}")


def compare(given: Mapping[Path, Tuple[int, ...]],
            expected: Mapping[Path, Tuple[int, ...]]) -> Mismatch:
  """Paths in `expected` but not `given`, the reverse, and paths whose shapes differ."""
  wrong = [f"{p}: {tuple(given[p])}, expected {tuple(expected[p])}"
           for p in sorted(expected) if p in given and tuple(given[p]) != tuple(expected[p])]
  return Mismatch(sorted(set(expected) - set(given)), sorted(set(given) - set(expected)), wrong)


def check_shapes(given, expected, what: str) -> None:
  """ValueError "{what}:" with every missing, unexpected and wrongly shaped entry.

  `given` and `expected` are trees (or flat {path: leaf} dicts) of arrays or shapes.
  """
  mismatch = compare(_as_shapes(given), _as_shapes(expected))
  if mismatch:
    raise ValueError(f"{what}:\n{mismatch.describe()}")


def _as_shapes(tree) -> Dict[Path, Tuple[int, ...]]:
  if isinstance(tree, Mapping) and all(isinstance(v, tuple) for v in tree.values()):
    return {k: tuple(v) for k, v in tree.items()}
  return shapes(tree)
