"""FID as a clu metric: mergeable shifted feature sums, and the Fréchet distance to reference statistics.

Numerical stability over 50k x 2048 features comes from two choices:
- Shifted sums. The metric keeps `count`, `shift` (D,), `total = sum(x - shift)` and
  `outer = sum((x - shift)(x - shift)^T)`, with `shift` near the mean: a batch's own mean,
  and after `merge` the count-weighted mean of both shifts, onto which both sums are
  rebased exactly (Chan et al.'s pairwise update). The covariance
  `(outer - total total^T / n) / (n - 1)` then never subtracts two large, nearly equal
  numbers, as the raw `E[x x^T] - mu mu^T` does when |mu| is large against the spread
  (Inception pool3 features are non-negative, their means comparable to their spreads).
- float64 where precision accumulates. Inside `jit`/`pmap` (per-step `from_model_output`,
  clu's `gather_from_model_output` reductions) the sums are float32, centred, and span one
  step; `merge` of concrete metrics (the host loop over 50k samples) and everything built
  from host arrays runs in numpy float64, so round-off does not grow with the step count.
  `compute()` is float64 on the host. (jax's float64 is off by default, hence not jnp.)
Under `jax.jit` with a batch sharded over a mesh, `from_model_output` of the global batch
already sums over every device; under `pmap`, use clu's `gather_from_model_output`; across
hosts, `merge_across_processes`.
"""
import io
import re
import zipfile
from typing import Any, Callable, Iterable, Optional, Tuple

import clu.metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import storage

Array = Any


def _is_traced(*values) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in values)


def _gram(xp, a):
  """a^T a, at full float32 precision on accelerators (their default matmul is bfloat16)."""
  if xp is jnp:
    return jnp.matmul(a.T, a, precision=jax.lax.Precision.HIGHEST)
  return a.T @ a


def _outer(a, b):
  return a[:, None] * b[None, :]


@flax.struct.dataclass
class FID(clu.metrics.Metric):
  """Feature statistics for FID; see the module docstring for the shifted-sum layout.

  count: () number of feature vectors; shift: (D,); total: (D,); outer: (D, D).
  `empty()` has scalar placeholders (D is unknown until features arrive).
  """
  count: Array
  shift: Array
  total: Array
  outer: Array

  @classmethod
  def empty(cls):
    zero = np.zeros((), np.float64)
    return cls(count=zero, shift=zero, total=zero, outer=zero)

  @classmethod
  def from_model_output(cls, features: Array, mask: Optional[Array] = None, **_):
    """Statistics of features (N, D); rows where the 0/1 `mask` (N,) is 0 are left out."""
    if features.ndim != 2:
      raise ValueError(f"features of shape {features.shape}; expected (N, D)")
    traced = _is_traced(features, mask)
    xp, dtype = (jnp, jnp.float32) if traced else (np, np.float64)
    x = xp.asarray(features).astype(dtype)
    weight = xp.ones(x.shape[:1], dtype) if mask is None else xp.asarray(mask).astype(dtype)
    if weight.shape != x.shape[:1]:
      raise ValueError(f"mask of shape {weight.shape}; expected ({x.shape[0]},)")
    count = weight.sum()
    shift = (weight @ x) / xp.maximum(count, 1)
    centred = (x - shift) * weight[:, None]
    return cls(count=count, shift=shift, total=centred.sum(0), outer=_gram(xp, centred))

  def merge(self, other: "FID") -> "FID":
    if np.ndim(other.shift) == 0:
      return self
    if np.ndim(self.shift) == 0:
      return other
    if np.shape(self.shift) != np.shape(other.shift):
      raise ValueError(f"merging FID statistics of feature sizes {np.shape(self.shift)} and "
                       f"{np.shape(other.shift)}")
    parts = (self.count, self.shift, self.total, self.outer,
             other.count, other.shift, other.total, other.outer)
    if _is_traced(*parts):
      xp = jnp
    else:
      xp = np
      parts = [np.asarray(p, np.float64) for p in parts]
    count_a, shift_a, total_a, outer_a, count_b, shift_b, total_b, outer_b = parts
    count = count_a + count_b
    shift = (count_a * shift_a + count_b * shift_b) / xp.maximum(count, 1)

    def rebased(count_i, shift_i, total_i, outer_i):
      delta = shift_i - shift
      return (total_i + count_i * delta,
              outer_i + _outer(delta, total_i) + _outer(total_i, delta)
              + count_i * _outer(delta, delta))

    total_a, outer_a = rebased(count_a, shift_a, total_a, outer_a)
    total_b, outer_b = rebased(count_b, shift_b, total_b, outer_b)
    return type(self)(count=count, shift=shift, total=total_a + total_b, outer=outer_a + outer_b)

  def statistics(self) -> Tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) in float64; sigma is the unbiased (N - 1) covariance."""
    if np.ndim(self.count) != 0:
      raise ValueError(f"FID statistics still carry a device axis (count shape "
                       f"{np.shape(self.count)}); reduce() or unreplicate them first")
    count = float(np.asarray(self.count, np.float64))
    if count < 2:
      raise ValueError(f"FID statistics of {count:g} feature vectors; at least 2 are needed")
    shift, total, outer = (np.asarray(v, np.float64) for v in (self.shift, self.total, self.outer))
    mu = shift + total / count
    sigma = (outer - np.outer(total, total) / count) / (count - 1)
    return mu, 0.5 * (sigma + sigma.T)

  def compute(self):
    raise ValueError("FID has no reference statistics: use FID.with_reference(mu, sigma) "
                     "for the metric class, or statistics() for (mu, sigma)")

  @classmethod
  def with_reference(cls, mu, sigma):
    """The metric class whose `compute()` is the FID (float) against (mu (D,), sigma (D, D))."""
    ref_mu, ref_sigma = check_statistics(mu, sigma, source="reference statistics")

    @flax.struct.dataclass
    class FIDAgainstReference(cls):
      reference_mu = ref_mu
      reference_sigma = ref_sigma

      def compute(self) -> float:
        mu, sigma = self.statistics()
        if mu.shape != ref_mu.shape:
          raise ValueError(f"features of size {mu.shape[0]} against reference statistics of "
                           f"size {ref_mu.shape[0]}")
        return frechet_distance(mu, sigma, ref_mu, ref_sigma)

    return FIDAgainstReference


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

  tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric PSD
  matrix R^T S2 R, where S1 = R R^T (Cholesky; a PSD square root when S1 is singular): it
  has the spectrum of S1 S2. This replaces the usual sqrtm of the non-symmetric S1 S2,
  which returns spurious imaginary parts and needs an epsilon for singular covariances;
  here round-off shows up only as tiny negative eigenvalues, clipped to 0. At D = 2048 it
  costs one symmetric eigenvalue solve.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  try:
    root1 = np.linalg.cholesky(sigma1)
  except np.linalg.LinAlgError:  # singular (fewer samples than dimensions, dead features)
    root1 = _psd_sqrt(sigma1)
  middle = root1.T @ sigma2 @ root1
  eigvals = np.linalg.eigvalsh(0.5 * (middle + middle.T))
  trace_sqrt = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def check_statistics(mu, sigma, source: str) -> Tuple[np.ndarray, np.ndarray]:
  """float64 copies of (mu (D,), sigma (D, D)); ValueError naming `source` if malformed."""
  mu, sigma = np.array(mu, np.float64), np.array(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"{source}: mu has shape {mu.shape} and sigma {sigma.shape}; expected "
                     "mu (D,) and sigma (D, D)")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"{source}: mu or sigma holds NaN or infinite values")
  return mu, sigma


def load_reference_statistics(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from an .npz with `mu` and `sigma` (EDM's and ADM's reference files)."""
  if not storage.isfile(path):
    raise FileNotFoundError(f"FID reference statistics {path} do not exist; expected an .npz "
                            "with 'mu' (D,) and 'sigma' (D, D), as published with EDM/ADM")
  expected = "an .npz with 'mu' (D,) and 'sigma' (D, D)"
  try:
    npz = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable .npz ({e}); expected {expected}") from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single array of shape {np.shape(npz)}; expected {expected}")
  with npz:
    missing = [k for k in ("mu", "sigma") if k not in npz.files]
    if missing:
      raise ValueError(f"{path} lacks {missing} (it has {sorted(npz.files)}); expected {expected}")
    try:
      mu, sigma = npz["mu"], npz["sigma"]
    except ValueError as e:  # object arrays, which would need pickle
      raise ValueError(f"{path}: mu/sigma are not plain arrays ({e}); expected {expected}") from e
  return check_statistics(mu, sigma, source=path)


def save_reference_statistics(path: str, mu, sigma) -> str:
  """Writes (mu, sigma) to `path` (.npz), via a temporary file so a cache is never half-written."""
  mu, sigma = check_statistics(mu, sigma, source="statistics to save")
  buffer = io.BytesIO()
  np.savez(buffer, mu=mu, sigma=sigma)
  storage.write_bytes(path, buffer.getvalue())
  return path


def merge_across_processes(metric: FID) -> FID:
  """Merges each process's (host, float64) FID statistics; every process gets the total.

  jax arrays are float32 by default, so each float64 field travels as a float32 pair
  (high part, residual), which keeps ~48 bits through the gather.
  """
  if jax.process_count() == 1:
    return metric
  fields = {k: np.asarray(getattr(metric, k), np.float64)
            for k in ("count", "shift", "total", "outer")}
  high = {k: v.astype(np.float32) for k, v in fields.items()}
  low = {k: (v - high[k]).astype(np.float32) for k, v in fields.items()}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  high, low = multihost_utils.process_allgather((high, low), tiled=False)
  merged = type(metric).empty()
  for i in range(jax.process_count()):
    part = {k: np.asarray(high[k][i], np.float64) + np.asarray(low[k][i], np.float64)
            for k in fields}
    if part["count"] > 0:
      merged = merged.merge(type(metric)(**part))
  return merged


def statistics_from_batches(feature_fn: Callable[[np.ndarray], Array],
                            batches: Iterable[np.ndarray]) -> FID:
  """The FID metric accumulated (float64, on the host) over `feature_fn` of image batches."""
  metric = FID.empty()
  for images in batches:
    metric = metric.merge(FID.from_model_output(np.asarray(feature_fn(images))))
  return metric


def _cache_name(dataset_name: str, split: str, feature_name: str) -> str:
  slug = "_".join(re.sub(r"[^A-Za-z0-9_.+-]+", "-", s).strip("-")
                  for s in (dataset_name, split, feature_name))
  return f"fid_stats_{slug}.npz"


def tfds_reference_statistics(feature_fn: Callable[[np.ndarray], Array], dataset, split: str,
                              cache_dir: str, *, feature_name: str,
                              data_dir: Optional[str] = None, batch_size: int = 256,
                              image_key: str = "image") -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of `feature_fn` over a prepared TFDS split, cached as .npz in `cache_dir`.

  dataset: a TFDS name (read from `data_dir`, never downloaded) or a `DatasetBuilder`
  (e.g. `tfds.builder_from_directory`, ImageFolder). feature_fn maps uint8 images
  (B, H, W, C) to features (B, D); `feature_name` (e.g. "inception_pool3") is part of the
  cache file name so that different features never share a cache. With several processes,
  each reads its `tfds.split_for_jax_process` share and the statistics are merged.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(dataset, data_dir=data_dir) if isinstance(dataset, str) else dataset
  path = storage.join(cache_dir, _cache_name(builder.info.full_name, split, feature_name))
  if storage.isfile(path):
    return load_reference_statistics(path)
  try:
    ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False)
  except AssertionError as e:  # tfds's way of saying the data was never prepared
    raise FileNotFoundError(f"TFDS dataset {builder.info.full_name} is not prepared under "
                            f"{builder.data_dir}: {e}") from e
  batches = (batch[image_key] for batch in tfds.as_numpy(ds.batch(batch_size)))
  metric = merge_across_processes(statistics_from_batches(feature_fn, batches))
  mu, sigma = metric.statistics()
  if jax.process_index() == 0:
    save_reference_statistics(path, mu, sigma)
  return mu, sigma
