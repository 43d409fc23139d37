"""A small Flax CNN for the digits: penultimate features for FD-digits, logits for sample accuracy.

Inception features mean nothing on 8x8 digits, so the same FID metric runs on this
classifier's 128-d penultimate (post-ReLU) features instead ("FD-digits"). It is
trained at the resolution the pipeline uses (8x8, or 16x16 upsampled); the first dense
layer's width fixes that resolution, and inputs of any other size are refused.
Images are (N, H, W, C) floats in [-1, 1], the project's data range.
"""
import functools
from typing import Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dsno_jax.data import images as images_lib
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir

NUM_CLASSES = 10
FEATURE_DIM = 128
ARCHITECTURE = "digits_cnn"


class Conv3x3(nn.Module):
  """3x3 'SAME' convolution as one matmul over the nine shifted copies of the input.

  Same parameters as nn.Conv ((3, 3, C, F) kernel, bias); written this way because on CPU
  one matmul trains this tiny network faster than XLA's convolution at 8x8 inputs.
  """
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    """x (N, H, W, C) -> (N, ceil(H/stride), ceil(W/stride), features)."""
    _, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    s = self.stride
    rows, cols = s * (-(-h // s) - 1) + 1, s * (-(-w // s) - 1) + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, dy:dy + rows:s, dx:dx + cols:s, :]
                               for dy in range(3) for dx in range(3)], axis=-1)
    return patches @ kernel.reshape(9 * c, self.features) + bias


class DigitsClassifier(nn.Module):
  """conv 16 -> conv 32 /2 -> dense 128 (features) -> dense 10 (logits); small for CPU."""

  @nn.compact
  def __call__(self, images):
    """images (N, H, W, C) -> (features (N, 128), logits (N, 10))."""
    x = nn.relu(Conv3x3(16, name="conv_0")(images))
    x = nn.relu(Conv3x3(32, stride=2, name="conv_1")(x))
    features = nn.relu(nn.Dense(FEATURE_DIM, name="features")(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(NUM_CLASSES, name="logits")(features)


def _flat_size(height: int, width: int) -> int:
  # One stride-2 'SAME' convolution of 32 channels.
  return -(-height // 2) * -(-width // 2) * 32


def _check_images(images, params=None):
  if images.ndim != 4:
    raise ValueError(f"images of shape {images.shape}; expected (N, H, W, C) in [-1, 1]")
  if params is None:
    return
  channels = params["conv_0"]["kernel"].shape[2]
  flat = params["features"]["kernel"].shape[0]
  _, h, w, c = images.shape
  if c != channels or _flat_size(h, w) != flat:
    raise ValueError(f"images of shape {images.shape} for a classifier trained on "
                     f"{channels}-channel images whose size gives {flat} flattened features "
                     f"(this size gives {_flat_size(h, w)}); resize to the training resolution")


@jax.jit
def _apply(params, images):
  return DigitsClassifier().apply({"params": params}, images.astype(jnp.float32))


def classifier_features(params, images) -> jnp.ndarray:
  """Penultimate features (N, 128) of images (N, H, W, C) in [-1, 1]."""
  _check_images(images, params)
  return _apply(params, images)[0]


def classifier_logits(params, images) -> jnp.ndarray:
  """Class logits (N, 10) of images (N, H, W, C) in [-1, 1]."""
  _check_images(images, params)
  return _apply(params, images)[1]


def accuracy(params, images, labels) -> float:
  """Fraction of images (N, H, W, C) whose arg-max class equals labels (N,)."""
  labels = np.asarray(labels)
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels of shape {labels.shape} for {images.shape[0]} images")
  predicted = np.asarray(jnp.argmax(classifier_logits(params, images), axis=-1))
  return float(np.mean(predicted == labels))


def _optimizer(steps: int, learning_rate: float):
  return optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-4)


def _init_params(rng: np.random.Generator, image_shape):
  """LeCun-normal kernels, zero biases; drawn with numpy (compiling jax's RNG costs seconds)."""
  shapes = jax.eval_shape(DigitsClassifier().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))["params"]

  def draw(leaf):
    if len(leaf.shape) == 1:
      return jnp.zeros(leaf.shape, jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map(draw, shapes)


# A Python loop over this step, not a lax.scan: XLA:CPU runs these layers several times
# slower inside a while loop. Batches are drawn on the host: no RNG to compile.
@functools.partial(jax.jit, static_argnames=("steps", "learning_rate"), donate_argnums=(0, 1))
def _train_step(params, opt_state, images, labels, batch, shift, *, steps: int,
                learning_rate: float):
  """One AdamW step on images[batch], rolled by `shift` (2,) pixels (samples need not be centred)."""
  x = jnp.roll(images[batch], shift, axis=(1, 2))

  def loss_fn(params):
    logits = DigitsClassifier().apply({"params": params}, x)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels[batch]).mean()

  grads = jax.grad(loss_fn)(params)
  updates, opt_state = _optimizer(steps, learning_rate).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train_classifier(images, labels, *, seed: int, steps: int = 600, batch_size: int = 64,
                     learning_rate: float = 2e-3):
  """Trains the digits classifier on images (N, H, W, C) in [-1, 1] and labels (N,) in 0..9.

  Returns the parameters; the input resolution is the one it will accept afterwards.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  _check_images(images)
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels of shape {labels.shape} and dtype {labels.dtype}; expected "
                     f"({images.shape[0]},) integers")
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"labels span {labels.min()}..{labels.max()}; expected 0..{NUM_CLASSES - 1}")
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps={steps}, batch_size={batch_size}; expected positive integers")
  rng = np.random.default_rng(seed)
  params = _init_params(rng, images.shape[1:])
  opt_state = _optimizer(steps, learning_rate).init(params)
  images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  for _ in range(steps):
    batch = rng.integers(0, images.shape[0], batch_size)
    shift = rng.integers(-1, 2, 2)
    params, opt_state = _train_step(params, opt_state, images, labels, batch, shift,
                                    steps=steps, learning_rate=learning_rate)
  return params


def classifier_config(params) -> ml_collections.ConfigDict:
  """What `save_classifier` records next to the parameters (architecture and input size)."""
  return ml_collections.ConfigDict({
      "architecture": ARCHITECTURE,
      "channels": int(params["conv_0"]["kernel"].shape[2]),
      "flat_features": int(params["features"]["kernel"].shape[0]),
      "feature_dim": FEATURE_DIM,
      "num_classes": NUM_CLASSES,
  })


def save_classifier(path: str, params, image_size: int) -> str:
  """Saves params with their config (role "classifier") through `model_io.save_model`."""
  config = classifier_config(params)
  config.image_size = int(image_size)
  if _flat_size(image_size, image_size) != config.flat_features:
    raise ValueError(f"image_size={image_size} does not match these parameters (trained on "
                     f"images that flatten to {config.flat_features} features)")
  return model_io.save_model(path, params, config, role="classifier")


def load_classifier(path: str) -> Tuple[dict, ml_collections.ConfigDict]:
  """(params, config) of a `save_classifier` export; ValueError for another kind of model."""
  params, config, role = model_io.load_model(path)
  if role != "classifier" or config.get("architecture") != ARCHITECTURE:
    raise ValueError(f"{path} holds a {role} ({config.get('architecture')!r}); expected a "
                     f"{ARCHITECTURE!r} classifier")
  return jax.tree_util.tree_map(jnp.asarray, params), config


def _to_unit_range(images: np.ndarray) -> np.ndarray:
  return np.asarray(images, np.float32) / 127.5 - 1.0


def ensure_classifier(config, workdir: str):
  """The FD-digits classifier of WORKDIR/classifier, trained on the digits train split if absent."""
  path = Workdir(workdir).classifier
  if model_io.is_export(path):
    params, _ = load_classifier(path)
    return params
  train = images_lib.load_source(config, workdir, config.data.train_split)
  test = images_lib.load_source(config, workdir, config.data.eval_split)
  params = train_classifier(_to_unit_range(train.images), train.labels,
                            seed=config.eval.classifier_seed, steps=config.eval.classifier_steps)
  logging.info("digits classifier: test accuracy %.3f",
               accuracy(params, _to_unit_range(test.images), test.labels))
  save_classifier(path, params, config.data.image_size)  # every process: orbax saves together
  return params


def uint8_feature_fns(params):
  """(features, logits) of uint8 images (N, H, W, C), as numpy."""
  features = jax.jit(lambda x: classifier_features(params, x))
  logits = jax.jit(lambda x: classifier_logits(params, x))
  return (lambda u8: np.asarray(features(_to_unit_range(u8))),
          lambda u8: np.asarray(logits(_to_unit_range(u8))))


def uint8_outputs(params, images_u8) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """(features (N, 128), logits (N, 10)) of uint8 images (N, H, W, C) in one pass; traceable,
  for running over a mesh (`parallel.jit_rowwise`)."""
  _check_images(images_u8, params)
  return DigitsClassifier().apply({"params": params}, images_u8.astype(jnp.float32) / 127.5 - 1.0)
