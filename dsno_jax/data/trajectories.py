"""Trajectory datasets on disk: TFDS ArrayRecord shards of (noise, targets, label, index)."""
import json
import os
from typing import Dict, Iterator, Optional, Sequence, Set

import jax
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer

from dsno_jax import diffusion
from dsno_jax.data import batching

DATASET_NAME = "trajectories"
SPLIT = "train"
FILE_FORMAT = "array_record"
PLAN_FILE = "generation.json"  # what is being generated; written before the first shard
_COMPLETE_FILE = "dataset_info.json"  # written by tfds.folder_dataset.write_metadata, last
_TMP_PREFIX = ".incomplete-"
TARGETS_DTYPES = {"float32": np.float32, "float16": np.float16}
# Plan entries that fix the layout of the files (the rest is recorded, and checked on resume).
_LAYOUT_KEYS = ("num_examples", "shard_size", "image_shape", "num_times", "targets_dtype")


def num_shards(num_examples: int, shard_size: int) -> int:
  return -(-num_examples // shard_size)


def shard_range(shard: int, num_examples: int, shard_size: int) -> range:
  """Example indices held by `shard`: [shard * shard_size, (shard + 1) * shard_size)."""
  return range(shard * shard_size, min((shard + 1) * shard_size, num_examples))


def features(plan: Dict) -> tfds.features.FeaturesDict:
  """noise (H, W, C) float32, targets (K, H, W, C), label int32, index int64."""
  image_shape = tuple(plan["image_shape"])
  targets_dtype = TARGETS_DTYPES[plan["targets_dtype"]]
  raw = tfds.features.Encoding.BYTES  # raw bytes: much faster than a float list per pixel
  return tfds.features.FeaturesDict({
      "noise": tfds.features.Tensor(shape=image_shape, dtype=np.float32, encoding=raw),
      "targets": tfds.features.Tensor(shape=(plan["num_times"],) + image_shape,
                                      dtype=targets_dtype, encoding=raw),
      "label": tfds.features.Tensor(shape=(), dtype=np.int32),
      "index": tfds.features.Tensor(shape=(), dtype=np.int64),
  })


def _template(directory: str) -> tfds.core.ShardedFileTemplate:
  return tfds.core.ShardedFileTemplate(
      data_dir=directory, template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
      dataset_name=DATASET_NAME, split=SPLIT, filetype_suffix=FILE_FORMAT)


def shard_path(directory: str, shard: int, total: int) -> str:
  return os.fspath(_template(directory).sharded_filepath(shard_index=shard, num_shards=total))


def _check_plan(plan: Dict):
  missing = [k for k in _LAYOUT_KEYS if k not in plan]
  if missing:
    raise ValueError(f"trajectory plan lacks {missing}")
  if plan["targets_dtype"] not in TARGETS_DTYPES:
    raise ValueError(f"targets_dtype={plan['targets_dtype']!r}; expected one of "
                     f"{sorted(TARGETS_DTYPES)}")
  if plan["num_examples"] < 1 or plan["shard_size"] < 1:
    raise ValueError(f"num_examples={plan['num_examples']} and shard_size={plan['shard_size']}; "
                     "expected both >= 1")


def _normalise(plan: Dict) -> Dict:
  """The plan as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(plan))


def read_plan(directory: str) -> Optional[Dict]:
  path = os.path.join(directory, PLAN_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is corrupt ({e}); delete {directory} to regenerate") from None


def prepare(directory: str, plan: Dict, *, write: bool = True) -> bool:
  """Checks `directory` against `plan` (writing the plan if new); True when already complete.

  A directory that holds trajectories of another plan is an error, never overwritten.
  `write=False` (hosts other than 0) only checks.
  """
  _check_plan(plan)
  plan = _normalise(plan)
  existing = read_plan(directory)
  if existing is None:
    if os.path.isdir(directory) and any(not n.startswith(_TMP_PREFIX)
                                        for n in os.listdir(directory)):
      raise ValueError(f"{directory} is not empty and holds no {PLAN_FILE}; refusing to write "
                       "trajectories into it (set config.trajectory.dir to an empty directory)")
    if write:
      os.makedirs(directory, exist_ok=True)
      tmp = os.path.join(directory, _TMP_PREFIX + PLAN_FILE)
      with open(tmp, "w") as f:
        json.dump(plan, f, indent=1)
      os.replace(tmp, os.path.join(directory, PLAN_FILE))
    return False
  differ = {k: (existing.get(k), v) for k, v in plan.items() if existing.get(k) != v}
  differ.update({k: (v, None) for k, v in existing.items() if k not in plan})
  if differ:
    lines = "".join(f"\n  {k}: on disk {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
    raise ValueError(f"{directory} holds trajectories generated with other settings:{lines}\n"
                     "use another config.trajectory.dir, or delete it to regenerate")
  return is_complete(directory)


def is_complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, _COMPLETE_FILE))


def existing_shards(directory: str, plan: Dict) -> Set[int]:
  """Shards whose file is complete (a shard file only appears, by rename, once written)."""
  total = num_shards(plan["num_examples"], plan["shard_size"])
  return {s for s in range(total) if os.path.isfile(shard_path(directory, s, total))}


def write_shard(directory: str, plan: Dict, shard: int, examples: Dict[str, np.ndarray]) -> str:
  """Writes shard `shard` from arrays noise (n,H,W,C), targets (n,K,H,W,C), label, index.

  Written to a temporary name, synced and renamed, so the shard file exists only complete.
  """
  total = num_shards(plan["num_examples"], plan["shard_size"])
  expected = np.asarray(shard_range(shard, plan["num_examples"], plan["shard_size"]))
  index = np.asarray(examples["index"])
  if not np.array_equal(index, expected):
    raise ValueError(f"shard {shard} must hold indices {expected[0]}..{expected[-1]} in order; "
                     f"got {index[:4]}... ({len(index)} examples)")
  feats = features(plan)
  serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())
  targets_dtype = TARGETS_DTYPES[plan["targets_dtype"]]
  path = shard_path(directory, shard, total)
  tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.path.basename(path)}")
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")  # random access
  try:
    for i in range(len(index)):
      example = {"noise": np.asarray(examples["noise"][i], np.float32),
                 "targets": np.asarray(examples["targets"][i]).astype(targets_dtype),
                 "label": np.int32(examples["label"][i]), "index": np.int64(index[i])}
      writer.write(serializer.serialize_example(feats.encode_example(example)))
  finally:
    writer.close()
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def finalize(directory: str, plan: Dict):
  """Writes the TFDS metadata (marks the dataset complete); every shard must exist."""
  plan = _normalise(plan)
  total = num_shards(plan["num_examples"], plan["shard_size"])
  missing = sorted(set(range(total)) - existing_shards(directory, plan))
  if missing:
    raise ValueError(f"{directory}: shards {missing} of {total} are missing; run "
                     "--mode=generate again to finish them")
  lengths = [len(shard_range(s, plan["num_examples"], plan["shard_size"])) for s in range(total)]
  num_bytes = sum(os.path.getsize(shard_path(directory, s, total)) for s in range(total))
  split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=lengths, num_bytes=num_bytes,
                              filename_template=_template(directory))
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=features(plan), split_infos=[split], check_data=False,
      description="DSNO teacher trajectories: noise z_1, x-hat at the save times, label, index.",
      metadata=tfds.core.MetadataDict(plan))
  for name in os.listdir(directory):
    if name.startswith(_TMP_PREFIX):
      os.remove(os.path.join(directory, name))


def _require_complete(directory: str):
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no trajectory dataset at {directory}; run --mode=generate first")
  if not is_complete(directory):
    plan = read_plan(directory)
    if plan is None:
      raise FileNotFoundError(f"{directory} holds no trajectory dataset ({PLAN_FILE} and "
                              f"{_COMPLETE_FILE} are missing); run --mode=generate first")
    total = num_shards(plan["num_examples"], plan["shard_size"])
    done = len(existing_shards(directory, plan))
    raise FileNotFoundError(f"the trajectory dataset at {directory} is incomplete: {done} of "
                            f"{total} shards written and {_COMPLETE_FILE} missing; run "
                            "--mode=generate again (it resumes)")


def read_metadata(directory: str) -> Dict:
  """Save times, log-SNRs, solver, grid, steps, NFE, teacher identity, image shape, ..."""
  _require_complete(directory)
  return dict(tfds.builder_from_directory(directory).info.metadata)


def _open_source(directory: str):
  _require_complete(directory)
  return tfds.builder_from_directory(directory).as_data_source(split=SPLIT)


def _read(source, indices: Sequence[int]) -> Dict[str, np.ndarray]:
  examples = source.__getitems__([int(i) for i in indices])
  batch = {
      "noise": np.stack([e["noise"] for e in examples]).astype(np.float32),
      "targets": np.stack([e["targets"] for e in examples]).astype(np.float32),
      "label": np.asarray([e["label"] for e in examples], np.int32),
      "index": np.asarray([e["index"] for e in examples], np.int64),
  }
  if not np.array_equal(batch["index"], indices):
    raise ValueError("trajectory dataset is corrupt: records are not stored in index order")
  return batch


def batch_iterator(directory: str, *, global_batch_size: int, seed: int, start_step: int = 0,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Endless per-host batches {noise (b,H,W,C), targets (b,K,H,W,C) float32, label, index}.

  b = global_batch_size / process_count, in data/batching.py's order, so a run resumed at
  `start_step` reads exactly the batches it would have read.
  """
  source = _open_source(directory)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batching.local_rows(global_batch_size, process_index, process_count)  # fails early
  step = start_step
  while True:
    yield _read(source, batching.step_indices(
        step, num_examples=len(source), global_batch_size=global_batch_size, seed=seed,
        process_index=process_index, process_count=process_count))
    step += 1


def check_logsnrs(config, directory: str) -> np.ndarray:
  """The dataset's log-SNRs (K,), checked against the config's save times."""
  metadata = read_metadata(directory)
  logsnr = np.asarray(metadata["logsnrs"], np.float32)
  wanted = diffusion.save_logsnrs(config)
  if logsnr.shape != wanted.shape or not np.allclose(logsnr, wanted, rtol=1e-5, atol=1e-4):
    raise ValueError(f"the trajectories in {directory} were saved at log-SNRs {logsnr.tolist()} "
                     f"(times {metadata.get('save_times')}); config.trajectory.save_times="
                     f"{tuple(config.trajectory.save_times)} gives {wanted.tolist()}")
  return logsnr
