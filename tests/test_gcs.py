"""Cloud Storage workdirs, against a real emulator on loopback: the 2-process pipeline writes
every file to the bucket, resumes after a kill -9 on a machine with nothing local, reads a
teacher from the bucket, and locks its workdir."""
import json
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from etils.epath import gpath
import training_helpers as helpers

from configs import tiny
from dsno_jax import lock, models, storage
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir

BUCKET = "bkt"
TIMEOUT_S = 600  # generous: the machine may be shared
# The tiny pipeline, shortened: a teacher read from the bucket (no teacher training), the
# student alone in the evaluation, a one-level UNet (compiles faster).
OVERRIDES = {"model.ch_mult": "(1,)", "model.attn_resolutions": "(8,)",
             # enough steps after the first checkpoint that the kill lands before the last one
             "train.num_steps": 40, "train.checkpoint_every": 4, "train.log_every": 4,
             "train.sample_every": 0, "eval.teacher_rows": "()", "eval.classifier_steps": 20}


# gcp-storage-emulator, with the x-goog-generation header that Cloud Storage sends with every
# object download and the emulator leaves out: TensorStore reads an object's generation from it
# (OCDBT checks its manifest's) and fails with "Malformed StorageGeneration" without it.
_EMULATOR = """
import sys
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

download = objects.download

def download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  except Exception:  # a missing object: the download handler answers 404 itself
    pass
  return download(request, response, storage, *args, **kwargs)

objects.download = download_with_generation  # reached through objects.get(alt=media)
for _, methods in server.HANDLERS:  # and the download routes bound at import
  for method, handler in methods.items():
    if handler is download:
      methods[method] = download_with_generation
sys.exit(main())
"""


def _wait_for_port(port: int, process, timeout: float = 30.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"gcp-storage-emulator exited with status {process.returncode}")
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
      return
    except OSError:
      time.sleep(0.1)
  raise TimeoutError(f"gcp-storage-emulator did not listen on port {port} in {timeout} s")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's URL; this process's Cloud Storage clients point at it meanwhile."""
  port = helpers.free_port()
  log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
  process = subprocess.Popen(
      [helpers.python(), "-c", _EMULATOR, "start", "--host=127.0.0.1", f"--port={port}",
       "--in-memory", f"--default-bucket={BUCKET}"], stdout=log, stderr=subprocess.STDOUT)
  saved = dict(os.environ)
  try:
    _wait_for_port(port, process)
    url = f"http://127.0.0.1:{port}"
    os.environ[storage.EMULATOR_ENV] = url
    storage.configure_emulator()
    # epath decides once per process whether gs:// goes through TensorFlow; earlier tests of
    # this session may have made it decide before EPATH_USE_TF was set.
    gpath._is_tf_installed.cache_clear()
    yield url
  finally:
    os.environ.clear()
    os.environ.update(saved)
    gpath._is_tf_installed.cache_clear()
    process.kill()
    process.wait(30)
    log.close()


def objects(prefix: str):
  """Names of the objects under gs://BUCKET/prefix."""
  from google.cloud import storage as gcs
  return sorted(b.name for b in gcs.Client().list_blobs(BUCKET, prefix=prefix))


@pytest.fixture(scope="module")
def teacher(emulator):
  """A save_model teacher export in the bucket (random one-level UNet)."""
  config = pipeline_config()
  params = models.teacher_from_config(config).init(
      jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1)), np.zeros((1,)), np.zeros((1,), np.int32),
      train=False)
  path = f"gs://{BUCKET}/teachers/tiny"
  model_io.save_model(path, params["params"], config, "teacher")
  return path


def pipeline_config():
  config = tiny.get_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), (8,)
  return config


def start(workdir, teacher, cwd, cache):
  """launch/local.py: the pipeline in 2 processes; a new session, so a kill reaches all."""
  flags = {**OVERRIDES, "teacher.checkpoint": teacher}
  command = [helpers.python(), os.path.join(helpers.ROOT, "launch", "local.py"),
             "--num_processes=2", "--devices_per_process=1", f"--timeout={TIMEOUT_S}", "--",
             helpers.python(), "-m", "dsno_jax.main",
             f"--config={os.path.join(helpers.ROOT, 'configs', 'tiny.py')}",
             f"--workdir={workdir}", "--mode=pipeline"] + [
                 f"--config.{name}={value}" for name, value in flags.items()]
  os.makedirs(cwd, exist_ok=True)
  env = helpers.subprocess_env(1)
  # only the emulator's address: the package maps it to every client itself
  for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "EPATH_USE_TF",
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
    env.pop(name, None)
  env[storage.CACHE_ENV] = cache
  log = open(os.path.join(cwd, "run.log"), "a")
  return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True), os.path.join(cwd, "run.log")


def finish(process, log):
  try:
    assert process.wait(timeout=TIMEOUT_S) == 0, open(log).read()[-5000:]
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)


def student_steps(run: str):
  """The finished student checkpoints (orbax marks one on Cloud Storage with a commit file)."""
  names = [n.split("/") for n in objects(f"{run}/checkpoints/student/")]
  return sorted(int(n[3]) for n in names if n[3].isdigit() and n[4:] == ["commit_success.txt"])


def exported(workdir):
  params, _, role = model_io.load_model(Workdir(workdir).student_export)
  assert role == "student"
  return jax.tree_util.tree_leaves(params)


def test_the_two_process_pipeline_lives_in_the_bucket_and_resumes_from_it_alone(
    emulator, teacher, tmp_path):
  straight, killed = f"gs://{BUCKET}/straight", f"gs://{BUCKET}/killed"
  # One after the other: the second run loads the programs the first compiled (the cache).
  finish(*start(straight, teacher, str(tmp_path / "a"), str(tmp_path / "cache_a")))
  victim, victim_log = start(killed, teacher, str(tmp_path / "b"), str(tmp_path / "cache_b"))
  try:
    deadline = time.time() + TIMEOUT_S
    while not student_steps("killed") and victim.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert victim.poll() is None, open(victim_log).read()[-5000:]  # still training
    os.killpg(victim.pid, signal.SIGKILL)  # both processes and their launcher, mid-training
    victim.wait(TIMEOUT_S)
  finally:
    if victim.poll() is None:
      os.killpg(victim.pid, signal.SIGKILL)
  assert victim.returncode == -signal.SIGKILL, open(victim_log).read()[-5000:]
  steps = student_steps("killed")
  assert steps and steps[-1] < OVERRIDES["train.num_steps"], steps
  assert not model_io.is_export(Workdir(killed).student_export)

  # A recreated VM: an empty working directory and cache; only the bucket survives.
  finish(*start(killed, teacher, str(tmp_path / "c"), str(tmp_path / "cache_c")))
  log = open(tmp_path / "c" / "run.log").read()
  assert "resuming at step" in log, log[-5000:]
  assert "pipeline: classifier is done, skipping" in log and "generate is done" in log, log[-5000:]

  listing = objects("straight/")
  print("bucket listing of the uninterrupted run:\n  " + "\n  ".join(listing))
  for name in ("lock.json",):
    assert f"straight/{name}" not in listing  # released
  for name in ("classifier/model.json", "trajectories/dataset_info.json",
               "trajectories/generation.json", "export/model.json", "samples/samples.npz",
               "samples/grid.png", "eval/results.json", "eval/results.md",
               "checkpoints/student/config.json", "checkpoints/student/40/"):
    assert any(n.startswith(f"straight/{name}") for n in listing), name
  assert any(n.startswith("straight/logs/student/events.out.tfevents") for n in listing)
  assert any(".array_record-" in n for n in listing)
  for cwd in "abc":  # nothing of the run was written as a local path named gs:
    assert sorted(os.listdir(tmp_path / cwd)) == ["run.log"], os.listdir(tmp_path / cwd)

  want, got = exported(straight), exported(killed)
  assert len(got) == len(want) > 10
  for a, b in zip(want, got):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  results = [json.loads(storage.read_text(Workdir(w).results)) for w in (straight, killed)]
  assert results[0]["rows"] == results[1]["rows"]


def test_a_gs_workdir_is_locked_and_a_lock_of_another_host_is_never_taken(emulator):
  path = Workdir(f"gs://{BUCKET}/locked").lock
  with lock.hold(path, "--mode=train"):
    record = json.loads(storage.read_text(path))
    assert record["pid"] == os.getpid() and record["what"] == "--mode=train"
    second = _hold_elsewhere(path)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"in use by another run: --mode=train, pid {os.getpid()} on host" in second.stderr
  assert not storage.exists(path)  # released
  storage.write_text(path, json.dumps({"host": "elsewhere", "pid": 1, "started": "yesterday",
                                       "what": "--mode=train", "token": "t"}))
  with pytest.raises(lock.WorkdirInUseError, match=rf"pid 1 on host elsewhere.*gcloud storage "
                                                   rf"rm {path}"):
    with lock.hold(path, "--mode=train"):
      pass
  assert json.loads(storage.read_text(path))["host"] == "elsewhere"  # left as found
  storage.remove(path)


def _hold_elsewhere(path):
  """Another process tries the lock that this one holds."""
  code = ("import sys\nfrom dsno_jax import lock\n"
          "with lock.hold(sys.argv[1], 'second'):\n  pass\n")
  second = subprocess.run([helpers.python(), "-c", code, path], cwd=helpers.ROOT,
                          env=helpers.subprocess_env(1), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
  return second


def test_storage_round_trips_and_local_copies(emulator, tmp_path, monkeypatch):
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  root = f"gs://{BUCKET}/roundtrip"
  storage.write_text(storage.join(root, "a", "x.txt"), "hello")
  storage.write_bytes(storage.join(root, "b.bin"), b"\0\1")
  assert storage.isdir(root) and storage.isfile(storage.join(root, "b.bin"))
  assert storage.listdir(root) == ["a", "b.bin"]
  local = storage.local_copy(root)
  assert local == str(tmp_path / "cache" / "gs" / BUCKET / "roundtrip")
  assert open(os.path.join(local, "a", "x.txt")).read() == "hello"
  (tmp_path / "up.txt").write_text("up")
  storage.upload(str(tmp_path / "up.txt"), storage.join(root, "up.txt"))
  assert storage.read_text(storage.join(root, "up.txt")) == "up"
  storage.rmtree(root)
  assert not storage.exists(storage.join(root, "b.bin"))
  assert not os.path.exists(os.path.join(os.getcwd(), "gs:"))


def test_dsno_jax_load_samples_an_export_in_the_bucket(teacher):
  import dsno_jax
  model = dsno_jax.load(teacher)
  images = model.sample(4, solver="ddim", nfe=2, batch_size=4)
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
