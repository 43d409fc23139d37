"""A TFDS builder for scikit-learn's bundled 8x8 digits (offline), at 8, 16 or 32 pixels.

The 1,797 images (10 classes) are split once, stratified by class with seed 0, into 1,437
train and 360 test examples; every config uses the same split. Pixels (0..16 in the
source) become uint8 round(v * 255 / 16), white ink on black, one channel. `8x8` keeps the
native resolution; `16x16` and `32x32` upsample bilinearly (TF half-pixel centres) by 2x
and 4x, which the UNet handles with more levels. No download happens: the data ship
inside scikit-learn.
"""
import os

import numpy as np
import tensorflow_datasets as tfds

from dsno_jax import storage

IMAGE_SIZES = (8, 16, 32)
NUM_CLASSES = 10
NUM_TEST = 360
SPLIT_SEED = 0


class DigitsConfig(tfds.core.BuilderConfig):
  """One output resolution of the digits."""

  def __init__(self, *, image_size: int, **kwargs):
    super().__init__(name=f"{image_size}x{image_size}", **kwargs)
    self.image_size = image_size


def train_test_indices():
  """(train, test) indices into load_digits(), stratified by class, fixed by SPLIT_SEED."""
  from sklearn import datasets, model_selection
  labels = datasets.load_digits().target
  return model_selection.train_test_split(
      np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED)


def digit_images(image_size: int):
  """All 1,797 digits as uint8 (N, image_size, image_size, 1) and labels (N,)."""
  from sklearn import datasets
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)  # (N, 8, 8, 1)
  if image_size != 8:
    import tensorflow as tf
    images = tf.image.resize(images, (image_size, image_size), method="bilinear").numpy()
  images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  return images, digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits as a TFDS data set (`image` uint8 (S, S, 1), `label` 0..9)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 1437/360 split with seed 0."}
  BUILDER_CONFIGS = [DigitsConfig(image_size=s, description=f"digits at {s}x{s} pixels")
                     for s in IMAGE_SIZES]

  # No checksums file to look up (nothing is downloaded); TFDS's own lookup of this module's
  # path needs the `importlib_resources` back-port, which is not always installed.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 1)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    train, test = train_test_indices()
    return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

  def _generate_examples(self, indices):
    images, labels = digit_images(self.builder_config.image_size)
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}


def prepare(data_dir: str, image_size: int, file_format: str = "tfrecord") -> Digits:
  """The digits builder at `image_size`, built into data_dir first if it is not there yet.

  file_format ("tfrecord" | "array_record") applies only when it builds. A remote data_dir
  (`gs://`) is built in its local cache (`storage.cache_path`) instead: the data derive,
  deterministically, from scikit-learn's copy, and TFDS's writers cannot all reach a bucket.
  """
  data_dir = storage.cache_path(data_dir)
  if image_size not in IMAGE_SIZES:
    raise ValueError(f"data.image_size={image_size} for the digits; expected one of {IMAGE_SIZES}")
  builder = Digits(config=f"{image_size}x{image_size}", data_dir=os.path.abspath(data_dir))
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(download_dir=os.path.join(os.path.abspath(data_dir),
                                                             "downloads"), file_format=file_format)
    except FileExistsError:  # another process of this machine (a host of the run) built it first
      builder = Digits(config=f"{image_size}x{image_size}", data_dir=os.path.abspath(data_dir))
      if not builder.is_prepared():
        raise
  return builder
