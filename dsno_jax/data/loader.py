"""The input pipeline, on Grain: the read orders of images and trajectories, and read-ahead.

Images: every epoch is one global permutation of the examples drawn from (seed, epoch)
(Grain's index shuffle), process p of P takes positions p, p + P, p + 2P, ... of that stream.
Trajectories (`HostShardOrder`): process p owns the shards s with s % P == p and reads only
those, so its local disk needs only its own shards, and only a group of them at a time.
Consecutive runs of a host's stream form its batches, decoded a batch at a time. The per-host
datasets are indexable: batch s is element s, so the batches of a run depend only on
(seed, step) and the host layout, and a run resumed at step s (the step its train state holds)
reads exactly what an uninterrupted one would. Reading runs in threads or worker processes,
ahead of the train step.
"""
import functools
import math
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import grain
import numpy as np

Batch = Dict[str, np.ndarray]


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows of each global batch that one process reads."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes (expected a positive multiple)")
  return global_batch_size // process_count


class _Indexed:
  """A random-access source whose element i is (i, source[i]): decoders can check positions."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return index, self.source[index]


def batches(source, decode_batch: Callable[[Sequence], Batch], *, global_batch_size: int,
            seed: int, process_index: int, process_count: int,
            augment: Optional[Callable] = None) -> grain.MapDataset:
  """This process's endless, indexable sequence of batches of `source`.

  decode_batch([(index, record), ...]) -> {name: (b, ...) array}: one call per batch.
  augment((index, record), rng) -> (index, record): a random transform whose generator
  depends on (seed, position in the stream), so it is the same on any number of hosts.
  """
  local = local_batch_size(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if len(source) == 0:
    raise ValueError("the data source is empty")
  stream = grain.MapDataset.source(_Indexed(source)).shuffle(seed=seed).repeat()
  if augment is not None:
    stream = stream.random_map(augment, seed=seed)
  return stream[process_index::process_count].batch(local, drop_remainder=True,
                                                    batch_fn=decode_batch)


def iterate(dataset: grain.MapDataset, start_step: int = 0, *, num_workers: int = 0,
            num_threads: int = 2, prefetch: int = 4,
            before_step: Optional[Callable[[int], None]] = None,
            on_exit: Optional[Callable[[], None]] = None) -> Iterator[Batch]:
  """Batches start_step, start_step + 1, ... read ahead in threads (and worker processes).

  before_step(s) runs in this process when batch s is asked for, every batch before it having
  been delivered (a cache may then drop what only those needed); on_exit() when the iterator
  is closed or collected.
  """
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  iterable = dataset[start_step:].to_iter_dataset(read)
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app use defaults
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  if before_step is None and on_exit is None:
    return iter(iterable)
  return _with_hooks(iterable, start_step, before_step, on_exit)


def _with_hooks(iterable, step, before_step, on_exit) -> Iterator[Batch]:
  iterator = None
  try:
    while True:
      if before_step is not None:
        before_step(step)
      if iterator is None:  # Grain starts reading ahead here
        iterator = iter(iterable)
      yield next(iterator)
      step += 1
  finally:
    if on_exit is not None:
      on_exit()


def host_shards(num_shards: int, process_index: int, process_count: int) -> np.ndarray:
  """The shards process p owns: s % process_count == p (at least one each)."""
  if num_shards < process_count:
    raise ValueError(
        f"the data set has {num_shards} shards for {process_count} processes; each process "
        "reads shards of its own, so expected at least one shard per process (write more, "
        "smaller shards: lower config.trajectory.shard_size and generate again)")
  return np.arange(process_index, num_shards, process_count)


def shards_per_group(shard_bytes: Sequence[int], shard_lengths: Sequence[int], *,
                     budget_bytes: Optional[float], local_batch: int) -> int:
  """How many of a host's shards are shuffled together (and held on its disk at once).

  All of them when they fit in budget_bytes (None: no bound); else as many as let two
  groups, the one read and the next one fetched, fit, each group holding at least a batch
  (so a batch spans at most two groups).
  """
  count = len(shard_bytes)
  if budget_bytes is None or sum(shard_bytes) <= budget_bytes:
    return count
  largest = max(shard_bytes)
  size = int(budget_bytes // (2 * largest))
  if size < 1:
    raise ValueError(
        f"config.data.cache_gb={budget_bytes / 1e9:g} holds fewer than two of this host's "
        f"trajectory shards ({largest / 1e9:.3g} GB the largest); expected at least "
        f"{2 * largest / 1e9:.3g} (or smaller shards: config.trajectory.shard_size)")
  smallest = count // -(-count // size)  # np.array_split's smallest part, in shards
  fewest = sum(sorted(shard_lengths)[:smallest])
  if fewest < local_batch:
    raise ValueError(
        f"config.data.cache_gb={budget_bytes / 1e9:g} gives groups of {smallest} shards that "
        f"may hold only {fewest} examples, fewer than this host's batch of {local_batch}; "
        "expected a larger cache_gb (or larger shards)")
  return size


class HostShardOrder:
  """The order in which one process reads the examples of its own shards, epoch after epoch.

  Epoch e visits the shards in a permutation drawn from (seed, process, e), split into groups
  of at most `group_size` shards; the examples of a group are shuffled together (a permutation
  drawn from (seed, process, e, group)) and read before the next group's. Every example of
  the process's shards is read exactly once per epoch. Picklable (Grain's workers), pure.
  """

  def __init__(self, ranges: Mapping[int, range], group_size: int, *, seed: int,
               process_index: int):
    self.ranges = {int(s): r for s, r in ranges.items()}
    self.shards = np.asarray(sorted(self.ranges), np.int64)
    self.group_size = int(group_size)
    self.num_groups = math.ceil(len(self.shards) / self.group_size)
    self.epoch_length = sum(len(r) for r in self.ranges.values())
    self.entropy = [int(seed) % 2**63, int(process_index)]

  @functools.lru_cache(maxsize=4)
  def epoch(self, epoch: int) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray]:
    """(shards of each group, the example at each position of the epoch, each group's end)."""
    shards = np.random.default_rng(self.entropy + [epoch]).permutation(self.shards)
    groups = np.array_split(shards, self.num_groups)
    examples = [np.random.default_rng(self.entropy + [epoch, g]).permutation(
        np.concatenate([np.arange(self.ranges[s].start, self.ranges[s].stop) for s in group]))
                for g, group in enumerate(groups)]
    return groups, np.concatenate(examples), np.cumsum([len(e) for e in examples])

  def examples(self, start: int, stop: int) -> np.ndarray:
    """The example indices at stream positions [start, stop)."""
    parts = []
    while start < stop:
      epoch, offset = divmod(start, self.epoch_length)
      take = min(stop - start, self.epoch_length - offset)
      parts.append(self.epoch(epoch)[1][offset:offset + take])
      start += take
    return np.concatenate(parts)

  def _groups(self, start: int, stop: int) -> List[Tuple[int, int]]:
    """(epoch, group) of every group with a position in [start, stop), in order."""
    found = []
    for position in (start, stop - 1):
      epoch, offset = divmod(position, self.epoch_length)
      found.append((epoch, int(np.searchsorted(self.epoch(epoch)[2], offset, side="right"))))
    (e0, g0), (e1, g1) = found
    keys, (e, g) = [], (e0, g0)
    while (e, g) <= (e1, g1):
      keys.append((e, g))
      e, g = (e, g + 1) if g + 1 < self.num_groups else (e + 1, 0)
    return keys

  def resident(self, start: int, stop: int) -> List[int]:
    """The shards to hold while positions [start, stop) are read: their groups, and the group
    after them when they lie in one, in reading order."""
    if self.num_groups == 1:
      return self.shards.tolist()
    keys = self._groups(start, stop)
    if len(keys) == 1:
      e, g = keys[0]
      keys.append((e, g + 1) if g + 1 < self.num_groups else (e + 1, 0))
    shards = []
    for e, g in keys:
      shards += [int(s) for s in self.epoch(e)[0][g] if s not in shards]
    return shards


def process_of(process_index: Optional[int], process_count: Optional[int]):
  """(process_index, process_count), JAX's when not given."""
  if process_index is None or process_count is None:
    import jax
    return jax.process_index(), jax.process_count()
  return process_index, process_count
