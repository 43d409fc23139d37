"""Mode `evaluate`: FID (FD-digits on the digits) of DSNO (and the refined DSNO) at 1 NFE against
the teacher's solvers, with a memorisation check; the table, plots and TensorBoard scalars."""
import json
import re
import statistics
from typing import Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import export, ode, parallel, pictures, storage
from dsno_jax.data import images as images_lib
from dsno_jax.evaluation import classifier as classifier_lib
from dsno_jax.evaluation import fid as fid_lib
from dsno_jax.evaluation import sampling
from dsno_jax.teachers import loading
from dsno_jax.workdir import Workdir

CLOSEST_PAIRS = 8  # pairs shown in memorization.png
# A sample nearer to the train split than this % of the held-out test images is a near copy.
NEAR_COPY_PERCENTILE = 1.0
# A sample nearer to one training image than this fraction of its distance to the second-nearest
# is a copy of it: the criterion of Yoon et al. 2023 and Gu et al. 2023 ("On Memorization in
# Diffusion Models", arXiv:2310.02664), in pixel space as there.
NN_RATIO_COPY = 1.0 / 3.0


_share = lambda value: f"{100 * value:.1f}%"
# (results.json key, table title, format) of the memorisation columns, in the table's order
MEMORIZATION_COLUMNS = (
    ("nn_train_median", "nearest-train distance, features (median)", lambda v: f"{v:.3g}"),
    ("near_copies", f"near copies, features (< test p{NEAR_COPY_PERCENTILE:g})", _share),
    ("pixel_nn_train_median", "nearest-train distance, pixels (median)", lambda v: f"{v:.3g}"),
    ("pixel_near_copies", f"near copies, pixels (< test p{NEAR_COPY_PERCENTILE:g})", _share),
    ("nn_ratio_copies", "copies, pixels (nearest < 1/3 second-nearest)", _share),
)


class MeshFeatures:
  """The metric's network (Inception pool3 or the digits classifier) over every device of every
  host: each process feeds its own rows, they form one global batch split over the mesh, and
  each process gets back the outputs of its rows."""

  def __init__(self, name: str, apply: Callable, params, mesh, batch_size: int):
    """apply(params, uint8 images (B, H, W, C)) -> (features (B, D), logits (B, K) or None)."""
    self.name, self.mesh, self.batch_size = name, mesh, batch_size
    self.params = jax.device_put(params, parallel.replicated(mesh))
    # One jitted function serves the whole evaluation: it compiles once per image shape.
    self._apply = parallel.jit_rowwise(apply, mesh)

  def local(self, fetch: Callable[[np.ndarray], np.ndarray], num_local: int, what: str,
            keep: bool = True) -> Tuple[fid_lib.FID, Optional[np.ndarray], Optional[np.ndarray]]:
    """(FID statistics, features (n, D) if `keep`, logits (n, K) or None) of this process's rows
    0..n-1 (n = num_local); fetch(positions (m,)) -> their uint8 images (m, H, W, C).

    The statistics (float64, on the host) cover this process's rows alone: merge them with
    `fid.merge_across_processes`. Every process must call this alike (see
    `parallel.map_local_rows`).
    """
    progress = sampling.Progress(what, num_local)
    metric, features, logits = fid_lib.FID.empty(), [], []
    for _, (batch_features, batch_logits) in parallel.map_local_rows(
        self._apply, self.params, fetch, num_local, self.batch_size, self.mesh):
      metric = metric.merge(fid_lib.FID.from_model_output(batch_features))
      if keep:
        features.append(batch_features)
      if batch_logits is not None:
        logits.append(batch_logits)
      progress.update(len(batch_features))
    return (metric, np.concatenate(features) if keep else None,
            np.concatenate(logits) if logits else None)


def feature_function(config, workdir: str, mesh) -> MeshFeatures:
  """The metric's network for config.data over `mesh`: the digits classifier (FD-digits, with
  class logits) or Inception pool3 (FID)."""
  if config.data.name == "digits":
    return MeshFeatures("FD-digits", classifier_lib.uint8_outputs,
                        classifier_lib.ensure_classifier(config, workdir), mesh,
                        config.eval.batch_size)
  from dsno_jax.evaluation import inception
  params = inception.load_params(config.eval.inception_weights or None)
  return MeshFeatures("FID", lambda p, images: (inception.inception_features(p, images), None),
                      params, mesh, config.eval.batch_size)


def split_features(config, workdir: str, split: str, features: MeshFeatures, what: str,
                   share: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """(features (N, D), labels (N,)) of a data split, with progress, on every host; with `share`,
  only this process's share of the split. Each process computes its share over the mesh."""
  source = images_lib.load_source(config, workdir, split)
  rows = parallel.process_share(len(source))
  labels = []

  def fetch(positions):
    images, chunk_labels = source.get(rows[positions])
    labels.append(np.asarray(chunk_labels))
    return images

  _, local, _ = features.local(fetch, len(rows), what)
  labels = np.concatenate(labels)
  if share:
    return local, labels
  return parallel.gather_shares(local, len(source)), parallel.gather_shares(labels, len(source))


def reference_statistics(config, workdir: str, metric_name: str, features: MeshFeatures,
                         train_features: Optional[np.ndarray] = None):
  """(mu, sigma): config.eval.reference_stats, else the train split's, cached in WORKDIR/eval.

  Each process computes the statistics of its share of the split over the mesh; the shares are
  merged. `train_features` (the whole split's, already computed) saves the pass over the split.
  """
  if config.eval.reference_stats:
    return fid_lib.load_reference_statistics(config.eval.reference_stats)
  cache = Workdir(workdir).reference_statistics(
      f"{config.data.name.replace('/', '_')}_{config.data.image_size}_{metric_name}")
  if storage.isfile(cache):
    return fid_lib.load_reference_statistics(cache)
  if train_features is not None:
    mu, sigma = fid_lib.FID.from_model_output(train_features).statistics()
  else:
    source = images_lib.load_source(config, workdir, config.data.train_split)
    rows = parallel.process_share(len(source))
    metric, _, _ = features.local(lambda positions: source.get(rows[positions])[0], len(rows),
                                  f"reference statistics ({config.data.train_split} split)",
                                  keep=False)
    mu, sigma = fid_lib.merge_across_processes(metric).statistics()
  if jax.process_index() == 0:
    fid_lib.save_reference_statistics(cache, mu, sigma)
  return mu, sigma


@jax.jit
def _two_nearest_in_chunk(queries, train):
  """(squared distance to the nearest and second-nearest train row, the nearest's index) of each
  query (n, S, D), a train row's distance being its smallest over the query's S views."""
  d2 = (jnp.sum(queries ** 2, -1)[..., None] + jnp.sum(train ** 2, 1)
        - 2.0 * jnp.einsum("nsd,td->nst", queries, train, precision=jax.lax.Precision.HIGHEST))
  negated, index = jax.lax.top_k(-jnp.min(d2, 1), 2)
  return jnp.maximum(-negated[:, 0], 0.0), jnp.maximum(-negated[:, 1], 0.0), index[:, 0]


def nearest_train(queries: np.ndarray, train: np.ndarray, chunk: Optional[int] = None
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(Euclidean distance (N,) to the nearest train row, to the second-nearest (N,), the nearest's
  index (N,)) of queries (N, D), or (N, S, D): S views of each query (e.g. shifts), a train row
  counting at its nearest view. train (T, D), T >= 2."""
  queries = np.asarray(queries, np.float32)
  queries = queries[:, None] if queries.ndim == 2 else queries
  train = jnp.asarray(train, jnp.float32)
  chunk = chunk or max(1, 2 ** 26 // (queries.shape[1] * train.shape[0]))  # bounds (n, S, T)
  parts = [_two_nearest_in_chunk(jnp.asarray(queries[start:start + chunk]), train)
           for start in range(0, len(queries), chunk)]
  d1, d2, index = (np.concatenate([np.asarray(part[i]) for part in parts]) for i in range(3))
  return np.sqrt(d1), np.sqrt(d2), index


def pixel_views(images_u8: np.ndarray, shifted: bool) -> np.ndarray:
  """Each image's centre (all but a 1-pixel border), or with `shifted` its 9 windows shifted by
  up to one pixel, as vectors with zero mean and unit norm: (N, D), or (N, 9, D).

  A train image's centre then lies at distance 0 from a copy of it that is shifted by a pixel
  or has another brightness or contrast, which hide from a plain pixel distance.
  """
  images = np.asarray(images_u8, np.float32)
  n, h, w, _ = images.shape
  if h < 3 or w < 3:
    raise ValueError(f"images of shape {images.shape}; the pixel check needs H, W >= 3")
  offsets = [(dy, dx) for dy in range(3) for dx in range(3)] if shifted else [(1, 1)]
  views = np.stack([images[:, dy:h - 2 + dy, dx:w - 2 + dx].reshape(n, -1)
                    for dy, dx in offsets], axis=1)
  views -= views.mean(-1, keepdims=True)
  views /= np.maximum(np.linalg.norm(views, axis=-1, keepdims=True), 1e-6)
  return views if shifted else views[:, 0]


def near_copy_threshold(test_distances: np.ndarray) -> float:
  """The NEAR_COPY_PERCENTILE-th percentile of held-out nearest-train distances, from the mean
  and standard deviation of their logarithms (a log-normal fit) over all the held-out images:
  far less noisy than the few smallest distances an empirical percentile rests on."""
  logs = np.log(np.maximum(np.asarray(test_distances, np.float64), 1e-12))
  z = statistics.NormalDist().inv_cdf(NEAR_COPY_PERCENTILE / 100.0)
  return float(np.exp(logs.mean() + z * logs.std()))


class Memorization:
  """Nearest-training-image distances of samples against the held-out test images' own, in the
  metric's features and, given the images, in pixels (`pixel_views`): samples much nearer to
  the train split than test images are, or much nearer to one training image than to any other
  (the nearest/second-nearest distance ratio below NN_RATIO_COPY), are copies."""

  def __init__(self, train_features: np.ndarray, test_features: np.ndarray,
               train_images: Optional[np.ndarray] = None,
               test_images: Optional[np.ndarray] = None):
    """Features (N, D) of both splits; their uint8 images (N, H, W, C) add the pixel check."""
    self.train_features = train_features
    self.test_distances, _, _ = nearest_train(test_features, train_features)
    self.threshold = near_copy_threshold(self.test_distances)
    self.train_pixels = None
    if train_images is not None:
      self.train_pixels = pixel_views(train_images, shifted=False)
      self.test_pixel_distances, _, _ = self.pixel_nearest(test_images)
      self.pixel_threshold = near_copy_threshold(self.test_pixel_distances)

  def pixel_nearest(self, images_u8: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance, second-nearest distance, nearest index), each (N,), in pixel views."""
    return nearest_train(pixel_views(images_u8, shifted=True), self.train_pixels)

  def columns(self, distances: np.ndarray) -> Dict[str, float]:
    """The feature columns: the median distance and the share of near copies."""
    return {"nn_train_median": float(np.median(distances)),
            "near_copies": float(np.mean(distances < self.threshold))}

  def pixel_columns(self, images_u8: np.ndarray) -> Dict[str, float]:
    """The pixel columns: the median distance, the share under the held-out threshold, and the
    share whose nearest training image is under NN_RATIO_COPY of the second-nearest's distance."""
    nearest, second, _ = self.pixel_nearest(images_u8)
    return {"pixel_nn_train_median": float(np.median(nearest)),
            "pixel_near_copies": float(np.mean(nearest < self.pixel_threshold)),
            "nn_ratio_copies": float(np.mean(nearest < NN_RATIO_COPY * second))}

  def measure(self, features: np.ndarray, images_u8: Optional[np.ndarray] = None
              ) -> Tuple[Dict[str, float], np.ndarray, np.ndarray]:
    """(columns, feature distances (N,), nearest indices (N,)); with the images (and the train
    images given at construction), the pixel columns too."""
    distances, _, indices = nearest_train(features, self.train_features)
    columns = self.columns(distances)
    if images_u8 is not None and self.train_pixels is not None:
      columns.update(self.pixel_columns(images_u8))
    return columns, distances, indices

  def description(self) -> Dict:
    """What results.json records about the check."""
    about = {"near_copy_threshold": self.threshold,
             "near_copy_rule": f"distance under the held-out split's p{NEAR_COPY_PERCENTILE:g} "
                               "from a log-normal fit of all its nearest-train distances"}
    if self.train_pixels is not None:
      about.update(pixel_near_copy_threshold=self.pixel_threshold, nn_ratio_copy=NN_RATIO_COPY,
                   pixels="centre and 1-pixel shifts, zero mean, unit norm")
    return about


def score(images_u8, labels, features: MeshFeatures, reference,
          memorization: Optional[Memorization] = None, what: str = "samples"):
  """(row: the metric against the reference, class accuracy when a classifier is at hand, the
  memorisation columns; nearest-train distances and indices, or None without memorisation).

  images_u8 (N, H, W, C) and labels (N,) are the same on every host; each process computes the
  features of its share over the mesh, and the statistics are merged across processes. Only
  the memorisation check gathers the features themselves to every host.
  """
  rows = parallel.process_share(len(images_u8))
  metric, local, logits = features.local(lambda positions: images_u8[rows[positions]], len(rows),
                                         f"{what} features", keep=memorization is not None)
  metric = fid_lib.merge_across_processes(metric)
  row = {"metric": float(fid_lib.FID.with_reference(*reference).compute(metric))}
  if logits is not None and labels is not None:
    correct = np.sum(np.argmax(logits, -1) == np.asarray(labels)[rows])
    row["class_accuracy"] = float(parallel.all_processes(np.int32(correct)).sum()
                                  / len(images_u8))
  nearest = None
  if memorization is not None:
    columns, distances, indices = memorization.measure(
        parallel.gather_shares(local, len(images_u8)), images_u8)
    row.update(columns)
    nearest = (distances, indices)
  return row, nearest


def parse_teacher_rows(rows) -> List[Tuple[str, List[float]]]:
  """eval.teacher_rows ("SOLVER:N1,N2,..." fixed-step NFEs, "SOLVER:TOL" adaptive) as
  [(solver, [NFEs as int | the tolerance as float])], or ValueError naming the bad entry."""
  parsed = []
  for entry in rows:
    match = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*([0-9eE.+\-,\s]+)", str(entry))
    solver = match.group(1) if match else None
    if solver not in ode.SOLVERS:
      raise ValueError(f"eval.teacher_rows entry {entry!r}; expected 'SOLVER:N1,N2,...' "
                       f"(fixed-step NFEs) or 'SOLVER:TOL' (adaptive), SOLVER one of "
                       f"{ode.SOLVERS}")
    values = [v.strip() for v in match.group(2).split(",") if v.strip()]
    try:
      if solver in ode.ADAPTIVE_SOLVERS:
        (tol,) = values
        numbers = [float(tol)]
        if not numbers[0] > 0:
          raise ValueError
      else:
        numbers = [int(v) for v in values]
        if not numbers or min(numbers) < 1:
          raise ValueError
    except ValueError:
      kind = "one tolerance > 0" if solver in ode.ADAPTIVE_SOLVERS else "NFEs >= 1 (integers)"
      raise ValueError(f"eval.teacher_rows entry {entry!r}: {solver} takes {kind}, e.g. "
                       f"{'dopri5:1e-4' if solver in ode.ADAPTIVE_SOLVERS else 'ddim:4,8,16'}"
                       ) from None
    parsed.append((solver, numbers))
  return parsed


def _tensorboard_name(metric: str, row: Dict) -> str:
  """'METRIC/model_solver' with the row's words joined by underscores."""
  words = row["model"] if row["solver"] == "-" else f"{row['model']} {row['solver']}"
  return f"{metric}/" + re.sub(r"[^A-Za-z0-9.-]+", "_", words).strip("_")


def write_tensorboard(workdir: str, metric: str, rows: List[Dict]) -> None:
  """Each row's metric and class accuracy as clu scalars under WORKDIR/logs/eval, at step = its
  NFE (rounded for adaptive rows), so each solver draws its metric-versus-NFE curve."""
  from dsno_jax.training import reporting
  writer = reporting.tensorboard_writer(Workdir(workdir).logs("eval"),
                                        just_logging=jax.process_index() > 0)
  for row in rows:
    name = _tensorboard_name(metric, row)
    step = int(round(row["nfe"]))
    scalars = {name: row["metric"]}
    if "class_accuracy" in row:
      scalars[name.replace(metric, "class_accuracy", 1)] = row["class_accuracy"]
    if "nn_train_median" in row:
      scalars[name.replace(metric, "nn_train_median", 1)] = row["nn_train_median"]
    writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()


def evaluate(config, workdir: str) -> Dict:
  """Prints and writes (WORKDIR/eval/results.{json,md}, fid_vs_nfe.png, memorization.png;
  TensorBoard under WORKDIR/logs/eval) the comparison table: the data (digits), DSNO, and the
  teacher rows of config.eval.teacher_rows (none: the student alone)."""
  parallel.initialize_distributed(config)
  mesh = parallel.make_mesh()
  # every pass pads its batches to this multiple of the device count and drops the padding
  parallel.round_up_batch(config.eval.batch_size, mesh.devices.size, name="eval.batch_size")
  teacher_rows = parse_teacher_rows(config.eval.teacher_rows)
  ahead, denoise, identity = parallel.AheadOfTime(), None, None
  try:
    if teacher_rows:  # their samplers compile while the features and the student's rows run
      denoise, identity = loading.load_teacher(config, workdir)
      for solver, values in teacher_rows:
        for value in values:
          ahead.start((solver, value), sampling.compile_teacher_sampler, config, denoise, mesh,
                      solver, *_row_settings(solver, value))
    return _evaluate(config, workdir, mesh, teacher_rows, ahead, denoise, identity)
  finally:
    ahead.close()


def _row_settings(solver: str, value: float) -> Tuple[int, float]:
  """(nfe, tolerance) of the teacher row `solver:value`."""
  adaptive = solver in ode.ADAPTIVE_SOLVERS
  return (1, value) if adaptive else (int(value), 1e-4)


def _evaluate(config, workdir, mesh, teacher_rows, ahead, denoise, identity) -> Dict:
  features = feature_function(config, workdir, mesh)
  name = features.name
  batch = config.eval.batch_size
  conditional = config.data.num_classes > 1
  memorization = train_images = None
  if config.eval.memorization:
    train_features, _ = split_features(config, workdir, config.data.train_split, features,
                                       f"memorisation: {config.data.train_split} features")
    test_features, test_labels = split_features(
        config, workdir, config.data.eval_split, features,
        f"memorisation: {config.data.eval_split} features")
    train_images = images_lib.load_source(config, workdir, config.data.train_split)
    test_source = images_lib.load_source(config, workdir, config.data.eval_split)
    memorization = Memorization(train_features, test_features,
                                train_images.get(np.arange(len(train_images)))[0],
                                test_source.get(np.arange(len(test_source)))[0])
  reference = reference_statistics(config, workdir, name, features,
                                   train_features if memorization else None)
  rows: List[Dict] = []

  if config.data.name == "digits":  # the data itself: held-out test split against train
    test = images_lib.load_source(config, workdir, config.data.eval_split)
    test_images, test_labels = test.get(np.arange(len(test)))
    row, _ = score(test_images, test_labels, features, reference, memorization,
                   what=f"{config.data.eval_split} images")
    rows.append({"model": "data (test vs train)", "solver": "-", "nfe": 0, **row})

  params, exported = export.load_student(workdir)
  exported.seed = config.seed
  _, labels, outputs = sampling.draw_samples(exported, params, config.eval.num_samples, batch,
                                             mesh)
  student_images = pictures.to_uint8(outputs[:, -1])
  student, _ = score(student_images, labels if conditional else None, features, reference,
                     memorization, what="DSNO")
  rows.append({"model": "DSNO", "solver": "one step", "nfe": 1, **student})
  logging.info("DSNO one step: %s %.4g", name, student["metric"])

  curves: Dict[str, Dict[float, float]] = {}
  points = {"DSNO (1 NFE)": (1.0, student["metric"])}
  refined_images = None
  if storage.isdir(Workdir(workdir).refined_export):  # --mode=refine ran: its t=0 output
    params, exported = export.load_student(workdir, refined=True)
    exported.seed = config.seed
    _, labels, outputs = sampling.draw_samples(exported, params, config.eval.num_samples, batch,
                                               mesh)
    refined_images = pictures.to_uint8(outputs[:, -1])
    refined, _ = score(refined_images, labels if conditional else None,
                       features, reference, memorization, what="DSNO refined")
    rows.append({"model": "DSNO refined", "solver": "one step", "nfe": 1, **refined})
    points["DSNO refined (1 NFE)"] = (1.0, refined["metric"])
    logging.info("DSNO refined one step: %s %.4g", name, refined["metric"])
  for solver, values in teacher_rows:
    adaptive = solver in ode.ADAPTIVE_SOLVERS
    for value in values:
      nfe, tolerance = _row_settings(solver, value)
      sampler = ahead.get((solver, value), sampling.compile_teacher_sampler, config, denoise,
                          mesh, solver, nfe, tolerance, name=f"teacher_{solver}_{value:g}")
      images, labels, mean_nfe = sampling.teacher_samples(
          config, denoise, solver, mesh, nfe=nfe, tolerance=tolerance, sampler=sampler)
      label = f"{solver} (tol {value:g})" if adaptive else solver
      row, _ = score(images, labels if conditional else None, features, reference,
                     memorization, what=f"teacher {label}")
      rows.append({"model": "teacher", "solver": label, "nfe": mean_nfe, "adaptive": adaptive,
                   **row})
      if adaptive:
        points[f"teacher {label}"] = (mean_nfe, row["metric"])
      else:
        curves.setdefault(f"teacher {solver}", {})[int(value)] = row["metric"]
      logging.info("teacher %s, NFE %.1f: %s %.4g", label, mean_nfe, name, row["metric"])

  table = format_table(rows, name)
  print(table)
  result = {"metric": name, "teacher": identity, "num_samples": config.eval.num_samples,
            "rows": rows}
  if memorization is not None:
    result["memorization"] = {"features": name, "near_copy_percentile_of_test":
                              NEAR_COPY_PERCENTILE, **memorization.description()}
  run = Workdir(workdir)
  if jax.process_index() == 0:
    storage.write_text(run.results, json.dumps(result, indent=1))
    storage.write_text(storage.join(run.eval, "results.md"), table + "\n")
    pictures.plot_metric_vs_nfe(
        curves, storage.join(run.eval, "fid_vs_nfe.png"), metric=name, points=points,
        title=f"{name}, {config.eval.num_samples} samples")
    if memorization is not None:
      plot_memorization(memorization, {"DSNO": student_images, "DSNO refined": refined_images},
                        train_images, f"{config.data.eval_split} images (held out)",
                        storage.join(run.eval, "memorization.png"))
    write_tensorboard(workdir, name, rows)
  return result


def plot_memorization(memorization: Memorization, samples: Dict[str, Optional[np.ndarray]],
                      train_source, held_out: str, path: str) -> str:
  """memorization.png in pixel views: the nearest-train distances of each model's uint8 samples
  (those not None) and of the held-out images, and each model's closest pairs."""
  distances, pairs = {}, {}
  for model, images in samples.items():
    if images is None:
      continue
    nearest, _, indices = memorization.pixel_nearest(images)
    closest = np.argsort(nearest)[:CLOSEST_PAIRS]
    distances[f"{model} samples"] = nearest
    pairs[model] = (np.stack([images[closest], train_source.get(indices[closest])[0]], axis=1),
                    nearest[closest])
  distances[held_out] = memorization.test_pixel_distances
  return pictures.plot_memorization(
      distances, pairs, path, feature_name="pixels, shift-tolerant",
      title="Do the one-step students copy their training images?")


def format_table(rows: List[Dict], metric: str) -> str:
  """Markdown: model, solver, NFE (network evaluations per sample; the mean for adaptive
  solves), the metric, and class accuracy and memorisation columns where measured."""
  accuracy = any("class_accuracy" in r for r in rows)
  memorization = [c for c in MEMORIZATION_COLUMNS if any(c[0] in r for r in rows)]
  head = f"| model | solver | NFE | {metric} |"
  head += " class accuracy |" if accuracy else ""
  head += "".join(f" {title} |" for _, title, _ in memorization)
  lines = [head, "|" + "---|" * (4 + accuracy + len(memorization))]
  for r in rows:
    nfe = "-" if r["nfe"] == 0 else (f"{r['nfe']:.1f} (mean)" if r.get("adaptive")
                                     else str(int(r["nfe"])))
    line = f"| {r['model']} | {r['solver']} | {nfe} | {r['metric']:.4g} |"
    if accuracy:
      line += f" {r['class_accuracy']:.3f} |" if "class_accuracy" in r else " - |"
    line += "".join(f" {form(r[key])} |" if key in r else " - |"
                    for key, _, form in memorization)
    lines.append(line)
  return "\n".join(lines)
