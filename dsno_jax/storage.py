"""Every path the project reads or writes, local or Cloud Storage (`gs://`), through etils.epath.

Local paths keep their POSIX meaning (atomic writes by rename); on Cloud Storage an object
appears whole when its upload completes, so a write needs no temporary name. Libraries that
cannot open `gs://` (ArrayRecord, TensorBoard's writer against an emulator) write a local file
that `upload` copies up, and read a local copy made by `local_copy`, kept under `cache_dir()`;
data sets larger than a disk are read through a `Prefetcher`, which holds only the files asked for.
"""
import contextlib
import os
import posixpath
import shutil
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional, Sequence, Union

from absl import logging

import fsspec
from etils import epath

PathLike = Union[str, os.PathLike]
CACHE_ENV = "DSNO_JAX_CACHE_DIR"  # where local copies of remote files live
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "dsno_jax")
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"  # http://HOST:PORT of a Cloud Storage emulator

# Several processes (the hosts of a run) write the same bucket: a cached listing would hide
# their objects from each other, so gcsfs asks the bucket every time.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def configure_emulator() -> None:
  """Points every Cloud Storage client at $STORAGE_EMULATOR_HOST, when it is set.

  google-cloud-storage and gcsfs read that variable themselves; TensorStore (orbax's arrays)
  reads its own URL and a token; epath must use gcsfs rather than TensorFlow, whose GCS
  client has no emulator setting; gcsfs's bucket-layout probe needs a control plane that
  emulators lack and is read when gcsfs is imported, so this runs before (dsno_jax/__init__.py).
  Variables already set are kept.
  """
  host = os.environ.get(EMULATOR_ENV)
  if not host:
    return
  if "://" not in host:
    host = "http://" + host
  for name, value in (("TENSORSTORE_GCS_HTTP_URL", host),
                      ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "dummy"), ("EPATH_USE_TF", "false"),
                      ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")):
    os.environ.setdefault(name, value)


def is_remote(p: PathLike) -> bool:
  """True for a URL (`gs://bucket/...`), False for a local path."""
  return "://" in os.fspath(p)


def resolve(p: PathLike) -> str:
  """An absolute local path, or a URL unchanged."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(p)


def path(p: PathLike) -> epath.Path:
  """The epath.Path of `p` (absolute when local)."""
  return epath.Path(resolve(p))


def join(root: PathLike, *names: str) -> str:
  """`root/name/...` for a local path or a URL alike."""
  return os.path.join(os.fspath(root), *names)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  """A local directory, or a remote prefix that holds at least one object."""
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def getsize(p: PathLike) -> int:
  return path(p).stat().length


def makedirs(p: PathLike) -> None:
  """Creates a local directory and its parents; nothing on Cloud Storage (prefixes need none)."""
  if not is_remote(p):
    os.makedirs(resolve(p), exist_ok=True)


def listdir(p: PathLike) -> List[str]:
  """The sorted names in a directory (FileNotFoundError when there is none)."""
  if not is_remote(p):
    return sorted(os.listdir(resolve(p)))
  if not isdir(p):
    raise FileNotFoundError(f"no directory {p}")
  return sorted(c.name for c in path(p).iterdir())


def file_sizes(p: PathLike) -> Dict[str, int]:
  """{name: bytes} of the files directly in a directory, in one listing (local or remote)."""
  if not is_remote(p):
    with os.scandir(resolve(p)) as entries:
      return {e.name: e.stat().st_size for e in entries if e.is_file()}
  fs, name = fsspec.core.url_to_fs(resolve(p))
  return {posixpath.basename(e["name"].rstrip("/")): int(e["size"])
          for e in fs.ls(name, detail=True) if e["type"] == "file"}


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def write_bytes(p: PathLike, data: bytes) -> str:
  """Writes `data` so that no reader ever sees part of it; returns the resolved path.

  Locally: a private temporary file, synced, renamed over `p`; remotely: one object upload.
  """
  p = resolve(p)
  if is_remote(p):
    path(p).write_bytes(data)
    return p
  makedirs(os.path.dirname(p))
  tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return p


def write_text(p: PathLike, text: str) -> str:
  return write_bytes(p, text.encode("utf-8"))


def remove(p: PathLike) -> None:
  path(p).unlink()


def rmtree(p: PathLike) -> None:
  """Removes a directory (or every object under a prefix); nothing when there is none."""
  if isdir(p):
    path(p).rmtree()


def upload(local: str, p: PathLike) -> str:
  """Copies the local file `local` to `p` whole (a renamed temporary file when `p` is local)."""
  p = resolve(p)
  if not is_remote(p):
    makedirs(os.path.dirname(p))
    tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"
    shutil.copyfile(local, tmp)
    os.replace(tmp, p)
    return p
  fs, name = fsspec.core.url_to_fs(p)
  fs.put_file(local, name)  # a single upload: the object appears only once complete
  return p


def upload_tree(local: str, p: PathLike) -> None:
  """Uploads every file under the local directory `local` to the same names under `p`."""
  for directory, _, files in os.walk(local):
    for name in files:
      source = os.path.join(directory, name)
      upload(source, join(p, os.path.relpath(source, local)))


def cache_dir() -> str:
  """The local directory of copies of remote files: $DSNO_JAX_CACHE_DIR or ~/.cache/dsno_jax."""
  return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR))


def cache_path(p: PathLike) -> str:
  """The local place of a remote `p` in the cache (`cache_dir()/gs/bucket/...`); `p` if local."""
  p = resolve(p)
  if not is_remote(p):
    return p
  scheme, rest = p.split("://", 1)
  names = [n for n in rest.split("/") if n not in ("", ".", "..")]
  return os.path.join(cache_dir(), scheme, *names)


def _fetch_file(p: str, local: str) -> None:
  """Downloads `p` to `local` unless a copy of the same size and time is there already."""
  info = path(p).stat()
  if (os.path.isfile(local) and os.path.getsize(local) == info.length
      and int(os.path.getmtime(local)) == int(info.mtime)):
    return
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    fs, name = fsspec.core.url_to_fs(p)
    fs.get_file(name, tmp)
    os.utime(tmp, (info.mtime, info.mtime))
    os.replace(tmp, local)  # other processes of this machine may fetch the same file
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def local_copy(p: PathLike) -> str:
  """A local path holding the file or directory `p`: `p` itself when local, else a cached copy.

  A remote directory is copied with every file under it; files already cached with the
  remote size and modification time are not fetched again.
  """
  p = resolve(p)
  if not is_remote(p):
    return p
  local = cache_path(p)
  if not isdir(p):
    if not isfile(p):
      raise FileNotFoundError(f"{p} does not exist")
    _fetch_file(p, local)
    return local
  os.makedirs(local, exist_ok=True)
  scheme = p.split("://", 1)[0]
  fs, name = fsspec.core.url_to_fs(p)
  for found in fs.find(name):
    remote = f"{scheme}://{found}"
    _fetch_file(remote, cache_path(remote))
  return local


@contextlib.contextmanager
def temporary_copy(p: PathLike) -> Iterator[str]:
  """A local path holding the file `p` for the duration: `p` itself when local, else a fresh
  copy under `cache_dir()` that is deleted afterwards."""
  p = resolve(p)
  if not is_remote(p):
    yield p
    return
  local = f"{cache_path(p)}.{uuid.uuid4().hex[:8]}.copy"
  try:
    _fetch_file(p, local)
    yield local
  finally:
    if os.path.exists(local):
      os.remove(local)


FAILED_SUFFIX = ".failed"  # next to a copy that could not be made: the error, for its readers


class CopyAbandoned(Exception):
  """Its reader closed while a thread still waited for a copy that will now never come."""


def wait_for_copy(local: str, remote: str, poll_s: float = 0.01,
                  abandoned: Optional[threading.Event] = None) -> str:
  """`local` once a Prefetcher (in this or another process) has copied `remote` there.

  OSError with the fetch's error when it failed; no time limit, since a copy wanted ahead of
  time may only be fetched once the reader before it moves on. CopyAbandoned once `abandoned`
  is set: a read-ahead thread must not wait past its reader's close (Python joins such threads
  at exit, so the process would never end).
  """
  while not os.path.exists(local):
    failed = local + FAILED_SUFFIX
    if os.path.exists(failed):
      with open(failed) as f:
        raise OSError(f"copying {remote} to {local} failed: {f.read()}")
    if abandoned is not None and abandoned.is_set():
      raise CopyAbandoned(f"the reader of {remote} was closed")
    time.sleep(poll_s)
  return local


class Prefetcher:
  """Local copies of remote files in `directory`, fetched in a background thread in the order
  of the last `want`, and deleted as soon as a `want` leaves them out.

  The directory holds at most the files of the last `want` (and, while it finishes, one
  download that a later `want` dropped), so the caller bounds its size by what it asks for.
  The directory belongs to this object: what a killed process left there is deleted. Readers,
  in any process, wait for a copy with `wait_for_copy(prefetcher.local(remote), remote)`.
  """

  _active: Dict[str, "Prefetcher"] = {}  # one per directory in a process
  _active_lock = threading.Lock()

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    with Prefetcher._active_lock:
      stale = Prefetcher._active.get(self.directory)
      Prefetcher._active[self.directory] = self
    if stale is not None:  # an iterator of this process that was dropped without closing
      logging.warning("storage: a new reader of %s replaces one left open", self.directory)
      stale.close()
    shutil.rmtree(self.directory, ignore_errors=True)
    os.makedirs(self.directory)
    self._wanted: List[str] = []
    self._fetched = set()  # remote paths whose copy is complete
    self._closed = False
    self._changed = threading.Condition()
    self._thread = threading.Thread(target=self._fetch_wanted, name="prefetcher", daemon=True)
    self._thread.start()

  def local(self, remote: str) -> str:
    return os.path.join(self.directory, posixpath.basename(remote))

  def want(self, remotes: Sequence[str]) -> None:
    """Keeps exactly these files: deletes the other copies now, fetches the missing in order."""
    remotes = [resolve(r) for r in remotes]
    keep = {os.path.basename(self.local(r)) for r in remotes}
    with self._changed:
      self._wanted = remotes
      self._fetched &= set(remotes)
      for name in os.listdir(self.directory):
        stem = name[:-len(FAILED_SUFFIX)] if name.endswith(FAILED_SUFFIX) else name
        if stem not in keep and not name.endswith(".tmp"):  # .tmp: the download under way
          os.remove(os.path.join(self.directory, name))
      self._changed.notify()

  def _fetch_wanted(self):
    while True:
      with self._changed:
        while not self._closed and not self._next():
          self._changed.wait()
        if self._closed:
          return
        remote = self._next()
      local = self.local(remote)
      try:
        _fetch_file(remote, local)
      except Exception as e:  # every reader of it should see why, not wait forever
        if self._closed:  # nobody reads any more: its directory or bucket may be gone
          return
        with open(local + FAILED_SUFFIX, "w") as f:
          f.write(f"{type(e).__name__}: {e}")
      with self._changed:
        if remote in self._wanted:
          self._fetched.add(remote)
        else:  # dropped while it was fetched
          for name in (local, local + FAILED_SUFFIX):
            if os.path.exists(name):
              os.remove(name)

  def _next(self):
    for remote in self._wanted:
      if remote not in self._fetched:
        return remote
    return None

  def close(self) -> None:
    """Stops fetching (a download under way finishes in the background); copies stay."""
    with self._changed:
      self._closed = True
      self._changed.notify()
    with Prefetcher._active_lock:
      if Prefetcher._active.get(self.directory) is self:
        del Prefetcher._active[self.directory]
