"""The one writer and reader of converted weight files, so that every network's `.npz` has one
layout: a float32 array per parameter under its '/'-joined path ("vgg/conv1_1/kernel")."""
import hashlib
import io
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from dsno_jax import storage, trees

Key = Union[str, Tuple[str, ...]]


def path_of(key: Key) -> str:
  """The '/'-joined path of a key, so that string and tuple keys name a parameter alike."""
  return key if isinstance(key, str) else "/".join(key)


def flat_paths(params) -> Dict[str, Any]:
  """{'a/b/c': leaf} of a nested tree or of a flat dict keyed by path strings or tuples."""
  if isinstance(params, Mapping) and not any(isinstance(v, Mapping) for v in params.values()):
    return {path_of(k): v for k, v in params.items()}
  return trees.flatten(params)


def sha256_of(path: str) -> str:
  """The hex SHA-256 of a file, read in blocks, to tell a published weight file from another."""
  digest = hashlib.sha256()
  with storage.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def save(path: str, params) -> None:
  """Writes `params` (a nested tree, or a flat dict keyed by path strings or tuples) as float32
  arrays under '/'-joined paths, through a renamed temporary file so no reader sees half a file."""
  flat = {p: np.asarray(v, np.float32) for p, v in flat_paths(params).items()}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  storage.write_bytes(path, buffer.getvalue())


def load(path: str, missing_message: Optional[str] = None) -> Dict[str, np.ndarray]:
  """{'a/b/c': array} of a converted `.npz`, read without pickle so that a file runs no code.

  Raises FileNotFoundError (with `missing_message`, which should say how to make the file)
  when there is no file at `path`, and ValueError when the file is not an `.npz` of arrays.
  """
  if not path or not storage.isfile(path):
    raise FileNotFoundError(missing_message or f"weight file {path!r} does not exist")
  data = io.BytesIO(storage.read_bytes(path))
  if not zipfile.is_zipfile(data):
    raise ValueError(f"{path} is not an .npz of converted weights (not a zip archive)")
  try:
    with np.load(data, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not an .npz of converted weights ({e})") from None


def check_shapes(flat, expected: Mapping[Key, Tuple[int, ...]], what: str) -> None:
  """ValueError "{what}:" listing every missing, unexpected and wrongly shaped array, in the one
  format of `dsno_jax.trees`, for dicts of arrays keyed by path strings or tuples (or trees)."""
  trees.check_shapes({p: tuple(np.shape(v)) for p, v in flat_paths(flat).items()},
                     {path_of(k): tuple(v) for k, v in expected.items()}, what)
