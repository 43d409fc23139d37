"""One run per workdir: a lock file naming its holder (host, pid, start, job), created atomically.

A run holds its workdir's lock for its whole life; a second run on the same workdir stops at
once, naming the holder. A lock left by a killed run on this host (its pid is gone) is taken
over, and so is a lock left by the same job (`DSNO_JAX_JOB_ID`, which the launchers set) on any
host: a job relaunched after a hard kill, on a recreated TPU slice or a requeued SLURM job's
other nodes, is not blocked by its own lock. The lock is reached through three operations,
those of a generation-checked object: `LocalLockFile` for a local workdir, `CloudLockFile` for a
`gs://` one (a create with if_generation_match=0, a read that returns the generation, a delete
with if_generation_match: https://cloud.google.com/storage/docs/request-preconditions).
"""
import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional

from absl import logging

from dsno_jax import storage

JOB_ENV = "DSNO_JAX_JOB_ID"  # the job a run belongs to; it outlives relaunches of that job
_TAKEOVER_ATTEMPTS = 5  # a lock that changes hands this often between our reads is contended
_held: Dict[str, int] = {}  # lock path -> nesting depth, for the locks this process holds
_held_guard = threading.Lock()


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir's lock."""


def _stat(pid: int) -> Optional[List[str]]:
  """The fields of /proc/PID/stat after the command name (Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None


def _process_start(pid: int) -> Optional[int]:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  fields = _stat(pid)
  try:
    return int(fields[19]) if fields else None
  except (IndexError, ValueError):
    return None


def _is_dead(pid: int) -> bool:
  """A zombie (killed, not yet reaped: where the parent was killed too and the host's init
  reaps slowly) has finished as surely as a pid that is gone."""
  fields = _stat(pid)
  return bool(fields) and fields[0] in ("Z", "X")


def _job() -> Optional[str]:
  """This run's job id from the environment, or None when it names no job."""
  return os.environ.get(JOB_ENV, "").strip() or None


def _this_process(what: str) -> Dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "process_start": _process_start(os.getpid()),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "what": what, "job": _job(), "token": uuid.uuid4().hex}


class LocalLockFile:
  """The lock as a file; its generation is the token inside its record."""

  def __init__(self, path: str):
    self.path = path

  def create(self, record: Dict) -> bool:
    """Writes `record` as the lock if there is none (atomic); False when a lock exists.

    The record is written to a private file first and hard-linked into place, so a reader
    never sees a half-written lock; file systems without hard links get O_CREAT | O_EXCL.
    """
    tmp = f"{self.path}.{record['token']}.tmp"
    with open(tmp, "w") as f:
      json.dump(record, f)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError:  # no hard links here
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
      return True
    finally:
      os.remove(tmp)

  def read(self) -> Optional[Dict]:
    """The holder's record; None when there is no lock; {} when it cannot be parsed."""
    try:
      with open(self.path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
    except ValueError:
      return {}
    return record if isinstance(record, dict) else {}

  def delete(self, token: str) -> bool:
    """Removes the lock if it still holds `token`; False (lock untouched) otherwise.

    The lock is renamed to a private name first (atomic), so only that one file is judged,
    and put back by hard link when it turns out to be another holder's.
    """
    aside = f"{self.path}.{uuid.uuid4().hex}.released"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    with open(aside) as f:
      try:
        ours = json.load(f).get("token") == token
      except (ValueError, AttributeError):
        ours = False
    if not ours:
      try:
        os.link(aside, self.path)
      except FileExistsError:
        logging.error("lock %s changed hands while being released; its holder %s lost it",
                      self.path, aside)
        return False
    os.remove(aside)
    return ours


class CloudLockFile:
  """The lock as a Cloud Storage object; Cloud Storage's preconditions make each step atomic.

  Each operation also checks what it reads first, which changes nothing on Cloud Storage and
  keeps the lock sound on emulators that ignore preconditions.
  """

  def __init__(self, path: str):
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    self.path, self._exceptions = path, exceptions
    bucket, _, name = path.split("://", 1)[1].partition("/")
    self._bucket = gcs.Client().bucket(bucket)  # an emulator's client needs no project
    self._name = name

  def create(self, record: Dict) -> bool:
    if self._bucket.get_blob(self._name) is not None:
      return False
    try:
      self._bucket.blob(self._name).upload_from_string(
          json.dumps(record), content_type="application/json", if_generation_match=0)
      return True
    except self._exceptions.PreconditionFailed:
      return False

  def _get(self):
    """(the record as read, its generation), or (None, None) when there is no lock."""
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return None, None
    try:
      text = blob.download_as_bytes(if_generation_match=blob.generation).decode()
    except (self._exceptions.NotFound, self._exceptions.PreconditionFailed):
      return None, None  # replaced or released between the two requests: look again
    try:
      record = json.loads(text)
    except ValueError:
      return {}, blob.generation
    return (record if isinstance(record, dict) else {}), blob.generation

  def read(self) -> Optional[Dict]:
    return self._get()[0]

  def delete(self, token: str) -> bool:
    record, generation = self._get()
    if not record or record.get("token") != token:
      return False
    try:
      self._bucket.blob(self._name).delete(if_generation_match=generation)
      return True
    except (self._exceptions.NotFound, self._exceptions.PreconditionFailed):
      return False


def _describe(record: Dict) -> str:
  if not record:
    return "an unreadable lock record"
  return (f"{record.get('what', 'a run')}, pid {record.get('pid')} on host "
          f"{record.get('host')}, started {record.get('started')}")


def _is_stale(record: Dict) -> bool:
  """True when the holder ran on this host and its process is gone (or its pid reused)."""
  if not record or record.get("host") != socket.gethostname():
    return False
  pid = record.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  if _is_dead(pid):
    return True
  started = record.get("process_start")
  return started is not None and _process_start(pid) not in (None, started)


def _takeover_reason(record: Dict) -> Optional[str]:
  """Why the holder's lock may be taken over, or None when it may not."""
  if _is_stale(record):
    return "a run that is gone"
  job = _job()
  if job is not None and record.get("job") == job:
    # A process of this job runs only after the job's previous processes stopped (a launcher
    # relaunches a job once it ended; a requeued SLURM job starts after its last run), so the
    # holder is this job's earlier run, killed without releasing the lock.
    return f"an earlier run of this job ({JOB_ENV}={job})"
  return None


def _in_use_message(workdir: str, path: str, record: Dict) -> str:
  if not record:
    return (f"the workdir {workdir} is locked, but its lock file {path} cannot be read. If no "
            f"run is using this workdir, delete {path} and start again; otherwise use another "
            "--workdir")
  delete = f"gcloud storage rm {path}" if storage.is_remote(path) else f"rm {path}"
  return (f"the workdir {workdir} is in use by another run: {_describe(record)} (lock file "
          f"{path}). Wait for it to finish, or stop it (kill {record.get('pid')} on "
          f"{record.get('host')}) and start this run again, or use another --workdir. If that "
          f"run is gone but was on another host (a lock of another host cannot be checked from "
          f"here), delete its lock (`{delete}`) and start again.")


@contextlib.contextmanager
def hold(path: str, what: str, enabled: bool = True) -> Iterator[None]:
  """Holds the lock file `path` (in the workdir) for the block's life; WorkdirInUseError if taken.

  `what` (e.g. "--mode=train") is recorded for the message another run shows. Re-entrant
  in one process, so a pipeline that holds the lock can run its modes. `enabled=False` (the
  processes other than 0 of a multi-process run) holds nothing. `path` may be a `gs://` URL.
  """
  workdir = os.path.dirname(path)
  with _held_guard:
    nested = path in _held
    if nested:
      _held[path] += 1
  if nested:
    try:
      yield
    finally:
      with _held_guard:
        _held[path] -= 1
    return
  if not enabled:
    yield
    return

  storage.makedirs(workdir)
  store = CloudLockFile(path) if storage.is_remote(path) else LocalLockFile(path)
  record = _this_process(what)
  for _ in range(_TAKEOVER_ATTEMPTS):
    if store.create(record):
      break
    holder = store.read()
    if holder is None:  # released between our two looks
      continue
    reason = _takeover_reason(holder)
    if reason is None:
      raise WorkdirInUseError(_in_use_message(workdir, path, holder))
    if store.delete(holder.get("token", "")):
      logging.warning("took over the lock %s left by %s (%s)", path, reason, _describe(holder))
    time.sleep(0.01)
  else:
    raise WorkdirInUseError(f"the lock {path} of {workdir} changed hands {_TAKEOVER_ATTEMPTS} "
                            "times while this run tried to take it; is another run starting? "
                            "Try again in a moment")
  with _held_guard:
    _held[path] = 1
  try:
    yield
  finally:
    with _held_guard:
      del _held[path]
    if not store.delete(record["token"]):
      logging.error("the lock %s no longer held this run's record on release", path)
