"""Mode `evaluate`: FID (FD-digits on the digits) of DSNO at 1 NFE against the teacher's solvers,
with a memorisation check; the table, plots and TensorBoard scalars."""
import json
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import export, ode, parallel, pictures
from dsno_jax.data import images as images_lib
from dsno_jax.evaluation import classifier as classifier_lib
from dsno_jax.evaluation import fid as fid_lib
from dsno_jax.evaluation import sampling
from dsno_jax.teachers import loading
from dsno_jax.workdir import Workdir

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> (N, D)
CLOSEST_PAIRS = 8  # pairs shown in memorization.png
NEAR_COPY_PERCENTILE = 1.0  # a sample nearer to the train split than this % of test images is


def feature_function(config, workdir: str) -> Tuple[str, FeatureFn, Optional[Callable]]:
  """(metric name, features of uint8 images, class logits or None) for config.data."""
  if config.data.name == "digits":
    features, logits = classifier_lib.uint8_feature_fns(
        classifier_lib.ensure_classifier(config, workdir))
    return "FD-digits", features, logits
  from dsno_jax.evaluation import inception
  params = inception.load_params(config.eval.inception_weights or None)
  return "FID", inception.pool3_feature_fn(params, value_range=(0.0, 255.0)), None


def _batches(images: np.ndarray, size: int):
  for i in range(0, len(images), size):
    yield images[i:i + size]


def split_features(config, workdir: str, split: str, feature_fn: FeatureFn, what: str,
                   share: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """(features (N, D), labels (N,)) of a data split, with progress; with `share`, only this
  process's share of the split (for statistics that are merged across processes)."""
  source = images_lib.load_source(config, workdir, split)
  indices = np.arange(len(source))
  if share:
    indices = np.array_split(indices, jax.process_count())[jax.process_index()]
  progress = sampling.Progress(what, len(indices))
  features, labels = [], []
  for chunk in _batches(indices, config.eval.batch_size):
    images, chunk_labels = source.get(chunk)
    features.append(np.asarray(feature_fn(images)))
    labels.append(np.asarray(chunk_labels))
    progress.update(len(chunk))
  return np.concatenate(features), np.concatenate(labels)


def reference_statistics(config, workdir: str, metric_name: str, feature_fn: FeatureFn,
                         train_features: Optional[np.ndarray] = None):
  """(mu, sigma): config.eval.reference_stats, else the train split's, cached in WORKDIR/eval.

  Each process computes the statistics of its share of the split; the shares are merged.
  `train_features` (the whole split's, already computed) saves the pass over the split.
  """
  if config.eval.reference_stats:
    return fid_lib.load_reference_statistics(config.eval.reference_stats)
  cache = Workdir(workdir).reference_statistics(
      f"{config.data.name.replace('/', '_')}_{config.data.image_size}_{metric_name}")
  if os.path.isfile(cache):
    return fid_lib.load_reference_statistics(cache)
  if train_features is not None:
    mu, sigma = fid_lib.FID.from_model_output(train_features).statistics()
  else:
    features, _ = split_features(config, workdir, config.data.train_split, feature_fn,
                                 f"reference statistics ({config.data.train_split} split)",
                                 share=True)
    metric = fid_lib.merge_across_processes(fid_lib.FID.from_model_output(features))
    mu, sigma = metric.statistics()
  if jax.process_index() == 0:
    fid_lib.save_reference_statistics(cache, mu, sigma)
  return mu, sigma


@jax.jit
def _nearest_in_chunk(queries, train):
  """(squared distance, index) of each query's nearest train row."""
  d2 = (jnp.sum(queries ** 2, 1)[:, None] + jnp.sum(train ** 2, 1)[None]
        - 2.0 * jnp.matmul(queries, train.T, precision=jax.lax.Precision.HIGHEST))
  return jnp.maximum(jnp.min(d2, 1), 0.0), jnp.argmin(d2, 1)


def nearest_train(features: np.ndarray, train_features: np.ndarray, chunk: int = 1024
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """(Euclidean distance (N,), index (N,)) of each feature row's nearest training row."""
  train = jnp.asarray(train_features, jnp.float32)
  distances, indices = [], []
  for start in range(0, len(features), chunk):
    d2, index = _nearest_in_chunk(jnp.asarray(features[start:start + chunk], jnp.float32), train)
    distances.append(np.sqrt(np.asarray(d2)))
    indices.append(np.asarray(index))
  return np.concatenate(distances), np.concatenate(indices)


class Memorization:
  """Nearest-training-image distances in the metric's feature space, against the held-out
  test images' own: samples much nearer to the train split than test images are copies."""

  def __init__(self, train_features: np.ndarray, test_features: np.ndarray):
    self.train_features = train_features
    self.test_distances, _ = nearest_train(test_features, train_features)
    self.threshold = float(np.percentile(self.test_distances, NEAR_COPY_PERCENTILE))

  def columns(self, distances: np.ndarray) -> Dict[str, float]:
    """The table's columns: the median distance and the share of near copies."""
    return {"nn_train_median": float(np.median(distances)),
            "near_copies": float(np.mean(distances < self.threshold))}

  def measure(self, features: np.ndarray) -> Tuple[Dict[str, float], np.ndarray, np.ndarray]:
    distances, indices = nearest_train(features, self.train_features)
    return self.columns(distances), distances, indices


def score(images_u8, labels, feature_fn, logits_fn, reference, batch_size,
          memorization: Optional[Memorization] = None, what: str = "samples"):
  """(row: the metric against the reference, class accuracy when a classifier is at hand, the
  memorisation columns; nearest-train distances and indices, or None without memorisation)."""
  progress = sampling.Progress(f"{what} features", len(images_u8))
  features, logits = [], []
  for images in _batches(images_u8, batch_size):
    features.append(np.asarray(feature_fn(images)))
    if logits_fn is not None and labels is not None:
      logits.append(np.asarray(logits_fn(images)))
    progress.update(len(images))
  features = np.concatenate(features)
  metric = fid_lib.FID.from_model_output(features)
  row = {"metric": float(fid_lib.FID.with_reference(*reference).compute(metric))}
  if logits:
    predicted = np.argmax(np.concatenate(logits), -1)
    row["class_accuracy"] = float(np.mean(predicted == np.asarray(labels)))
  nearest = None
  if memorization is not None:
    columns, distances, indices = memorization.measure(features)
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
  from clu import metric_writers
  writer = metric_writers.create_default_writer(Workdir(workdir).logs("eval"),
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
  parallel.check_batch_size(config.eval.batch_size, mesh)
  teacher_rows = parse_teacher_rows(config.eval.teacher_rows)
  name, feature_fn, logits_fn = feature_function(config, workdir)
  batch = config.eval.batch_size
  conditional = config.data.num_classes > 1
  memorization = train_images = None
  if config.eval.memorization:
    train_features, _ = split_features(config, workdir, config.data.train_split, feature_fn,
                                       f"memorisation: {config.data.train_split} features")
    test_features, test_labels = split_features(
        config, workdir, config.data.eval_split, feature_fn,
        f"memorisation: {config.data.eval_split} features")
    memorization = Memorization(train_features, test_features)
    train_images = images_lib.load_source(config, workdir, config.data.train_split)
  reference = reference_statistics(config, workdir, name, feature_fn,
                                   train_features if memorization else None)
  rows: List[Dict] = []

  if config.data.name == "digits":  # the data itself: held-out test split against train
    test = images_lib.load_source(config, workdir, config.data.eval_split)
    test_images, test_labels = test.get(np.arange(len(test)))
    row, _ = score(test_images, test_labels, feature_fn, logits_fn, reference, batch,
                   memorization, what=f"{config.data.eval_split} images")
    rows.append({"model": "data (test vs train)", "solver": "-", "nfe": 0, **row})

  params, exported = export.load_student(workdir)
  exported.seed = config.seed
  _, labels, outputs = sampling.draw_samples(exported, params, config.eval.num_samples, batch,
                                             mesh)
  student_images = pictures.to_uint8(outputs[:, -1])
  student, student_nearest = score(student_images, labels if conditional else None, feature_fn,
                                   logits_fn, reference, batch, memorization, what="DSNO")
  rows.append({"model": "DSNO", "solver": "one step", "nfe": 1, **student})
  logging.info("DSNO one step: %s %.4g", name, student["metric"])

  curves: Dict[str, Dict[float, float]] = {}
  points = {"DSNO (1 NFE)": (1.0, student["metric"])}
  identity = None
  if teacher_rows:
    denoise, identity = loading.load_teacher(config, workdir)
  for solver, values in teacher_rows:
    adaptive = solver in ode.ADAPTIVE_SOLVERS
    for value in values:
      images, labels, mean_nfe = sampling.teacher_samples(
          config, denoise, solver, mesh, nfe=1 if adaptive else int(value),
          tolerance=value if adaptive else 1e-4)
      label = f"{solver} (tol {value:g})" if adaptive else solver
      row, _ = score(images, labels if conditional else None, feature_fn, logits_fn,
                     reference, batch, memorization, what=f"teacher {label}")
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
    result["memorization"] = {
        "features": name, "near_copy_threshold": memorization.threshold,
        "near_copy_percentile_of_test": NEAR_COPY_PERCENTILE}
  run = Workdir(workdir)
  if jax.process_index() == 0:
    os.makedirs(run.eval, exist_ok=True)
    with open(run.results, "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(run.eval, "results.md"), "w") as f:
      f.write(table + "\n")
    pictures.plot_metric_vs_nfe(
        curves, os.path.join(run.eval, "fid_vs_nfe.png"), metric=name, points=points,
        title=f"{name}, {config.eval.num_samples} samples")
    if memorization is not None:
      distances, indices = student_nearest
      closest = np.argsort(distances)[:CLOSEST_PAIRS]
      nearest_images, _ = train_images.get(indices[closest])
      pictures.plot_memorization(
          {"DSNO samples": distances, f"{config.data.eval_split} images (held out)":
           memorization.test_distances},
          np.stack([student_images[closest], nearest_images], axis=1), distances[closest],
          os.path.join(run.eval, "memorization.png"), feature_name=f"{name} features",
          title="Does DSNO copy its training images?")
    write_tensorboard(workdir, name, rows)
  return result


def format_table(rows: List[Dict], metric: str) -> str:
  """Markdown: model, solver, NFE (network evaluations per sample; the mean for adaptive
  solves), the metric, and class accuracy and memorisation columns where measured."""
  accuracy = any("class_accuracy" in r for r in rows)
  memorization = any("nn_train_median" in r for r in rows)
  head = f"| model | solver | NFE | {metric} |"
  head += " class accuracy |" if accuracy else ""
  head += f" nearest-train distance (median) | near copies (< test p{NEAR_COPY_PERCENTILE:g}) |" \
      if memorization else ""
  lines = [head, "|" + "---|" * (4 + accuracy + 2 * memorization)]
  for r in rows:
    nfe = "-" if r["nfe"] == 0 else (f"{r['nfe']:.1f} (mean)" if r.get("adaptive")
                                     else str(int(r["nfe"])))
    line = f"| {r['model']} | {r['solver']} | {nfe} | {r['metric']:.4g} |"
    if accuracy:
      line += f" {r['class_accuracy']:.3f} |" if "class_accuracy" in r else " - |"
    if memorization:
      line += (f" {r['nn_train_median']:.3g} | {100 * r['near_copies']:.1f}% |"
               if "nn_train_median" in r else " - | - |")
    lines.append(line)
  return "\n".join(lines)
