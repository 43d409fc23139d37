"""Every path the project reads or writes, local or Cloud Storage (`gs://`), through etils.epath.

Local paths keep their POSIX meaning (atomic writes by rename); on Cloud Storage an object
appears whole when its upload completes, so a write needs no temporary name. Libraries that
cannot open `gs://` (ArrayRecord, TensorBoard's writer against an emulator) write a local file
that `upload` copies up, and read a local copy made by `local_copy`, kept under `cache_dir()`.
"""
import os
import shutil
import uuid
from typing import List, Union

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
