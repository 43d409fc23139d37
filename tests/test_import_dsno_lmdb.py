"""The DSNO-pytorch LMDB importer: its layout in, this project's trajectories out; wrong shapes refused."""
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest

from dsno_jax import diffusion
from dsno_jax.data import import_dsno_lmdb, trajectories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (3, 9, 8, 8)  # (C, T, H, W), ImageNet-64's layout at 8x8
LAYOUT = import_dsno_lmdb.Layout(shape=SHAPE, dims=(1, 0, 2, 3), t_idx=(0, 2, 4, 6, 8),
                                 save_times=(0.75, 0.5, 0.25, 0.0), labels="labels.npy",
                                 num_classes=10)


def _write_database(path, values, labels=None):
  """A database as DSNO-pytorch's generate scripts write it: "length", then "0", "1", ..."""
  os.makedirs(path, exist_ok=True)
  env = lmdb.open(os.path.join(path, "lmdb") if labels is not None else path,
                  map_size=1 << 26)
  with env.begin(write=True) as txn:
    txn.put(b"length", str(len(values)).encode())
    for i, value in enumerate(values):
      txn.put(str(i).encode(), np.ascontiguousarray(value, np.float32).tobytes())
  env.close()
  if labels is not None:
    np.save(os.path.join(path, "labels.npy"), labels)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
  rng = np.random.default_rng(0)
  values = np.clip(rng.normal(0, 0.6, (11,) + SHAPE), -1, 1).astype(np.float32)
  labels = rng.integers(0, 10, 11)
  path = str(tmp_path_factory.mktemp("dsno") / "imagenet16_data")
  _write_database(path, values, labels)
  return path, values, labels


def test_imported_trajectories_are_the_database_in_our_layout(database, tmp_path):
  src, values, labels = database
  dst = str(tmp_path / "imported")
  import_dsno_lmdb.import_lmdb(src, dst, LAYOUT, shard_size=4, targets_dtype="float32")
  meta = trajectories.read_metadata(dst)
  assert meta["noise"] == "stored" and meta["num_examples"] == 11 and meta["num_classes"] == 10
  np.testing.assert_allclose(meta["logsnrs"], diffusion.logsnr_schedule_cosine(
      np.asarray([0.75, 0.5, 0.25, 0.0])), rtol=1e-6)
  batch = next(trajectories.batch_iterator(dst, global_batch_size=11, seed=0, process_index=0,
                                           process_count=1))
  frames = values[batch["index"]].transpose(0, 2, 1, 3, 4)  # (N, T, C, H, W), as DSNO reads it
  np.testing.assert_array_equal(batch["noise"], frames[:, 0].transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(batch["targets"],
                                frames[:, [2, 4, 6, 8]].transpose(0, 1, 3, 4, 2))
  np.testing.assert_array_equal(batch["label"], labels[batch["index"]])


def test_a_killed_import_resumes_and_float16_is_the_default(database, tmp_path):
  src, values, _ = database
  dst = str(tmp_path / "imported")
  stale = trajectories.shard_path(dst, 1, 3)
  import_dsno_lmdb.import_lmdb(src, dst, LAYOUT, shard_size=4)  # fresh: writes all 3 shards
  before = os.path.getmtime(stale)
  os.remove(trajectories.shard_path(dst, 2, 3))
  os.remove(os.path.join(dst, "dataset_info.json"))  # as if killed before the last shard
  import_dsno_lmdb.import_lmdb(src, dst, LAYOUT, shard_size=4)
  assert os.path.getmtime(stale) == before  # written shards are kept
  source = trajectories.read_metadata(dst)
  assert source["targets_dtype"] == "float16"
  batch = next(trajectories.batch_iterator(dst, global_batch_size=11, seed=0, process_index=0,
                                           process_count=1))
  want = values[batch["index"]][:, :, [2, 4, 6, 8]].transpose(0, 2, 3, 4, 1)
  np.testing.assert_allclose(batch["targets"], want, rtol=2 ** -11, atol=1e-7)


def test_a_database_of_another_shape_is_refused(database, tmp_path):
  src, _, _ = database
  wrong = import_dsno_lmdb.Layout(shape=(3, 17, 8, 8), dims=(1, 0, 2, 3), t_idx=(0, 4, 8, 12, 16),
                                  save_times=(0.5625, 0.25, 0.0625, 0.0), labels="labels.npy",
                                  num_classes=10)
  with pytest.raises(ValueError, match=r"value '0' holds 6912 bytes; shape \(3, 17, 8, 8\)"):
    import_dsno_lmdb.import_lmdb(src, str(tmp_path / "x"), wrong)
  bad_dims = import_dsno_lmdb.Layout(shape=SHAPE, dims=(1, 1, 2, 3), t_idx=(0, 2),
                                     save_times=(0.0,))
  with pytest.raises(ValueError, match="not a permutation"):
    import_dsno_lmdb.import_lmdb(src, str(tmp_path / "y"), bad_dims)


def test_command_line_with_the_cifar10_preset(tmp_path):
  rng = np.random.default_rng(1)
  values = np.clip(rng.normal(0, 0.5, (5, 3, 17, 4, 4)), -1, 1).astype(np.float32)
  src = str(tmp_path / "cifar_lmdb")
  _write_database(src, values)
  dst = str(tmp_path / "out")
  result = subprocess.run(
      [sys.executable, "-m", "dsno_jax.data.import_dsno_lmdb", f"--src={src}", f"--dst={dst}",
       "--preset=cifar10", "--shape=3,17,4,4", "--shard_size=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  meta = trajectories.read_metadata(dst)
  assert meta["save_times"] == [0.5625, 0.25, 0.0625, 0.0] and meta["num_classes"] == 1
  assert meta["image_shape"] == [4, 4, 3] and meta["num_examples"] == 5
