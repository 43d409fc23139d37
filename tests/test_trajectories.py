"""Trajectory dataset files: write/read round trip, format 2 (seeded noise, float16), resume-safe
plans, deterministic batches."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dsno_jax.data import trajectories

NUM_EXAMPLES, SHARD_SIZE, K, SHAPE = 20, 8, 3, (4, 4, 1)


def _plan(**overrides):
  plan = {"format": trajectories.FORMAT, "num_examples": NUM_EXAMPLES,
          "shard_size": SHARD_SIZE, "image_shape": list(SHAPE), "num_times": K,
          "targets_dtype": "float32", "noise": "stored", "seed": 0, "num_classes": 10,
          "save_times": [0.5, 0.25, 0.0], "solver": "ddim", "teacher": "test"}
  plan.update(overrides)
  return plan


def _examples(indices):
  """Deterministic fake contents of examples `indices`."""
  indices = np.asarray(list(indices))
  rngs = [np.random.default_rng(i) for i in indices]
  return {"noise": np.stack([r.standard_normal(SHAPE) for r in rngs]).astype(np.float32),
          "targets": np.stack([r.uniform(-1, 1, (K,) + SHAPE) for r in rngs]).astype(np.float32),
          "label": (indices % 10).astype(np.int32), "index": indices}


def _write(directory, plan, shards=None):
  assert not trajectories.prepare(directory, plan)
  total = trajectories.num_shards(plan["num_examples"], plan["shard_size"])
  for shard in range(total) if shards is None else shards:
    indices = trajectories.shard_range(shard, plan["num_examples"], plan["shard_size"])
    trajectories.write_shard(directory, plan, shard, _examples(indices))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("traj") / "data")
  plan = _plan()
  _write(directory, plan)
  trajectories.finalize(directory, plan)
  return directory


def test_tfds_reads_every_index_once_with_metadata(dataset):
  builder = tfds.builder_from_directory(dataset)
  assert builder.info.splits["train"].num_examples == NUM_EXAMPLES
  assert builder.info.features["label"].np_dtype == np.int32
  assert builder.info.features["index"].np_dtype == np.int64
  source = builder.as_data_source(split="train")
  examples = [source[i] for i in range(len(source))]
  assert sorted(int(e["index"]) for e in examples) == list(range(NUM_EXAMPLES))
  want = _examples(range(NUM_EXAMPLES))
  for e in examples:
    i = int(e["index"])
    assert e["noise"].shape == SHAPE and e["noise"].dtype == np.float32
    assert e["targets"].shape == (K,) + SHAPE and e["targets"].dtype == np.float32
    assert int(e["label"]) == i % 10
    np.testing.assert_array_equal(e["targets"], want["targets"][i])
    np.testing.assert_array_equal(e["noise"], want["noise"][i])
  meta = trajectories.read_metadata(dataset)
  assert meta["save_times"] == [0.5, 0.25, 0.0] and meta["teacher"] == "test"
  assert meta["num_examples"] == NUM_EXAMPLES
  # no temporary files left behind
  assert not [n for n in os.listdir(dataset) if n.startswith(".")]


def test_float16_targets(tmp_path):
  plan = _plan(targets_dtype="float16", num_examples=5)
  _write(str(tmp_path), plan)
  trajectories.finalize(str(tmp_path), plan)
  source = tfds.builder_from_directory(str(tmp_path)).as_data_source(split="train")
  assert source[3]["targets"].dtype == np.float16
  batch = next(trajectories.batch_iterator(str(tmp_path), global_batch_size=5, seed=0,
                                           process_index=0, process_count=1))
  assert batch["targets"].dtype == np.float32
  want = _examples(range(5))["targets"][batch["index"]]
  np.testing.assert_allclose(batch["targets"], want, atol=1e-3)
  assert not np.array_equal(batch["targets"], want)  # it really was stored as float16


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_are_a_function_of_seed_and_step(dataset):
  kw = dict(global_batch_size=6, process_index=0, process_count=1)
  a = _take(trajectories.batch_iterator(dataset, seed=3, **kw), 8)
  b = _take(trajectories.batch_iterator(dataset, seed=3, **kw), 8)
  c = _take(trajectories.batch_iterator(dataset, seed=4, **kw), 8)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
  want = _examples(range(NUM_EXAMPLES))
  for batch in a:
    assert batch["noise"].shape == (6,) + SHAPE and batch["targets"].shape == (6, K) + SHAPE
    assert batch["targets"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"], want["targets"][batch["index"]])
    np.testing.assert_array_equal(batch["label"], want["label"][batch["index"]])
  # each epoch is a permutation: the first 20 positions (steps 0..2 hold 18, +2) cover all
  stream = np.concatenate([batch["index"] for batch in a])
  assert sorted(stream[:NUM_EXAMPLES]) == list(range(NUM_EXAMPLES))
  assert sorted(stream[NUM_EXAMPLES:2 * NUM_EXAMPLES]) == list(range(NUM_EXAMPLES))


# Many small shards, and a cache bound of 5 shards' bytes: groups of 2 shards, read one after
# the other with the next one fetched (the order is the same for local and remote data).
MANY, MANY_SHARD = 48, 4


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("many") / "data")
  plan = _plan(num_examples=MANY, shard_size=MANY_SHARD)
  _write(directory, plan)
  trajectories.finalize(directory, plan)
  largest = max(os.path.getsize(trajectories.shard_path(directory, s, MANY // MANY_SHARD))
                for s in range(MANY // MANY_SHARD))
  return directory, 5 * largest / 1e9


def test_resume_from_start_step_equals_continuing(dataset, many_shards):
  kw = dict(global_batch_size=6, seed=1, process_index=0, process_count=1)
  straight = _take(trajectories.batch_iterator(dataset, **kw), 7)
  resumed = _take(trajectories.batch_iterator(dataset, start_step=4, **kw), 3)
  for x, y in zip(straight[4:], resumed):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  # with groups, on the second of two processes, across group and epoch boundaries
  directory, cache_gb = many_shards
  kw = dict(global_batch_size=6, seed=1, process_index=1, process_count=2, cache_gb=cache_gb)
  straight = _take(trajectories.batch_iterator(directory, **kw), 19)  # 24 examples an epoch
  resumed = _take(trajectories.batch_iterator(directory, start_step=11, **kw), 8)
  for x, y in zip(straight[11:], resumed):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_each_process_reads_its_own_shards_each_example_once_per_epoch(many_shards):
  directory, cache_gb = many_shards
  epoch = MANY // 2  # examples a process owns: 6 shards of 4
  want = _examples(range(MANY))
  seen = []
  for p in range(2):
    batches = _take(trajectories.batch_iterator(directory, global_batch_size=8, seed=5,
                                                process_index=p, process_count=2,
                                                cache_gb=cache_gb), 2 * epoch // 4)
    stream = np.concatenate([b["index"] for b in batches])
    own = [i for i in range(MANY) if (i // MANY_SHARD) % 2 == p]  # shards s % 2 == p
    for e in range(2):
      assert sorted(stream[e * epoch:(e + 1) * epoch]) == own
      # a group of 2 shards is read whole before the next: its 8 examples, from 2 shards
      for g in range(3):
        group = stream[e * epoch + 8 * g:e * epoch + 8 * (g + 1)]
        assert len(set((group // MANY_SHARD).tolist())) == 2, group
    assert not np.array_equal(stream[:epoch], stream[epoch:])  # another order every epoch
    for b in batches:
      np.testing.assert_array_equal(b["targets"], want["targets"][b["index"]])
    seen.append(set(stream.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(MANY))


def test_too_few_shards_or_too_small_a_cache_are_refused(dataset, many_shards, caplog):
  # what generation checks before any work, for the processes that will read the shards
  with pytest.raises(ValueError, match="3 shards for 4 processes"):
    trajectories.check_shards_per_host(NUM_EXAMPLES, SHARD_SIZE, 4)
  trajectories.check_shards_per_host(NUM_EXAMPLES, SHARD_SIZE, 3)
  assert "read up to" not in caplog.text
  trajectories.check_shards_per_host(NUM_EXAMPLES, SHARD_SIZE, 2)  # 2 shards and 1
  assert "3 shards over 2 processes" in caplog.text and "read up to 100% more" in caplog.text
  with pytest.raises(ValueError, match="3 shards for 4 processes.*at least one shard per "
                                       "process.*trajectory.shard_size"):
    next(trajectories.batch_iterator(dataset, global_batch_size=8, seed=0, process_index=0,
                                     process_count=4))
  with pytest.raises(ValueError, match="not divisible"):
    next(trajectories.batch_iterator(dataset, global_batch_size=6, seed=0, process_index=0,
                                     process_count=4))
  directory, cache_gb = many_shards
  with pytest.raises(ValueError, match=r"config.data.cache_gb=.* holds fewer than two of this "
                                       r"host's trajectory shards"):
    next(trajectories.batch_iterator(directory, global_batch_size=4, seed=0, process_index=0,
                                     process_count=1, cache_gb=cache_gb / 4))
  with pytest.raises(ValueError, match=r"groups of 2 shards that may hold only 8 examples, "
                                       r"fewer than this host's batch of 12"):
    next(trajectories.batch_iterator(directory, global_batch_size=12, seed=0, process_index=0,
                                     process_count=1, cache_gb=cache_gb))


def test_missing_and_incomplete_datasets_are_clear_errors(tmp_path):
  missing = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="run --mode=generate first"):
    trajectories.read_metadata(missing)
  partial = str(tmp_path / "partial")
  plan = _plan()
  _write(partial, plan, shards=[0, 2])
  with pytest.raises(FileNotFoundError, match="incomplete: 2 of 3 shards"):
    next(trajectories.batch_iterator(partial, global_batch_size=4, seed=0))
  with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
    trajectories.finalize(partial, plan)
  assert trajectories.existing_shards(partial, plan) == {0, 2}
  assert not trajectories.prepare(partial, plan)  # same plan: resumable, not complete


def test_a_directory_of_another_plan_is_never_overwritten(dataset, tmp_path):
  with open(os.path.join(dataset, trajectories.PLAN_FILE)) as f:
    before = f.read()
  with pytest.raises(ValueError, match="solver: on disk 'ddim', now 'dpm2m'"):
    trajectories.prepare(dataset, _plan(solver="dpm2m"))
  with open(os.path.join(dataset, trajectories.PLAN_FILE)) as f:
    assert f.read() == before
  assert trajectories.prepare(dataset, _plan())  # complete
  other = tmp_path / "other"
  other.mkdir()
  (other / "precious.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not empty"):
    trajectories.prepare(str(other), _plan())
  assert (other / "precious.txt").read_text() == "keep me"


def test_write_shard_checks_indices(tmp_path):
  plan = _plan()
  trajectories.prepare(str(tmp_path), plan)
  with pytest.raises(ValueError, match="shard 1 must hold indices 8..15"):
    trajectories.write_shard(str(tmp_path), plan, 1, _examples(range(0, 8)))
  assert trajectories.existing_shards(str(tmp_path), plan) == set()
  with open(tmp_path / trajectories.PLAN_FILE) as f:
    assert json.load(f)["num_examples"] == NUM_EXAMPLES


def _seeded_examples(indices, seed=7):
  """Examples whose noise is what (seed, index) regenerates, with smooth float32 targets."""
  from dsno_jax.data import noise as noise_lib
  indices = np.asarray(list(indices))
  noise, labels = noise_lib.example_inputs(indices, seed=seed, image_shape=SHAPE, num_classes=10)
  noise = np.asarray(noise)
  targets = np.tanh(np.linspace(0.2, 1.0, K)[None, :, None, None, None] * noise[:, None])
  return {"noise": noise, "targets": targets.astype(np.float32),
          "label": np.asarray(labels), "index": indices}


def _write_seeded(directory, plan):
  assert not trajectories.prepare(directory, plan)
  total = trajectories.num_shards(plan["num_examples"], plan["shard_size"])
  for shard in range(total):
    indices = trajectories.shard_range(shard, plan["num_examples"], plan["shard_size"])
    trajectories.write_shard(directory, plan, shard, _seeded_examples(indices, plan["seed"]))
  trajectories.finalize(directory, plan)


def test_format_2_regenerates_the_noise_and_stores_float16_targets(tmp_path):
  directory = str(tmp_path / "v2")
  plan = _plan(noise="seeded", seed=7, targets_dtype="float16")
  _write_seeded(directory, plan)
  source = tfds.builder_from_directory(directory).as_data_source(split="train")
  assert "noise" not in source[0] and source[0]["noise_check"].shape == (4,)
  meta = trajectories.read_metadata(directory)
  trajectories.check_noise(directory, meta)  # passes: the stored checks match
  want = _seeded_examples(range(NUM_EXAMPLES), seed=7)
  batch = next(trajectories.batch_iterator(directory, global_batch_size=NUM_EXAMPLES, seed=0,
                                           process_index=0, process_count=1))
  assert "noise" not in batch
  from dsno_jax.data import noise as noise_lib
  regenerated, labels = noise_lib.example_inputs(batch["index"], seed=7, image_shape=SHAPE,
                                                 num_classes=10)
  np.testing.assert_array_equal(np.asarray(regenerated), want["noise"][batch["index"]])
  np.testing.assert_array_equal(batch["label"], np.asarray(labels))
  error = np.abs(batch["targets"] - want["targets"][batch["index"]]).max()
  assert 0 < error <= 4.9e-4  # float16 spacing in [-1, 1] is at most 2**-11 = 4.9e-4


def test_noise_of_another_seed_is_an_error(tmp_path):
  directory = str(tmp_path / "v2")
  plan = _plan(noise="seeded", seed=7)
  _write_seeded(directory, plan)
  meta = trajectories.read_metadata(directory)
  meta["seed"] = 8
  with pytest.raises(ValueError, match="is not what seed 8 regenerates.*--mode=generate"):
    trajectories.check_noise(directory, meta)


def test_a_format_1_dataset_names_the_regeneration_command(tmp_path):
  directory = str(tmp_path / "v1")
  plan = _plan()
  _write(directory, plan)
  trajectories.finalize(directory, plan)
  for name in os.listdir(directory):  # what a format-1 dataset's metadata says
    if name.endswith(".json"):
      with open(os.path.join(directory, name)) as f:
        text = f.read()
      with open(os.path.join(directory, name), "w") as f:
        f.write(text.replace(trajectories.FORMAT, "dsno_jax.trajectories/1"))
  with pytest.raises(ValueError, match=r"format 'dsno_jax.trajectories/1'.*--mode=generate"):
    trajectories.read_metadata(directory)


def test_a_cifar10_sized_trajectory_takes_at_most_25_kB(tmp_path):
  shape, k, n = (32, 32, 3), 4, 64
  plan = _plan(noise="seeded", targets_dtype="float16", image_shape=list(shape), num_times=k,
               num_examples=n, shard_size=n)
  trajectories.prepare(str(tmp_path), plan)
  rng = np.random.default_rng(0)
  targets = np.clip(rng.normal(0, 0.5, (n, k) + shape), -1, 1).astype(np.float32)
  trajectories.write_shard(str(tmp_path), plan, 0, {
      "noise": rng.normal(size=(n,) + shape), "targets": targets,
      "label": np.zeros(n, np.int32), "index": np.arange(n)})
  path = trajectories.shard_path(str(tmp_path), 0, 1)
  assert os.path.getsize(path) / n <= 25_000
