"""VGG16's convolutional trunk (torchvision's `features`) in Flax, NHWC: LPIPS's five taps."""
import functools
from typing import Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

# Output channels of each conv, grouped by block; a 2x2 max-pool follows every block.
BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")  # the last ReLU of each block
TAP_CHANNELS = tuple(block[-1] for block in BLOCKS)
POOLS_BEFORE_LAST_TAP = len(BLOCKS) - 1
MIN_IMAGE_SIZE = 2 ** POOLS_BEFORE_LAST_TAP  # relu5_3 is at 1/16 resolution (floored)


def conv_names() -> Tuple[str, ...]:
  """('conv1_1', 'conv1_2', 'conv2_1', ..., 'conv5_3'): the 13 convs in order."""
  return tuple(f"conv{b + 1}_{i + 1}" for b, block in enumerate(BLOCKS) for i in range(len(block)))


def torch_feature_indices() -> Dict[str, int]:
  """{'conv1_1': 0, 'conv1_2': 2, 'conv2_1': 5, ...}: each conv's index in torchvision's
  `vgg16().features` (a ReLU after every conv and a max-pool after every block take an index)."""
  indices, index = {}, 0
  names = iter(conv_names())
  for block in BLOCKS:
    for _ in block:
      indices[next(names)] = index
      index += 2  # conv, ReLU
    index += 1  # max-pool
  return indices


class VGG16Features(nn.Module):
  """images (N, H, W, 3), already scaled for VGG -> the five taps {relu1_2: (N, H, W, 64), ...,
  relu5_3: (N, H/16, W/16, 512)} (sizes floored at each pool, as torch's MaxPool2d(2, 2)).

  3x3 convs with zero padding 1 and bias, ReLU, 2x2/2 max-pools. torchvision's fifth max-pool
  (`features[30]`) comes after the last tap and is left out; so is the classifier.
  """
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x) -> Dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(f"VGG16 input of shape {x.shape}; expected (N, H, W, 3) with H, W >= "
                       f"{MIN_IMAGE_SIZE} (relu5_3 sits after {POOLS_BEFORE_LAST_TAP} max-pools)")
    taps = {}
    names = iter(conv_names())
    for b, (block, tap) in enumerate(zip(BLOCKS, TAPS)):
      if b > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for features in block:
        x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), precision=self.precision,
                    name=next(names))(x)
        x = nn.relu(x)
      taps[tap] = x
    return taps


@functools.lru_cache(maxsize=1)
def param_shapes() -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{('conv1_1', 'kernel'): (3, 3, 3, 64), ...} of `VGG16Features`, without computing anything."""
  x = jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(VGG16Features().init, jax.random.PRNGKey(0), x)["params"]
  return {path: tuple(v.shape) for path, v in flax.traverse_util.flatten_dict(shapes).items()}
