"""The FID clu metric, its merging across devices and hosts, reference statistics."""
import os
import socket
import subprocess
import sys
import textwrap

import flax
import jax
import numpy as np
import pytest
import scipy.linalg
from clu import metrics as clu_metrics

from dsno_jax.evaluation import FID, fid

D = 24


def gaussian_features(seed, n, d=D, offset=0.0):
  """(n, d) correlated Gaussian features with a non-zero mean."""
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(d, d)) / np.sqrt(d)
  return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d) + offset


def scipy_fid(x, y):
  """The textbook float64 FID (pytorch-fid's recipe): np.cov and scipy.linalg.sqrtm."""
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = covmean.real if np.iscomplexobj(covmean) else covmean
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def accumulate(metric_cls, features, num_parts):
  metric = metric_cls.empty()
  for part in np.array_split(features, num_parts):
    metric = metric.merge(metric_cls.from_model_output(features=part))
  return metric


def test_fid_equals_float64_scipy_fid():
  x, y = gaussian_features(0, 700), gaussian_features(1, 500)
  metric_cls = FID.with_reference(y.mean(0), np.cov(y, rowvar=False))
  value = accumulate(metric_cls, x, 5).compute()
  expected = scipy_fid(x, y)
  assert expected > 1.0
  np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_jitted_float32_updates_agree_with_float64():
  x, y = gaussian_features(2, 640), gaussian_features(3, 400)
  metric_cls = FID.with_reference(y.mean(0), np.cov(y, rowvar=False))
  update = jax.jit(lambda f: metric_cls.from_model_output(features=f))
  metric = metric_cls.empty()
  for part in np.split(x.astype(np.float32), 4):
    metric = metric.merge(update(part))
  np.testing.assert_allclose(metric.compute(), scipy_fid(x, y), rtol=1e-4)


def test_merging_8_parts_equals_one_pass():
  x = gaussian_features(4, 803)
  one_pass = FID.from_model_output(features=x)
  parts = [FID.from_model_output(features=p) for p in np.array_split(x, 8)]
  sequential = FID.empty()
  for p in parts:
    sequential = sequential.merge(p)
  pairs = [parts[i].merge(parts[i + 1]) for i in range(0, 8, 2)]  # a tree, as devices reduce
  tree = pairs[0].merge(pairs[1]).merge(pairs[2].merge(pairs[3]))
  mu, sigma = one_pass.statistics()
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
  for merged in (sequential, tree):
    assert float(merged.count) == len(x)
    np.testing.assert_allclose(merged.statistics()[0], mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.statistics()[1], sigma, rtol=1e-10, atol=1e-12)


def test_mask_leaves_out_padding():
  x = gaussian_features(5, 64)
  mask = np.arange(64) < 50
  padded = np.where(mask[:, None], x, 1e6)  # what a padded last batch would hold
  masked = FID.from_model_output(features=padded, mask=mask)
  assert float(masked.count) == 50
  np.testing.assert_allclose(masked.statistics()[1], np.cov(x[:50], rowvar=False), atol=1e-10)


def test_gather_over_8_devices_equals_one_pass():
  assert jax.device_count() == 8
  x = gaussian_features(6, 8 * 40).astype(np.float32)
  metric_cls = FID.with_reference(np.zeros(D), np.eye(D))

  @flax.struct.dataclass
  class Metrics(clu_metrics.Collection):
    fid: metric_cls

  gathered = jax.pmap(lambda f: Metrics.gather_from_model_output(features=f),
                      axis_name="batch")(x.reshape(8, 40, D))
  merged = gathered.unreplicate().fid
  mu, sigma = merged.statistics()
  np.testing.assert_allclose(mu, x.mean(0), atol=1e-5)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-5)
  np.testing.assert_allclose(merged.compute(), metric_cls.from_model_output(features=x).compute(),
                             rtol=1e-5)


def test_jit_over_a_batch_sharded_on_8_devices_equals_one_pass():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = gaussian_features(14, 8 * 30).astype(np.float32)
  metric = jax.jit(lambda f: FID.from_model_output(features=f))(jax.device_put(x, sharding))
  mu, sigma = metric.statistics()
  np.testing.assert_allclose(mu, x.mean(0), atol=1e-5)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-5)


def test_shifted_sums_survive_a_large_mean_in_float32():
  # With |mu| = 1e4 and unit spread, raw sums in float32 lose every digit of the covariance.
  x = gaussian_features(7, 4096, offset=1e4).astype(np.float32)
  metric = jax.jit(lambda f: FID.from_model_output(features=f))(x[:2048])
  metric = metric.merge(jax.jit(lambda f: FID.from_model_output(features=f))(x[2048:] + 0.5))
  x = np.concatenate([x[:2048], x[2048:] + 0.5]).astype(np.float64)
  np.testing.assert_allclose(metric.statistics()[1], np.cov(x, rowvar=False), atol=2e-3)


def test_fid_against_own_statistics_is_zero():
  x = gaussian_features(8, 900)
  metric = accumulate(FID, x, 3)
  value = FID.with_reference(*metric.statistics()).from_model_output(features=x).compute()
  assert abs(value) < 1e-9


def test_two_gaussians_match_closed_form():
  rng = np.random.default_rng(9)
  mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
  var1, var2 = rng.uniform(0.2, 2.0, size=D), rng.uniform(0.2, 2.0, size=D)
  # Diagonal covariances commute: (S1 S2)^(1/2) = diag(sqrt(var1 var2)).
  closed_form = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
  q, _ = np.linalg.qr(rng.normal(size=(D, D)))  # FID is invariant under a common rotation
  s1, s2 = q @ np.diag(var1) @ q.T, q @ np.diag(var2) @ q.T
  value = fid.frechet_distance(q @ mu1, s1, q @ mu2, s2)
  np.testing.assert_allclose(value, closed_form, rtol=1e-10)
  # Sampled features converge to it.
  x = rng.normal(size=(20000, D)) * np.sqrt(var1) + mu1
  sampled = FID.with_reference(mu2, np.diag(var2)).from_model_output(features=x).compute()
  np.testing.assert_allclose(sampled, closed_form, rtol=0.05)


def test_singular_covariances_give_a_finite_fid():
  x = gaussian_features(10, 10)  # 10 samples in 24 dimensions: rank-9 covariance
  y = gaussian_features(11, 12)
  value = FID.with_reference(y.mean(0), np.cov(y, rowvar=False)).from_model_output(
      features=x).compute()
  assert np.isfinite(value) and value > 0


def test_compute_needs_a_matching_reference():
  x = gaussian_features(12, 50)
  with pytest.raises(ValueError, match="with_reference"):
    FID.from_model_output(features=x).compute()
  with pytest.raises(ValueError, match="size 24 against reference statistics of size 5"):
    FID.with_reference(np.zeros(5), np.eye(5)).from_model_output(features=x).compute()
  with pytest.raises(ValueError, match="expected mu"):
    FID.with_reference(np.zeros(5), np.eye(4))
  with pytest.raises(ValueError, match="at least 2"):
    FID.from_model_output(features=x[:1]).statistics()


def test_reference_statistics_files(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3)
  path = fid.save_reference_statistics(str(tmp_path / "ref.npz"), mu, sigma)
  loaded = fid.load_reference_statistics(path)
  np.testing.assert_array_equal(loaded[0], mu)
  np.testing.assert_array_equal(loaded[1], sigma)
  with pytest.raises(FileNotFoundError, match="mu"):
    fid.load_reference_statistics(str(tmp_path / "absent.npz"))
  np.savez(tmp_path / "keys.npz", mean=mu, cov=sigma)
  with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]"):
    fid.load_reference_statistics(str(tmp_path / "keys.npz"))
  np.savez(tmp_path / "shape.npz", mu=mu, sigma=np.eye(4))
  with pytest.raises(ValueError, match=r"mu has shape \(3,\) and sigma \(4, 4\)"):
    fid.load_reference_statistics(str(tmp_path / "shape.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="junk.npz"):
    fid.load_reference_statistics(str(tmp_path / "junk.npz"))


def _tiny_image_builder(data_dir, images):
  """A prepared TFDS data set of `images` (uint8 (N, 4, 4, 1)), built offline in data_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class FidTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    # TFDS's lookup of this module's path wants the importlib_resources back-port.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(4, 4, 1))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, image in enumerate(images):
        yield i, {"image": image}

  builder = FidTestImages(data_dir=data_dir)
  builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"),
                               download_config=tfds.download.DownloadConfig(
                                   compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def test_tfds_reference_statistics_are_computed_and_cached(tmp_path):
  rng = np.random.default_rng(13)
  images = rng.integers(0, 256, size=(37, 4, 4, 1), dtype=np.uint8)
  builder = _tiny_image_builder(str(tmp_path / "data"), images)
  calls = []

  def feature_fn(batch):
    calls.append(len(batch))
    return batch.reshape(len(batch), -1).astype(np.float64) / 255.0

  args = (feature_fn, builder, "train", str(tmp_path / "cache"))
  mu, sigma = fid.tfds_reference_statistics(*args, feature_name="pixels", batch_size=16)
  flat = images.reshape(37, -1) / 255.0
  np.testing.assert_allclose(mu, flat.mean(0), atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(flat, rowvar=False), atol=1e-12)
  assert calls == [16, 16, 5]
  assert os.listdir(tmp_path / "cache") == ["fid_stats_fid_test_images-1.0.0_train_pixels.npz"]
  cached = fid.tfds_reference_statistics(*args, feature_name="pixels")
  assert calls == [16, 16, 5]  # served from the cache
  np.testing.assert_array_equal(cached[1], sigma)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    fid.tfds_reference_statistics(feature_fn, "mnist", "train", str(tmp_path / "cache"),
                                  feature_name="pixels", data_dir=str(tmp_path / "empty"))


_HOST_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    from dsno_jax.evaluation import fid
    rng = np.random.default_rng(0)
    x = rng.normal(size=(301, 6)) * 1e-3 + 1e3  # float32 would lose the spread
    mine = np.array_split(x, 2)[process_id]
    merged = fid.merge_across_processes(fid.FID.from_model_output(features=mine))
    mu, sigma = merged.statistics()
    np.savez(out, mu=mu, sigma=sigma, count=float(merged.count))
    jax.distributed.shutdown()
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_merge_across_two_processes(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen([sys.executable, "-c", _HOST_SCRIPT, str(i), str(port),
                             str(tmp_path / f"host{i}.npz")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=180)[0].decode() for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)
  x = np.random.default_rng(0).normal(size=(301, 6)) * 1e-3 + 1e3
  for i in range(2):
    result = np.load(tmp_path / f"host{i}.npz")
    assert float(result["count"]) == 301
    np.testing.assert_allclose(result["mu"], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(result["sigma"], np.cov(x, rowvar=False), rtol=1e-6, atol=1e-14)
