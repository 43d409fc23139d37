"""Evaluation features over the whole mesh: 8 devices give the FID of 1, 2 processes that of 1,
padding rows never reach the statistics, one compilation serves every batch, any batch size."""
import os
import subprocess

import jax
import numpy as np
import pytest
import training_helpers as helpers

from configs import tiny
from dsno_jax import parallel
from dsno_jax.data import images as images_lib
from dsno_jax.evaluation import classifier, evaluate, fid
from param_utils import random_params

helpers.use_compilation_cache()
NUM_IMAGES, BATCH = 37, 8  # the last batch is short on any number of devices
TIMEOUT_S = 300


def classifier_params():
  """The digits classifier at a random (fixed) initialisation, for 8x8x1 images."""
  shapes = jax.eval_shape(classifier.DigitsClassifier().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32))["params"]
  return random_params(shapes, seed=5, scale=0.3)


def fixed_images(seed=0, n=NUM_IMAGES):
  """(uint8 images (n, 8, 8, 1), labels (n,)): smooth blobs, so the features are not all alike."""
  rng = np.random.default_rng(seed)
  grid = np.arange(8.0)
  centres = rng.uniform(1, 7, (n, 2, 1, 1))
  blobs = np.exp(-((grid[:, None] - centres[:, 0]) ** 2 + (grid[None] - centres[:, 1]) ** 2) / 6)
  images = np.clip(255 * blobs + rng.normal(0, 20, blobs.shape), 0, 255).astype(np.uint8)
  return images[..., None], rng.integers(0, 10, n)


def reference():
  """(mu, sigma) of other images' features, computed on the host."""
  other, _ = fixed_images(seed=1, n=200)
  features, _ = classifier.uint8_feature_fns(classifier_params())
  return fid.FID.from_model_output(features(other)).statistics()


def mesh_features(mesh, traces=None):
  """FD-digits features over `mesh`; `traces` (a list) records each trace of the network."""
  def apply(params, images):
    if traces is not None:
      traces.append(images.shape)
    return classifier.uint8_outputs(params, images)
  return evaluate.MeshFeatures("FD-digits", apply, classifier_params(), mesh, BATCH)


def memorization():
  train, _ = fixed_images(seed=2, n=60)
  test, _ = fixed_images(seed=3, n=30)
  features, _ = classifier.uint8_feature_fns(classifier_params())
  return evaluate.Memorization(features(train), features(test))


def eval_config(data_dir):
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.eval.batch_size = BATCH
  return config


def measure(config, workdir, mesh):
  """What the evaluation computes with the mesh's features: the reference statistics of the
  digits train split, the held-out split's features, a row's scores."""
  features = mesh_features(mesh)
  mu, sigma = evaluate.reference_statistics(config, str(workdir), "FD-digits", features)
  test_features, test_labels = evaluate.split_features(
      config, str(workdir), config.data.eval_split, features, "test features")
  images, labels = fixed_images()
  row, (distances, indices) = evaluate.score(images, labels, features, reference(),
                                             memorization())
  return dict(mu=mu, sigma=sigma, test_features=test_features, test_labels=test_labels,
              distances=distances, indices=indices, **row)


@pytest.fixture(scope="module")
def images():
  return fixed_images()


@pytest.fixture(scope="module")
def host_features(images):
  """Features of the images on one device, without the mesh (the evaluation's former way)."""
  features, logits = classifier.uint8_feature_fns(classifier_params())
  return features(images[0]), logits(images[0])


def test_eight_devices_equal_one_device(images, host_features):
  assert jax.device_count() == 8
  rows = {}
  for num_devices in (1, 8):
    traces = []
    features = mesh_features(helpers.mesh_of(num_devices), traces)
    metric, local, logits = features.local(lambda positions: images[0][positions], NUM_IMAGES,
                                           "features")
    # the padded last batch: its padding is dropped and never reaches the statistics
    assert local.shape == (NUM_IMAGES, classifier.FEATURE_DIM) and float(metric.count) == NUM_IMAGES
    for got, want in zip((local, logits), host_features):  # float32 rounding apart
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    mu, sigma = metric.statistics()
    np.testing.assert_allclose(mu, local.astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(local.astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-12)
    assert traces == [(BATCH, 8, 8, 1)]  # one compilation for every batch, the short one too
    rows[num_devices], _ = evaluate.score(*images, features, reference())
  host = fid.FID.with_reference(*reference()).compute(fid.FID.from_model_output(host_features[0]))
  print(f"FD-digits: 1 device {rows[1]['metric']!r}, 8 devices {rows[8]['metric']!r}, host "
        f"{host!r}")
  assert rows[1]["metric"] > 0.1
  np.testing.assert_allclose(rows[8]["metric"], rows[1]["metric"], rtol=1e-6)
  np.testing.assert_allclose(rows[1]["metric"], host, rtol=1e-5)
  assert rows[8]["class_accuracy"] == rows[1]["class_accuracy"] == float(
      np.mean(host_features[1].argmax(-1) == images[1]))


def test_inception_fid_on_eight_devices_equals_one_device():
  """Random Inception weights and one padded batch of few images (each is resized to 299x299)."""
  from dsno_jax.evaluation import inception
  params = inception.init_params(0)
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  ref_mu = rng.uniform(0, 1, inception.FEATURE_DIM)
  ref_sigma = np.diag(rng.uniform(0, 0.1, inception.FEATURE_DIM))
  values = {}
  for num_devices in (1, 8):
    features = evaluate.MeshFeatures(
        "FID", lambda p, x: (inception.inception_features(p, x), None), params,
        helpers.mesh_of(num_devices), BATCH)
    metric, local, logits = features.local(lambda positions: images[positions], len(images),
                                           "pool3")
    assert local.shape == (6, inception.FEATURE_DIM) and logits is None
    assert float(metric.count) == 6
    # the reference first: its Cholesky factor exists, the 6 samples' covariance is singular
    values[num_devices] = fid.frechet_distance(ref_mu, ref_sigma, *metric.statistics())
  print(f"FID of random Inception: 1 device {values[1]!r}, 8 devices {values[8]!r}")
  assert values[1] > 1.0
  np.testing.assert_allclose(values[8], values[1], rtol=1e-6)


def test_memorization_reuses_the_rows_features(images, host_features):
  """The memorisation columns come from the features that made the FID, gathered once."""
  features = mesh_features(helpers.mesh_of(8))
  check = memorization()
  row, (distances, indices) = evaluate.score(*images, features, reference(), check)
  want, want_distances, want_indices = check.measure(host_features[0])
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_allclose(distances, want_distances, rtol=1e-5)
  assert row["nn_train_median"] == pytest.approx(want["nn_train_median"], rel=1e-5)


def test_bad_shares_are_refused():
  with pytest.raises(ValueError, match="3 local rows; expected .* 5 rows"):
    parallel.gather_shares(np.zeros((3, 2)), 5)
  with pytest.raises(ValueError, match=r"rows per process \[0\]"):
    list(parallel.map_local_rows(parallel.jit_rowwise(lambda p, x: x, helpers.mesh_of(1)), {},
                                 lambda positions: positions, 0, 8, helpers.mesh_of(1)))


def test_a_batch_that_divides_no_device_count_is_padded(images, host_features):
  """eval.batch_size=1000 on 16 devices: each batch is rounded up, its padding dropped."""
  features = evaluate.MeshFeatures("FD-digits", classifier.uint8_outputs, classifier_params(),
                                   helpers.mesh_of(8), 13)
  metric, local, logits = features.local(lambda positions: images[0][positions], NUM_IMAGES,
                                         "features")
  assert float(metric.count) == NUM_IMAGES
  for got, want in zip((local, logits), host_features):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


WORKER = r"""
import sys
import jax
import ml_collections
import numpy as np
import test_evaluation_mesh as case
from dsno_jax import parallel

process_id, port, data_dir, workdir, out = sys.argv[1:]
config = case.eval_config(data_dir)
config.distributed = ml_collections.ConfigDict(dict(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id)))
parallel.initialize_distributed(config)
assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
np.savez(out, **case.measure(config, workdir, parallel.make_mesh()))
"""


def test_two_processes_equal_one_process(tmp_path):
  """2 processes of 2 devices each against 1 process of 4: 37 samples, batches of 8."""
  data_dir = tmp_path / "tfds"
  config = eval_config(data_dir)
  images_lib.load_source(config, str(tmp_path), config.data.train_split)  # prepared once
  port = helpers.free_port()
  env = dict(helpers.subprocess_env(2), PYTHONPATH=os.pathsep.join(
      [helpers.ROOT, os.path.dirname(os.path.abspath(__file__))]))
  workers = []
  for i in range(2):
    log = open(tmp_path / f"process_{i}.log", "w")
    workers.append((subprocess.Popen(
        [helpers.python(), "-c", WORKER, str(i), str(port), str(data_dir),
         str(tmp_path / "two"), str(tmp_path / f"two_{i}.npz")],
        cwd=helpers.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log.name))
  try:
    one = measure(config, tmp_path / "one", helpers.mesh_of(4))
    for process, log in workers:
      assert process.wait(timeout=TIMEOUT_S) == 0, open(log).read()[-4000:]
  finally:
    for process, _ in workers:
      if process.poll() is None:
        process.kill()
  assert len(one["test_features"]) == len(one["test_labels"]) > 300
  for i in range(2):
    two = np.load(tmp_path / f"two_{i}.npz")
    np.testing.assert_allclose(two["mu"], one["mu"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two["sigma"], one["sigma"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two["test_features"], one["test_features"], rtol=0,
                               atol=1e-5 * np.abs(one["test_features"]).max())
    np.testing.assert_array_equal(two["test_labels"], one["test_labels"])
    np.testing.assert_allclose(float(two["metric"]), one["metric"], rtol=1e-6)
    assert float(two["class_accuracy"]) == one["class_accuracy"]
    np.testing.assert_array_equal(two["indices"], one["indices"])
    np.testing.assert_allclose(two["distances"], one["distances"], rtol=1e-5)
  # the cache of the reference statistics was written once, by process 0, and holds the same
  cached = fid.load_reference_statistics(
      [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "two") for f in files
       if f.endswith(".npz")][0])
  np.testing.assert_allclose(cached[0], one["mu"], rtol=1e-6, atol=1e-6)
