"""The input pipeline, on Grain, for images and trajectories alike.

Every epoch is one global permutation of the examples drawn from (seed, epoch) (Grain's
index shuffle), process p of P takes positions p, p + P, p + 2P, ... of that stream, and
consecutive runs of them form its batches, decoded a batch at a time. The per-host datasets
are indexable: batch s is element s, so the batches of a run depend only on (seed, step), and
a run resumed at step s (the step its train state holds) reads exactly what an uninterrupted
one would. Reading runs in threads or worker processes, ahead of the train step.
"""
from typing import Callable, Dict, Iterator, Optional, Sequence

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
            num_threads: int = 2, prefetch: int = 4) -> Iterator[Batch]:
  """Batches start_step, start_step + 1, ... read ahead in threads (and worker processes)."""
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  iterable = dataset[start_step:].to_iter_dataset(read)
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app use defaults
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iterable)


def process_of(process_index: Optional[int], process_count: Optional[int]):
  """(process_index, process_count), JAX's when not given."""
  if process_index is None or process_count is None:
    import jax
    return jax.process_index(), jax.process_count()
  return process_index, process_count
