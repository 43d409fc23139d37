"""Trajectories in a bucket (the emulator of test_gcs.py): each process copies only its own
shards, a group at a time, its copies never exceed data.cache_gb, and its batches are those of
the same data set read in place."""
import os
import sys
import threading
import time

import numpy as np
import pytest
from gcs_helpers import BUCKET, emulator  # noqa: F401 (the emulator fixture)
from test_trajectories import MANY, MANY_SHARD, _plan, _take, _write, _write_seeded

from dsno_jax import storage
from dsno_jax.data import trajectories

NUM_SHARDS = MANY // MANY_SHARD


def _files(directory):
  """{name: bytes} of every file under `directory` (none when it does not exist)."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      try:
        found[os.path.join(root, name)] = os.path.getsize(os.path.join(root, name))
      except FileNotFoundError:  # deleted while listed
        pass
  return found


class DiskWatch:
  """Samples the bytes under a directory in a thread: the largest total and every name seen."""

  def __init__(self, directory):
    self.directory, self.largest, self.names = directory, 0, set()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.sample()
      self._stop.wait(0.001)

  def sample(self):
    files = _files(self.directory)
    self.largest = max(self.largest, sum(files.values()))
    # a copy being written is NAME.RANDOM.tmp
    self.names |= {os.path.basename(n).rsplit(".", 2)[0] if n.endswith(".tmp")
                   else os.path.basename(n) for n in files}

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *_):
    self._stop.set()
    self._thread.join()


@pytest.fixture(scope="module")
def datasets(emulator, tmp_path_factory):  # noqa: F811 (the fixture's name)
  """The same data set in place and in the bucket, and a cache bound of 5 shards' bytes."""
  plan = _plan(num_examples=MANY, shard_size=MANY_SHARD)
  local, remote = str(tmp_path_factory.mktemp("local") / "data"), f"gs://{BUCKET}/many"
  for directory in (local, remote):
    _write(directory, plan)
    trajectories.finalize(directory, plan)
  sizes = [os.path.getsize(trajectories.shard_path(local, s, NUM_SHARDS))
           for s in range(NUM_SHARDS)]
  return local, remote, 5 * max(sizes) / 1e9


def test_each_process_copies_only_its_shards_within_the_bound(datasets, tmp_path, monkeypatch):
  local, remote, cache_gb = datasets
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  bound = cache_gb * 1e9
  names = lambda shards: {os.path.basename(trajectories.shard_path(remote, s, NUM_SHARDS))
                          for s in shards}
  for p in range(2):
    kw = dict(global_batch_size=8, seed=3, process_index=p, process_count=2, cache_gb=cache_gb)
    steps = 2 * (MANY // 2) // 4  # two epochs of this process's 24 examples, 4 a batch
    want = _take(trajectories.batch_iterator(local, **kw), steps)
    copies = os.path.join(storage.cache_path(remote), f"host-{p}")
    got = []
    with DiskWatch(copies) as watch:
      iterator = trajectories.batch_iterator(remote, **kw)
      for _ in range(steps):
        got.append(next(iterator))
        watch.sample()
        assert sum(_files(copies).values()) <= bound
      iterator.close()
      resumed = _take(trajectories.batch_iterator(remote, start_step=7, **kw), steps - 7)
    for x, y in zip(want, got):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])
    for x, y in zip(want[7:], resumed):
      np.testing.assert_array_equal(x["index"], y["index"])
    print(f"process {p}: at most {watch.largest} bytes copied at once, bound {bound:.0f}, "
          f"data set {sum(storage.file_sizes(remote).values())}")
    assert 0 < watch.largest <= bound
    # every one of its 6 shards came through the cache, never another process's
    own = names(range(p, NUM_SHARDS, 2))
    assert {n for n in watch.names if ".array_record-" in n} == own
    assert len(own) * min(storage.getsize(trajectories.shard_path(remote, s, NUM_SHARDS))
                          for s in range(NUM_SHARDS)) > bound  # so some were evicted
  # nothing else in the cache: no whole copy of the data set
  assert {os.path.relpath(os.path.dirname(n), storage.cache_path(remote))
          for n in _files(str(tmp_path / "cache"))} <= {"host-0", "host-1"}


def _waiting_for_copies():
  """The threads of this process that wait in storage.wait_for_copy now."""
  return [thread for thread, frame in sys._current_frames().items()  # pylint: disable=protected-access
          if any(f.f_code is storage.wait_for_copy.__code__
                 for f in _frames(frame))]


def _frames(frame):
  while frame is not None:
    yield frame
    frame = frame.f_back


def test_a_closed_iterator_leaves_no_thread_waiting_for_a_copy(datasets, tmp_path, monkeypatch):
  # Grain's read-ahead threads ask for batches whose shards are not wanted yet; one left waiting
  # after the close is joined at interpreter exit, so the process would never end.
  _, remote, cache_gb = datasets
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  iterator = trajectories.batch_iterator(remote, global_batch_size=8, seed=3, process_index=0,
                                         process_count=2, cache_gb=cache_gb)
  waited = False
  for _ in range(12):  # until the read-ahead reaches shards not yet wanted
    next(iterator)
    deadline = time.monotonic() + 1
    while not (waited := bool(_waiting_for_copies())) and time.monotonic() < deadline:
      time.sleep(0.02)
    if waited:
      break
  assert waited  # else this test would check nothing
  iterator.close()
  deadline = time.monotonic() + 10
  while _waiting_for_copies() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not _waiting_for_copies()


def test_the_noise_check_copies_one_shard_and_deletes_it(emulator, tmp_path, monkeypatch):  # noqa: F811
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  directory = f"gs://{BUCKET}/seeded"
  plan = _plan(noise="seeded", seed=7)
  _write_seeded(directory, plan)
  metadata = trajectories.read_metadata(directory)
  trajectories.check_noise(directory, metadata, process_index=1, process_count=2)
  assert _files(str(tmp_path / "cache")) == {}
  metadata["seed"] = 8
  with pytest.raises(ValueError, match="is not what seed 8 regenerates"):
    trajectories.check_noise(directory, metadata, process_index=1, process_count=2)
  assert _files(str(tmp_path / "cache")) == {}
