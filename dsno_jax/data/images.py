"""Image data for teacher training: TFDS sources, and per-host batches fixed by (seed, step).

Sources: the project's digits builder (built offline on first use), any prepared TFDS image
data set (`cifar10`, `imagenet_resized/64x64`, ...) and a folder of images (TFDS
ImageFolder: ROOT/SPLIT/LABEL/*.png). Nothing is ever downloaded.

Order: data/loader.py's epoch permutations; the horizontal flips are drawn from the seed and
the position in the stream, so they too are the same for a resumed run, on any host count.
"""
import os
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from dsno_jax import storage
from dsno_jax.data import loader
from dsno_jax.workdir import Workdir

# Above this many bytes, a split stored as TFRecord is too big to hold in memory on every
# host: it must be prepared as array_record (random access) instead.
MAX_IN_MEMORY_BYTES = 8 * 2 ** 30


class InMemorySource:
  """Random access to uint8 images (N, H, W, C) and int labels (N,) held in memory."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels.astype(np.int32)

  def __len__(self):
    return len(self.images)

  def get(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]

  def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])


class RandomAccessSource:
  """A TFDS data source (array_record files): reads only the requested examples."""

  def __init__(self, data_source):
    self.data_source = data_source

  def __len__(self):
    return len(self.data_source)

  def get(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    examples = self.data_source.__getitems__([int(i) for i in indices])
    images = np.stack([np.asarray(e["image"]) for e in examples])
    labels = np.asarray([int(e.get("label", 0)) for e in examples], np.int32)
    return images, labels

  def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
    example = self.data_source[int(index)]
    return np.asarray(example["image"]), int(example.get("label", 0))


def default_data_dir(config, workdir: str) -> str:
  """config.data.data_dir, else WORKDIR/tfds for the digits, else TFDS's default."""
  if config.data.data_dir:
    return config.data.data_dir
  if config.data.name == "digits":
    return Workdir(workdir).tfds
  import tensorflow_datasets as tfds
  return tfds.core.constants.DATA_DIR


def _not_prepared_error(name: str, data_dir: str) -> FileNotFoundError:
  manual = (" ImageNet cannot be downloaded automatically: place the archives in "
            f"{data_dir}/downloads/manual first (see the TFDS catalogue)."
            if name.startswith("imagenet") else "")
  return FileNotFoundError(
      f"the TFDS data set {name!r} is not prepared in {data_dir}. Nothing is downloaded at run "
      f"time: prepare it once with `tfds build {name} --data_dir={data_dir} "
      f"--file_format=array_record` on a machine with internet access, or point "
      f"config.data.data_dir at a directory that holds it.{manual}")


def missing(config, workdir: str, split: Optional[str] = None) -> Optional[str]:
  """Why config.data's `split` cannot be read, saying what to do, or None; reads no images,
  so that a run can check its data before any work."""
  name, split = config.data.name, split or config.data.train_split
  if name == "digits":
    return None  # built from scikit-learn's copy on first use
  if name == "folder":
    root = config.data.data_dir
    if not root or not storage.isdir(storage.join(root, split)):
      return _folder_message(root, split)
    return None
  import tensorflow_datasets as tfds
  data_dir = default_data_dir(config, workdir)
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # unknown names raise TFDS's own DatasetNotFoundError
    return _unknown_name_message(name, e)
  if not builder.is_prepared():
    return str(_not_prepared_error(name, data_dir))
  if split not in builder.info.splits:
    return f"split {split!r} of {name!r}; expected one of {list(builder.info.splits)}"
  return None


def _unknown_name_message(name: str, error: Exception) -> str:
  return (f"data.name={name!r} is not a TFDS data set ({error}); expected 'digits', 'folder' "
          "or a TFDS name such as 'cifar10'")


def _folder_message(root: str, split: str) -> str:
  return (f"data.name='folder' needs data.data_dir=ROOT with images in ROOT/{split}/LABEL/*.png "
          f"(or .jpg); {os.path.join(root or '<unset>', split)} is not a directory")


def _center_crop_resize(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 (N, H, W, C) -> uint8 (N, size, size, C): central square, then area/bilinear."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  import tensorflow as tf
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = images[:, top:top + side, left:left + side]
  resized = tf.image.resize(square.astype(np.float32), (size, size), method="area"
                            if side > size else "bilinear", antialias=side > size).numpy()
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def _match_channels(images: np.ndarray, channels: int, name: str) -> np.ndarray:
  have = images.shape[-1]
  if have == channels:
    return images
  if have == 3 and channels == 1:
    gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
  if have == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  raise ValueError(f"data set {name!r} has {have} channels; data.channels={channels}")


def _folder_source(config, split: str) -> InMemorySource:
  import tensorflow_datasets as tfds
  root = config.data.data_dir
  if not root or not storage.isdir(storage.join(root, split)):
    raise FileNotFoundError(_folder_message(root, split))
  builder = tfds.folder_dataset.ImageFolder(storage.local_copy(root), shape=(None, None, config.data.channels))
  labels_found = builder.info.features["label"].num_classes
  classes = config.data.num_classes
  if classes > 1 and labels_found != classes:
    raise ValueError(f"{root}/{split} has {labels_found} label folders; "
                     f"data.num_classes={classes}")
  images, labels = [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    images.append(_center_crop_resize(example["image"][None], config.data.image_size)[0])
    labels.append(example["label"] if classes > 1 else 0)
  if not images:
    raise FileNotFoundError(f"no images under {root}/{split}/LABEL/")
  return InMemorySource(np.stack(images), np.asarray(labels))


def load_source(config, workdir: str, split: Optional[str] = None):
  """The image source of config.data (`get(indices) -> (uint8 images, labels)`)."""
  import tensorflow_datasets as tfds
  name, size = config.data.name, config.data.image_size
  split = split or config.data.train_split
  if name == "folder":
    return _folder_source(config, split)
  data_dir = default_data_dir(config, workdir)
  if name == "digits":
    from dsno_jax.data import digits
    builder = digits.prepare(data_dir, size)
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
      if storage.is_remote(data_dir) and builder.is_prepared():
        # ArrayRecord reads only local files, and TensorFlow's GCS client reaches no
        # emulator: the prepared version is read from its local copy
        storage.local_copy(builder.data_dir)
        data_dir = storage.cache_path(data_dir)
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e:  # unknown names raise TFDS's own DatasetNotFoundError
      raise ValueError(_unknown_name_message(name, e)) from e
    if not builder.is_prepared():
      raise _not_prepared_error(name, data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} of {name!r}; expected one of {list(builder.info.splits)}")
  info = builder.info
  shape = info.features["image"].shape
  if info.file_format and "array_record" in str(info.file_format).lower():
    source = RandomAccessSource(tfds.data_source(name, split=split, data_dir=data_dir,
                                                 download=False, try_gcs=False))
    if shape[:2] != (size, size) or shape[-1] != config.data.channels:
      raise ValueError(f"{name!r} images are {shape}; config wants {size}x{size}x"
                       f"{config.data.channels} (prepare a data set of that size)")
    return source
  num_bytes = info.splits[split].num_examples * int(np.prod([s or 1 for s in shape]))
  if num_bytes > MAX_IN_MEMORY_BYTES:
    raise ValueError(f"{name!r}/{split} is stored as {info.file_format} and holds about "
                     f"{num_bytes / 2 ** 30:.1f} GiB: too large to hold in memory on every host."
                     f" Prepare it with `tfds build {name} --data_dir={data_dir} "
                     "--file_format=array_record` for random access.")
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  images = _match_channels(_center_crop_resize(data["image"], size), config.data.channels, name)
  labels = data["label"] if "label" in data else np.zeros(len(images), np.int64)
  return InMemorySource(images, labels)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(np.float32) * (2.0 / 255.0) - 1.0


def _decode(items) -> Dict[str, np.ndarray]:
  return {"image": to_model_range(np.stack([image for _, (image, _) in items])),
          "label": np.asarray([label for _, (_, label) in items], np.int32),
          "index": np.asarray([index for index, _ in items], np.int32)}


def _mirror(item, rng: np.random.Generator):
  """Mirrors the image left-right with probability 1/2."""
  index, (image, label) = item
  return (index, (image[:, ::-1] if rng.random() < 0.5 else image, label))


def batches(source, *, global_batch_size: int, seed: int, random_flip: bool = False,
            process_index: Optional[int] = None, process_count: Optional[int] = None):
  """This host's indexable batches (a Grain MapDataset; element s is step s's batch)."""
  process_index, process_count = loader.process_of(process_index, process_count)
  return loader.batches(source, _decode, global_batch_size=global_batch_size, seed=seed,
                        process_index=process_index, process_count=process_count,
                        augment=_mirror if random_flip else None)


def batch_iterator(source, *, global_batch_size: int, seed: int, start_step: int = 0,
                   random_flip: bool = False, process_index: Optional[int] = None,
                   process_count: Optional[int] = None,
                   num_workers: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """This host's rows of every step's batch from start_step on (endless).

  Yields {"image": float32 (b, H, W, C) in [-1, 1], "label": int32 (b,), "index": int32 (b,)}
  with b = global_batch_size / process_count; batch s depends only on (seed, s).
  """
  return loader.iterate(batches(source, global_batch_size=global_batch_size, seed=seed,
                                random_flip=random_flip, process_index=process_index,
                                process_count=process_count), start_step,
                        num_workers=num_workers)
