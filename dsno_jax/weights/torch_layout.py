"""Torch's parameter layout turned into Flax's, shared so that each network's converter is only a
table of names."""
from typing import Dict, Mapping, Tuple

import numpy as np

FlaxPath = Tuple[str, ...]


def _is_conv_kernel(flax_path: FlaxPath, shape: Tuple[int, ...]) -> bool:
  return flax_path[-1] == "kernel" and len(shape) == 4


def torch_shapes(names: Mapping[str, FlaxPath],
                 flax_shapes: Mapping[FlaxPath, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
  """{torch name: the shape torch stores it in} for {torch name: Flax path}, so that a state
  dict can be checked in its own names: conv kernels (kH, kW, I, O) are (O, I, kH, kW) there."""
  out = {}
  for name, path in names.items():
    shape = tuple(flax_shapes[path])
    out[name] = (shape[3], shape[2], shape[0], shape[1]) if _is_conv_kernel(path, shape) else shape
  return out


def to_flax(state_dict: Mapping[str, np.ndarray],
            names: Mapping[str, FlaxPath]) -> Dict[FlaxPath, np.ndarray]:
  """{Flax path: float32 array} of the entries `names` of a (shape-checked) torch state dict;
  conv kernels go from torch's (O, I, kH, kW) to Flax's (kH, kW, I, O)."""
  out = {}
  for name, path in names.items():
    value = np.asarray(state_dict[name], np.float32)
    out[path] = value.transpose(2, 3, 1, 0) if _is_conv_kernel(path, value.shape) else value
  return out
