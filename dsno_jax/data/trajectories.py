"""Trajectory datasets on disk: TFDS ArrayRecord shards of (targets, label, index, noise or its check).

Format 2: the targets are float16 by default (their spacing near 1, 4.9e-4, lies well below
the error of the teacher trajectories they record), and the noise of a generated dataset is
not stored: it is regenerated from (seed, index) (`data.noise.example_inputs`), with four of
its values stored per example so that a mismatch is an error. Imported datasets, whose noise
no seed reproduces, store it ("noise": "stored").

Each process reads only its own shards (s % process_count == process); a data set in a bucket
is read from copies of the shards its coming batches need, at most `data.cache_gb` of them.
"""
import contextlib
import json
import os
import sys
import threading
from typing import Dict, Iterator, List, Optional, Set, Tuple

from absl import logging
import grain
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer

from dsno_jax import diffusion, storage
from dsno_jax.data import loader

DATASET_NAME = "trajectories"
SPLIT = "train"
FILE_FORMAT = "array_record"
PLAN_FILE = "generation.json"  # what is being generated; written before the first shard
_COMPLETE_FILE = "dataset_info.json"  # written by tfds.folder_dataset.write_metadata, last
_TMP_PREFIX = ".incomplete-"
FORMAT = "dsno_jax.trajectories/2"
TARGETS_DTYPES = {"float32": np.float32, "float16": np.float16}
NOISE_MODES = ("seeded", "stored")  # regenerated from (seed, index), or stored per example
NOISE_CHECK_SIZE = 4  # noise values stored per seeded example to check its regeneration
# Plan entries that fix the layout of the files (the rest is recorded, and checked on resume).
_LAYOUT_KEYS = ("format", "num_examples", "shard_size", "image_shape", "num_times",
                "targets_dtype", "noise", "seed", "num_classes")
REGENERATE = ("move {directory} aside and run `python -m dsno_jax.main --config=... "
              "--workdir=... --mode=generate` (the same config) to write it again")


def num_shards(num_examples: int, shard_size: int) -> int:
  return -(-num_examples // shard_size)


def shard_range(shard: int, num_examples: int, shard_size: int) -> range:
  """Example indices held by `shard`: [shard * shard_size, (shard + 1) * shard_size)."""
  return range(shard * shard_size, min((shard + 1) * shard_size, num_examples))


def features(plan: Dict) -> tfds.features.FeaturesDict:
  """targets (K, H, W, C), label int32, index int64, and noise (H, W, C) float32 when stored
  or noise_check (4,) float32 when seeded."""
  image_shape = tuple(plan["image_shape"])
  targets_dtype = TARGETS_DTYPES[plan["targets_dtype"]]
  raw = tfds.features.Encoding.BYTES  # raw bytes: much faster than a float list per pixel
  noise = ({"noise": tfds.features.Tensor(shape=image_shape, dtype=np.float32, encoding=raw)}
           if plan["noise"] == "stored" else
           {"noise_check": tfds.features.Tensor(shape=(NOISE_CHECK_SIZE,), dtype=np.float32)})
  return tfds.features.FeaturesDict({
      "targets": tfds.features.Tensor(shape=(plan["num_times"],) + image_shape,
                                      dtype=targets_dtype, encoding=raw),
      "label": tfds.features.Tensor(shape=(), dtype=np.int32),
      "index": tfds.features.Tensor(shape=(), dtype=np.int64),
      **noise,
  })


def noise_check(noise: np.ndarray) -> np.ndarray:
  """(n, NOISE_CHECK_SIZE) float32: the values stored to check a regenerated noise (n, ...)."""
  flat = np.asarray(noise, np.float32).reshape(len(noise), -1)
  return flat[:, np.linspace(0, flat.shape[1] - 1, NOISE_CHECK_SIZE).astype(int)]


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
  if plan["format"] != FORMAT:
    raise ValueError(f"trajectory format {plan['format']!r}; this version writes {FORMAT!r}")
  if plan["noise"] not in NOISE_MODES:
    raise ValueError(f"noise={plan['noise']!r}; expected one of {NOISE_MODES}")
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
  path = storage.join(directory, PLAN_FILE)
  if not storage.isfile(path):
    return None
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is corrupt ({e}); delete {directory} to regenerate") from None


# What generation costs rather than what it writes: a dataset begun by a version that spent
# more evaluations on the same targets may be finished by this one.
_COST_KEYS = ("nfe", "target_nfe")


def prepare(directory: str, plan: Dict, *, write: bool = True) -> bool:
  """Checks `directory` against `plan` (writing the plan if new); True when already complete.

  A directory that holds trajectories of another plan is an error, never overwritten.
  `write=False` (hosts other than 0) only checks.
  """
  _check_plan(plan)
  plan = _normalise(plan)
  existing = read_plan(directory)
  if existing is None:
    # hidden names: this module's unfinished files and storage.write_text's temporary ones
    if storage.isdir(directory) and any(not n.startswith(".")
                                        for n in storage.listdir(directory)):
      raise ValueError(f"{directory} is not empty and holds no {PLAN_FILE}; refusing to write "
                       "trajectories into it (set config.trajectory.dir to an empty directory)")
    if write:
      storage.write_text(storage.join(directory, PLAN_FILE), json.dumps(plan, indent=1))
    return False
  differ = {k: (existing.get(k), v) for k, v in plan.items()
            if existing.get(k) != v and k not in _COST_KEYS}
  differ.update({k: (v, None) for k, v in existing.items() if k not in plan})
  if differ:
    lines = "".join(f"\n  {k}: on disk {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
    raise ValueError(f"{directory} holds trajectories generated with other settings:{lines}\n"
                     "use another config.trajectory.dir, or delete it to regenerate")
  return is_complete(directory)


def is_complete(directory: str) -> bool:
  return storage.isfile(storage.join(directory, _COMPLETE_FILE))


def existing_shards(directory: str, plan: Dict) -> Set[int]:
  """Shards whose file is complete (a shard file appears, by rename or upload, once written)."""
  total = num_shards(plan["num_examples"], plan["shard_size"])
  names = set(storage.listdir(directory)) if storage.isdir(directory) else set()
  return {s for s in range(total) if os.path.basename(shard_path(directory, s, total)) in names}


def write_shard(directory: str, plan: Dict, shard: int, examples: Dict[str, np.ndarray]) -> str:
  """Writes shard `shard` from arrays noise (n,H,W,C), targets (n,K,H,W,C), label, index.

  The noise is stored whole or as its check values, as the plan says.

  Written to a temporary name, synced and renamed, so the shard file exists only complete;
  ArrayRecord writes only local files, so a remote shard is written in the local cache and
  uploaded as one object.
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
  local_directory = storage.cache_path(directory)
  os.makedirs(local_directory, exist_ok=True)
  tmp = os.path.join(local_directory, f"{_TMP_PREFIX}{os.path.basename(path)}")
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")  # random access
  noise = np.asarray(examples["noise"], np.float32)
  checks = noise_check(noise)
  try:
    for i in range(len(index)):
      example = {"targets": np.asarray(examples["targets"][i]).astype(targets_dtype),
                 "label": np.int32(examples["label"][i]), "index": np.int64(index[i])}
      if plan["noise"] == "stored":
        example["noise"] = noise[i]
      else:
        example["noise_check"] = checks[i]
      writer.write(serializer.serialize_example(feats.encode_example(example)))
  finally:
    writer.close()
  if storage.is_remote(path):
    storage.upload(tmp, path)
    os.remove(tmp)
    return path
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
  num_bytes = sum(storage.getsize(shard_path(directory, s, total)) for s in range(total))
  split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=lengths, num_bytes=num_bytes,
                              filename_template=_template(directory))
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=features(plan), split_infos=[split], check_data=False,
      description="DSNO teacher trajectories: noise z_1, x-hat at the save times, label, index.",
      metadata=tfds.core.MetadataDict(plan))
  for name in storage.listdir(directory):
    if name.startswith(_TMP_PREFIX):
      storage.remove(storage.join(directory, name))


def _require_complete(directory: str):
  if not storage.isdir(directory):
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
  metadata = dict(tfds.builder_from_directory(directory).info.metadata)
  if metadata.get("format") != FORMAT:
    raise ValueError(
        f"the trajectory dataset at {directory} has format {metadata.get('format')!r}; this "
        f"version reads {FORMAT!r} (float16 targets, noise regenerated from the seed): "
        + REGENERATE.format(directory=directory))
  return metadata


def check_noise(directory: str, metadata: Dict, num_checks: int = 8, *,
                process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> None:
  """ValueError unless the noise regenerated for a few examples matches their stored check.

  The examples come from one shard this process reads anyway (a remote one is copied for the
  check and deleted).
  """
  if metadata["noise"] != "seeded":
    return
  from dsno_jax.data import noise as noise_lib  # jax computation, only when checking
  from tensorflow.core.example import example_pb2
  process_index, _ = loader.process_of(process_index, process_count)
  total = num_shards(metadata["num_examples"], metadata["shard_size"])
  shard = process_index % total
  rows = shard_range(shard, metadata["num_examples"], metadata["shard_size"])
  indices = np.unique(np.linspace(rows.start, rows.stop - 1, num_checks).astype(np.int64))
  with storage.temporary_copy(shard_path(directory, shard, total)) as local:
    records = _open_shard(directory, metadata, shard, local).read(
        (indices - rows.start).tolist())
  stored = np.asarray([example_pb2.Example.FromString(r).features.feature["noise_check"]
                       .float_list.value for r in records], np.float32)
  noise, _ = noise_lib.example_inputs(indices, seed=int(metadata["seed"]),
                                      image_shape=tuple(metadata["image_shape"]),
                                      num_classes=int(metadata["num_classes"]))
  regenerated = noise_check(np.asarray(noise))
  if not np.allclose(regenerated, stored, rtol=1e-4, atol=1e-5):
    raise ValueError(
        f"the noise of the trajectories in {directory} is not what seed {metadata['seed']} "
        f"regenerates (examples {indices.tolist()}: stored {stored[:2].tolist()}..., now "
        f"{regenerated[:2].tolist()}...); it was written by another version of the noise: "
        + REGENERATE.format(directory=directory))


def _shard_of(directory: str, metadata: Dict, index: int) -> str:
  total = num_shards(metadata["num_examples"], metadata["shard_size"])
  return shard_path(directory, index // metadata["shard_size"], total)


def _damaged(directory: str, path: str, error: Exception) -> ValueError:
  return ValueError(
      f"trajectory shard {path} is damaged ({type(error).__name__}: {error}); delete that file "
      f"and {storage.join(directory, _COMPLETE_FILE)}, then run --mode=generate again with the "
      "same config: it rewrites only the missing shard")


def _open_shard(directory: str, metadata: Dict, shard: int, local: str):
  """An ArrayRecordReader of shard `shard` (its file, or a copy, at `local`), checked whole."""
  total = num_shards(metadata["num_examples"], metadata["shard_size"])
  path = shard_path(directory, shard, total)
  want = len(shard_range(shard, metadata["num_examples"], metadata["shard_size"]))
  try:
    reader = array_record_module.ArrayRecordReader(local, "readahead_buffer_size:0",
                                                   file_reader_buffer_size=32768)
    count = reader.num_records()
  except Exception as e:  # array_record raises several types for missing or broken files
    raise _damaged(directory, path, e) from None
  if count != want:
    with contextlib.suppress(Exception):  # closing a broken file raises too
      reader.close()
    raise _damaged(directory, path, ValueError(f"{count} records, expected {want}"))
  return reader


class _Records:
  """The serialized records of a host's batches, read shard by shard from the files: in place
  when the data set is local, else from this process's copies (waiting for them to arrive).

  Open readers are kept (keep_open) unless copies may be deleted under a worker process that
  holds them; the process that deletes copies closes their readers first (`close_others`).
  """

  def __init__(self, directory: str, metadata: Dict, copies: Optional[str], keep_open: bool):
    self.directory, self.metadata = directory, metadata
    self.copies, self.keep_open = copies, keep_open
    self.shard_size = metadata["shard_size"]
    self.total = num_shards(metadata["num_examples"], self.shard_size)
    self._readers, self._lock = {}, threading.Lock()
    self.closed = threading.Event()  # set at close: read-ahead threads stop waiting for copies

  def __getstate__(self):  # readers, locks and events stay in their process
    return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock", "closed")}

  def __setstate__(self, state):
    self.__dict__.update(state, _readers={}, _lock=threading.Lock(), closed=threading.Event())

  def _reader(self, shard: int):
    with self._lock:
      if shard in self._readers:
        return self._readers[shard]
    path = shard_path(self.directory, shard, self.total)
    local = path if self.copies is None else storage.wait_for_copy(
        os.path.join(self.copies, os.path.basename(path)), path, abandoned=self.closed)
    reader = _open_shard(self.directory, self.metadata, shard, local)
    if not self.keep_open:
      return reader
    with self._lock:
      kept = self._readers.setdefault(shard, reader)
    if kept is not reader:  # another thread opened it meanwhile
      reader.close()
    return kept

  def read(self, indices: np.ndarray) -> List[Tuple[int, bytes]]:
    """[(index, record)] of the examples `indices`, in that order."""
    shards = indices // self.shard_size
    records: List = [None] * len(indices)
    for shard in np.unique(shards):
      rows = np.flatnonzero(shards == shard)
      reader = self._reader(int(shard))
      try:
        found = reader.read((indices[rows] - shard * self.shard_size).tolist())
      except Exception as e:  # an unreadable record: name its shard
        raise _damaged(self.directory, shard_path(self.directory, int(shard), self.total),
                       e) from None
      finally:
        if not self.keep_open:
          reader.close()
      for row, record in zip(rows, found):
        records[row] = (int(indices[row]), record)
    return records

  def close_others(self, keep) -> None:
    """Closes the readers of the shards not in `keep` (their copies are about to go)."""
    with self._lock:
      for shard in [s for s in self._readers if s not in keep]:
        self._readers.pop(shard).close()


def decoder(directory: str, metadata: Dict):
  """decode([(index, record), ...]) -> {targets float32, label int32, index int32, [noise]}."""
  from tensorflow.core.example import example_pb2  # protos only: a batch parses in one call
  image_shape = tuple(metadata["image_shape"])
  targets_shape = (metadata["num_times"],) + image_shape
  targets_dtype = TARGETS_DTYPES[metadata["targets_dtype"]]
  stored_noise = metadata["noise"] == "stored"

  def decode(items) -> Dict[str, np.ndarray]:
    targets, labels, indices, noise = [], [], [], []
    for position, record in items:
      try:
        feature = example_pb2.Example.FromString(record).features.feature
        targets.append(np.frombuffer(feature["targets"].bytes_list.value[0], targets_dtype)
                       .reshape(targets_shape))
        labels.append(feature["label"].int64_list.value[0])
        indices.append(feature["index"].int64_list.value[0])
        if stored_noise:
          noise.append(np.frombuffer(feature["noise"].bytes_list.value[0], np.float32)
                       .reshape(image_shape))
      except Exception as e:  # a record that does not parse: name its shard
        raise _damaged(directory, _shard_of(directory, metadata, position), e) from None
      if indices[-1] != position:
        raise _damaged(directory, _shard_of(directory, metadata, position),
                       ValueError(f"record {position} holds index {indices[-1]}"))
    batch = {"targets": np.stack(targets).astype(np.float32),
             "label": np.asarray(labels, np.int32), "index": np.asarray(indices, np.int32)}
    if stored_noise:
      batch["noise"] = np.stack(noise)
    return batch

  return decode


def check_shards_per_host(num_examples: int, shard_size: int, process_count: int) -> None:
  """ValueError when there are fewer shards than processes (each reads shards of its own);
  a warning when the processes' shares differ, so that some examples are read more often."""
  total = num_shards(num_examples, shard_size)
  loader.host_shards(total, 0, process_count)
  if total % process_count:
    logging.warning(
        "trajectories: %d shards over %d processes: some hold one shard more, so the examples "
        "of the others are read up to %.0f%% more often; a shard count that is a multiple of "
        "the process count (config.trajectory.shard_size) avoids it", total, process_count,
        100 / (total // process_count))


class _HostReading:
  """One process's batches of a trajectory data set, and the copies of its shards they need."""

  def __init__(self, directory: str, *, global_batch_size: int, seed: int, process_index: int,
               process_count: int, cache_gb: Optional[float], keep_open: bool):
    self.metadata = metadata = read_metadata(directory)
    self.directory = directory
    self.local_batch = loader.local_batch_size(global_batch_size, process_count)
    check_shards_per_host(metadata["num_examples"], metadata["shard_size"], process_count)
    total = num_shards(metadata["num_examples"], metadata["shard_size"])
    shards = loader.host_shards(total, process_index, process_count)
    ranges = {int(s): shard_range(int(s), metadata["num_examples"], metadata["shard_size"])
              for s in shards}
    sizes = storage.file_sizes(directory)
    self.paths = {s: shard_path(directory, s, total) for s in ranges}
    shard_bytes = [sizes.get(os.path.basename(self.paths[s]), 0) for s in ranges]
    group_size = loader.shards_per_group(
        shard_bytes, [len(r) for r in ranges.values()],
        budget_bytes=None if cache_gb is None else float(cache_gb) * 1e9,
        local_batch=self.local_batch)
    self.order = loader.HostShardOrder(ranges, group_size, seed=seed,
                                       process_index=process_index)
    remote = storage.is_remote(directory)
    # one directory per process: processes of one machine never delete each other's copies
    self.copies = (os.path.join(storage.cache_path(directory), f"host-{process_index}")
                   if remote else None)
    self.records = _Records(directory, metadata, self.copies, keep_open or not remote)
    self._prefetcher, self._resident = None, None
    logging.info("trajectories: process %d of %d reads %d of %d shards (%.3g GB) in groups of "
                 "%d shards%s", process_index, process_count, len(ranges), total,
                 sum(shard_bytes) / 1e9, group_size,
                 "" if not remote else f", copied to {self.copies}" + (
                     "" if cache_gb is None else f" (at most {cache_gb:g} GB)"))

  def dataset(self) -> grain.MapDataset:
    decode = decoder(self.directory, self.metadata)
    order, records, b = self.order, self.records, self.local_batch
    return grain.MapDataset.range(sys.maxsize).map(
        lambda step: decode(records.read(order.examples(step * b, (step + 1) * b))))

  def before_step(self, step: int) -> None:
    """Holds copies of exactly the shards that step's batch and the next group need."""
    if self.copies is None:
      return
    resident = self.order.resident(step * self.local_batch, (step + 1) * self.local_batch)
    if resident == self._resident:
      return
    if self._prefetcher is None:
      self._prefetcher = storage.Prefetcher(self.copies)
    self.records.close_others(set(resident))
    self._prefetcher.want([self.paths[s] for s in resident])
    self._resident = resident

  def close(self) -> None:
    self.records.closed.set()
    if self._prefetcher is not None:
      self._prefetcher.close()


def batch_iterator(directory: str, *, global_batch_size: int, seed: int, start_step: int = 0,
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   num_workers: int = 0,
                   cache_gb: Optional[float] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Endless per-host batches {targets (b,K,H,W,C) float32, label, index, [noise (b,H,W,C)]}.

  b = global_batch_size / process_count. Each process reads only its own shards
  (data/loader.py's HostShardOrder), so batch s depends on (seed, s) and the process count.
  A remote data set is read from copies of the shards that the coming batches need, at most
  cache_gb GB (1e9 bytes) of them on this process's disk (None: all of its shards).
  """
  process_index, process_count = loader.process_of(process_index, process_count)
  reading = _HostReading(directory, global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count,
                         cache_gb=cache_gb, keep_open=num_workers == 0)
  return loader.iterate(reading.dataset(), start_step, num_workers=num_workers,
                        before_step=reading.before_step, on_exit=reading.close)


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
