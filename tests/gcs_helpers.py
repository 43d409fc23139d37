"""Shared pieces of the Cloud Storage tests: the emulator on loopback, a teacher in its bucket,
the tiny gs:// pipeline's command line, and what a run left in the bucket."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils.epath import gpath
import training_helpers as helpers

from dsno_jax import models, storage
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir

BUCKET = "bkt"
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


@contextlib.contextmanager
def running_emulator(log_path: str, python: str = sys.executable):
  """The URL of a gcp-storage-emulator on 127.0.0.1 with bucket BUCKET, stopped on exit."""
  port = helpers.free_port()
  with open(log_path, "w") as log:
    process = subprocess.Popen(
        [python, "-c", _EMULATOR, "start", "--host=127.0.0.1", f"--port={port}",
         "--in-memory", f"--default-bucket={BUCKET}"], stdout=log, stderr=subprocess.STDOUT)
    try:
      _wait_for_port(port, process)
      yield f"http://127.0.0.1:{port}"
    finally:
      process.kill()
      process.wait(30)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's URL; this process's Cloud Storage clients point at it meanwhile."""
  saved = dict(os.environ)
  try:
    with running_emulator(tmp_path_factory.mktemp("emulator") / "emulator.log",
                          helpers.python()) as url:
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


@pytest.fixture(scope="module")
def teacher(emulator):
  """A save_model teacher export in the bucket (random one-level UNet)."""
  config = helpers.one_level_config()
  params = models.teacher_from_config(config).init(
      jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1)), np.zeros((1,)), np.zeros((1,), np.int32),
      train=False)
  path = f"gs://{BUCKET}/teachers/tiny"
  model_io.save_model(path, params["params"], config, "teacher")
  return path


def pipeline_flags(workdir: str, teacher: str, **flags) -> list:
  """dsno_jax.main's flags for the shortened tiny pipeline (plus `flags`) on workdir."""
  flags = {**OVERRIDES, "teacher.checkpoint": teacher, **flags}
  return [f"--config={os.path.join(helpers.ROOT, 'configs', 'tiny.py')}",
          f"--workdir={workdir}", "--mode=pipeline"] + [
              f"--config.{name}={value}" for name, value in flags.items()]


def pipeline_command(workdir: str, teacher: str, **flags) -> list:
  return [helpers.python(), "-m", "dsno_jax.main", *pipeline_flags(workdir, teacher, **flags)]


def child_env(num_devices: int, cache: str = "") -> dict:
  """A child's environment: the emulator's address alone (the package maps it to every client
  itself) and its own cache of local copies (when given)."""
  env = helpers.subprocess_env(num_devices)
  for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "EPATH_USE_TF",
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
    env.pop(name, None)
  if cache:
    env[storage.CACHE_ENV] = cache
  return env


def objects(prefix: str):
  """Names of the objects under gs://BUCKET/prefix."""
  from google.cloud import storage as gcs
  return sorted(b.name for b in gcs.Client().list_blobs(BUCKET, prefix=prefix))


def object_bytes(prefix: str) -> int:
  """Total size of the objects under gs://BUCKET/prefix."""
  from google.cloud import storage as gcs
  return sum(b.size for b in gcs.Client().list_blobs(BUCKET, prefix=prefix))


def student_steps(run: str):
  """The finished student checkpoints (orbax marks one on Cloud Storage with a commit file)."""
  names = [n.split("/") for n in objects(f"{run}/checkpoints/student/")]
  return sorted(int(n[3]) for n in names if n[3].isdigit() and n[4:] == ["commit_success.txt"])


def exported(workdir):
  params, _, role = model_io.load_model(Workdir(workdir).student_export)
  assert role == "student"
  return jax.tree_util.tree_leaves(params)


def assert_same_results(want_workdir: str, got_workdir: str):
  """Both runs exported the same student (within 1e-6) and evaluated the same table rows."""
  want, got = exported(want_workdir), exported(got_workdir)
  assert len(got) == len(want) > 10
  for a, b in zip(want, got):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  results = [json.loads(storage.read_text(Workdir(w).results))
             for w in (want_workdir, got_workdir)]
  assert results[0]["rows"] == results[1]["rows"]
