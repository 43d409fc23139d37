"""The order in which examples are read (one epoch permutation for every data set) and prefetching.

Step s of a run reads positions [s*B, (s+1)*B) of the stream formed by concatenating per-epoch
permutations drawn from (seed, epoch); host p of P takes the p-th contiguous B/P of them. The
batch of a step is thus a pure function of (seed, step), so a resumed run reads exactly the
batches an uninterrupted one would, on any number of hosts.
"""
import functools
import queue
import threading
from typing import Iterator

import numpy as np


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, 0, epoch]).permutation(num_examples)


def local_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that host `process_index` feeds."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes (expected a positive multiple)")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def step_indices(step: int, *, num_examples: int, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Example indices (int64) of this host's rows of global batch `step`."""
  if num_examples <= 0:
    raise ValueError("the data set is empty")
  rows = local_rows(global_batch_size, process_index, process_count)
  positions = step * global_batch_size + np.arange(rows.start, rows.stop, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(len(positions), np.int64)
  for epoch in np.unique(epochs):
    chosen = epochs == epoch
    out[chosen] = epoch_permutation(seed, int(epoch), num_examples)[offsets[chosen]]
  return out


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Produces the next items in a background thread while the current one is used."""
  items: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce():
    try:
      for item in iterator:
        items.put(item)
    except Exception as e:  # surfaced in the consumer
      items.put(e)
    items.put(done)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = items.get()
    if item is done:
      return
    if isinstance(item, Exception):
      raise item
    yield item
