"""The digits TFDS builder (offline), image folders, and batches fixed by (seed, step)."""
import os

import numpy as np
import pytest
from sklearn import datasets

from configs import tiny
from dsno_jax.data import digits, images


def config_for(name, data_dir="", image_size=8, channels=1, num_classes=10):
  config = tiny.get_config()
  d = config.data
  d.name, d.data_dir, d.image_size, d.channels, d.num_classes = (name, data_dir, image_size,
                                                                 channels, num_classes)
  return config


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_digits_builder_builds_offline_with_a_fixed_split(digits_dir, tmp_path):
  train = images.load_source(config_for("digits", digits_dir), str(tmp_path), "train")
  test = images.load_source(config_for("digits", digits_dir), str(tmp_path), "test")
  assert (len(train), len(test)) == (1437, 360)
  assert os.path.isdir(os.path.join(digits_dir, "digits", "8x8", "1.0.0"))
  # every stored test image is the sklearn image of the split's indices, pixels 0..16 -> 0..255
  source = datasets.load_digits()
  want = np.round(source.images * (255 / 16)).astype(np.uint8)[..., None]
  _, test_indices = digits.train_test_indices()
  stored = {(img.tobytes(), int(lab)) for img, lab in zip(*test.get(np.arange(len(test))))}
  assert stored == {(want[i].tobytes(), int(source.target[i])) for i in test_indices}
  assert np.bincount(test.labels, minlength=10).min() >= 35  # stratified


def test_array_record_data_sets_are_read_by_random_access(digits_dir, tmp_path):
  array_record_dir = str(tmp_path / "array_record")
  digits.prepare(array_record_dir, 8, file_format="array_record")
  source = images.load_source(config_for("digits", array_record_dir), str(tmp_path), "test")
  assert isinstance(source, images.RandomAccessSource)
  in_memory = images.load_source(config_for("digits", digits_dir), str(tmp_path), "test")
  indices = np.array([5, 0, 359, 5])
  for a, b in zip(source.get(indices), in_memory.get(indices)):
    np.testing.assert_array_equal(a, b)


def test_digits_upsampled_to_16():
  small, labels = digits.digit_images(8)
  big, labels16 = digits.digit_images(16)
  assert big.shape == (1797, 16, 16, 1) and big.dtype == np.uint8
  np.testing.assert_array_equal(labels, labels16)
  pooled = big.astype(np.float32).reshape(-1, 8, 2, 8, 2, 1).mean(axis=(2, 4))
  assert np.corrcoef(pooled.ravel(), small.ravel())[0, 1] > 0.95  # the same picture, smoothed
  with pytest.raises(ValueError, match="image_size=12"):
    digits.prepare("/nonexistent", 12)


def synthetic_source(n=10):
  pixels = np.arange(n * 4 * 4, dtype=np.uint8).reshape(n, 4, 4, 1) * 3
  return images.InMemorySource(pixels, np.arange(n) % 3)


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def test_batches_are_a_function_of_seed_and_step():
  source = synthetic_source()
  run = take(images.batch_iterator(source, global_batch_size=4, seed=3, random_flip=True,
                                   process_index=0, process_count=1), 7)
  resumed = take(images.batch_iterator(source, global_batch_size=4, seed=3, start_step=5,
                                       random_flip=True, process_index=0, process_count=1), 2)
  for a, b in zip(run[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  hosts = [take(images.batch_iterator(source, global_batch_size=4, seed=3, random_flip=True,
                                      process_index=p, process_count=2), 7) for p in range(2)]
  for step in range(7):  # the hosts' rows are the global batch's (flips included), disjoint
    joined = {int(hosts[p][step]["index"][i]): hosts[p][step]["image"][i]
              for p in range(2) for i in range(2)}
    assert sorted(joined) == sorted(run[step]["index"].tolist())
    for i, index in enumerate(run[step]["index"]):
      np.testing.assert_array_equal(joined[int(index)], run[step]["image"][i])
  other_seed = take(images.batch_iterator(source, global_batch_size=4, seed=4,
                                          process_index=0, process_count=1), 1)
  assert not np.array_equal(other_seed[0]["label"], run[0]["label"]) or not np.array_equal(
      other_seed[0]["image"], run[0]["image"])


def test_each_epoch_visits_every_example_once_and_flips_mirror():
  source = synthetic_source(10)
  plain = take(images.batch_iterator(source, global_batch_size=5, seed=0, process_index=0,
                                     process_count=1), 4)
  indices = np.concatenate([batch["index"] for batch in plain])
  assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:]) == list(range(10))
  assert not np.array_equal(indices[:10], indices[10:])  # each epoch has its own permutation
  flipped = take(images.batch_iterator(source, global_batch_size=5, seed=0, random_flip=True,
                                       process_index=0, process_count=1), 4)
  mirrored = 0
  for a, b in zip(plain, flipped):
    assert a["image"].dtype == np.float32 and a["image"].min() >= -1 and a["image"].max() <= 1
    np.testing.assert_array_equal(a["index"], b["index"])
    for i in range(5):
      assert a["label"][i] == b["label"][i]
      flip = not np.array_equal(b["image"][i], a["image"][i])
      want = a["image"][i, :, ::-1] if flip else a["image"][i]
      np.testing.assert_array_equal(b["image"][i], want)
      mirrored += int(flip)
  assert 0 < mirrored < 20


def test_image_folder(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for label, count in (("cat", 3), ("dog", 2)):
    os.makedirs(tmp_path / "train" / label)
    for i in range(count):
      pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(tmp_path / "train" / label / f"{i}.png")
  source = images.load_source(config_for("folder", str(tmp_path), 8, 3, 2), "unused", "train")
  pictures, labels = source.get(np.arange(len(source)))
  assert pictures.shape == (5, 8, 8, 3) and sorted(labels.tolist()) == [0, 0, 0, 1, 1]
  gray = images.load_source(config_for("folder", str(tmp_path), 4, 1, 1), "unused", "train")
  assert gray.images.shape == (5, 4, 4, 1) and set(gray.labels.tolist()) == {0}
  with pytest.raises(ValueError, match="2 label folders; data.num_classes=10"):
    images.load_source(config_for("folder", str(tmp_path), 8, 3, 10), "unused", "train")
  with pytest.raises(FileNotFoundError, match="ROOT/test/LABEL"):
    images.load_source(config_for("folder", str(tmp_path), 8, 3, 2), "unused", "test")


def test_missing_data_sets_give_instructions_and_download_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"not prepared in .*tfds build cifar10"):
    images.load_source(config_for("cifar10", str(tmp_path), 32, 3, 1), str(tmp_path))
  assert os.listdir(tmp_path) == [] or not any(
      os.path.isdir(tmp_path / p / "downloads") for p in os.listdir(tmp_path))
  with pytest.raises(ValueError, match="not a TFDS data set"):
    images.load_source(config_for("no_such_dataset_xyz", str(tmp_path)), str(tmp_path))
