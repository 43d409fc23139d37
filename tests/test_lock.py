"""The workdir lock records the job: a run of the same job (DSNO_JAX_JOB_ID) takes over the lock
its job left on another host, as a relaunch after a hard kill on other machines does; another
job, or a run that names no job, is refused as before. On a local and a gs:// workdir."""
import json
import logging
import os
import socket
import uuid

import pytest

from dsno_jax import lock, storage
from dsno_jax.workdir import Workdir
from gcs_helpers import BUCKET, emulator  # noqa: F401  (the Cloud Storage emulator fixture)

ELSEWHERE = {"host": "another-host", "pid": 4242, "process_start": 17, "started": "yesterday",
             "what": "--mode=train", "token": "their-token"}


@pytest.fixture(params=["local", "gs"])
def path(request, tmp_path):
  """A workdir's lock path, local or in the emulator's bucket."""
  if request.param == "local":
    yield Workdir(str(tmp_path)).lock
    return
  request.getfixturevalue("emulator")
  path = Workdir(f"gs://{BUCKET}/lock-{uuid.uuid4().hex}").lock
  yield path
  if storage.exists(path):
    storage.remove(path)


def held_elsewhere(path, **record):
  """The lock as a process on another host left it (killed without releasing it)."""
  storage.makedirs(os.path.dirname(path))
  storage.write_text(path, json.dumps({**ELSEWHERE, **record}))


def test_a_run_records_its_job(path, monkeypatch):
  monkeypatch.setenv(lock.JOB_ENV, "slurm:1234")
  with lock.hold(path, "--mode=train"):
    record = json.loads(storage.read_text(path))
    assert (record["job"], record["pid"], record["host"]) == (
        "slurm:1234", os.getpid(), socket.gethostname())
  monkeypatch.delenv(lock.JOB_ENV)
  with lock.hold(path, "--mode=train"):
    assert json.loads(storage.read_text(path))["job"] is None
  assert not storage.exists(path)


def test_the_same_job_takes_its_lock_over_from_another_host(path, monkeypatch, caplog):
  held_elsewhere(path, job="tpu:dsno/imagenet64")
  monkeypatch.setenv(lock.JOB_ENV, "tpu:dsno/imagenet64")
  with caplog.at_level(logging.WARNING):
    with lock.hold(path, "--mode=pipeline"):
      record = json.loads(storage.read_text(path))
      assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
      assert record["what"] == "--mode=pipeline" and record["token"] != "their-token"
  assert (f"took over the lock {path} left by an earlier run of this job "
          "(DSNO_JAX_JOB_ID=tpu:dsno/imagenet64) (--mode=train, pid 4242 on host another-host, "
          "started yesterday)") in caplog.text
  assert not storage.exists(path)  # released as any lock


def test_another_job_is_refused_naming_the_holder(path, monkeypatch):
  held_elsewhere(path, job="slurm:1234")
  monkeypatch.setenv(lock.JOB_ENV, "slurm:5678")
  with pytest.raises(lock.WorkdirInUseError, match=r"in use by another run: --mode=train, pid "
                                                   r"4242 on host another-host.*delete"):
    with lock.hold(path, "--mode=train"):
      pass
  assert json.loads(storage.read_text(path))["job"] == "slurm:1234"  # left as found


@pytest.mark.parametrize("ours, theirs", [(None, "slurm:1234"), ("slurm:1234", None),
                                          ("", "")])
def test_without_a_job_on_both_sides_another_hosts_lock_is_refused(path, monkeypatch, ours,
                                                                   theirs):
  """A run that names no job, or a holder that recorded none (an older run), is never taken
  over from another host: the lock behaves as it did before jobs were recorded."""
  held_elsewhere(path, job=theirs)
  if ours is None:
    monkeypatch.delenv(lock.JOB_ENV, raising=False)
  else:
    monkeypatch.setenv(lock.JOB_ENV, ours)
  with pytest.raises(lock.WorkdirInUseError, match="pid 4242 on host another-host"):
    with lock.hold(path, "--mode=train"):
      pass
  assert json.loads(storage.read_text(path))["token"] == "their-token"
