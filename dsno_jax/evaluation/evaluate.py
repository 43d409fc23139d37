"""Mode `evaluate`: FID (FD-digits on the digits) of DSNO at 1 NFE against the teacher's solvers."""
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from dsno_jax import model_io
from dsno_jax.data import generate as generate_lib
from dsno_jax.data import images as images_lib
from dsno_jax.evaluation import classifier as classifier_lib
from dsno_jax.evaluation import fid as fid_lib
from dsno_jax.evaluation import pictures, sampling
from dsno_jax.training import sharding

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> (N, D)


def eval_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "eval")


def classifier_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "classifier")


def _to_unit_range(images: np.ndarray) -> np.ndarray:
  return np.asarray(images, np.float32) / 127.5 - 1.0


def ensure_classifier(config, workdir: str):
  """The FD-digits classifier of WORKDIR/classifier, trained on the digits train split if absent."""
  path = classifier_dir(workdir)
  if os.path.isdir(path):
    params, _ = classifier_lib.load_classifier(path)
    return params
  train = images_lib.load_source(config, workdir, config.data.train_split)
  test = images_lib.load_source(config, workdir, config.data.eval_split)
  params = classifier_lib.train_classifier(_to_unit_range(train.images), train.labels,
                                           seed=config.seed, steps=config.eval.classifier_steps)
  acc = classifier_lib.accuracy(params, _to_unit_range(test.images), test.labels)
  logging.info("digits classifier: test accuracy %.3f", acc)
  if jax.process_index() == 0:
    classifier_lib.save_classifier(path, params, config.data.image_size)
  return params


def feature_function(config, workdir: str) -> Tuple[str, FeatureFn, Optional[Callable]]:
  """(metric name, features of uint8 images, class logits or None) for config.data."""
  if config.data.name == "digits":
    params = ensure_classifier(config, workdir)
    features = jax.jit(lambda x: classifier_lib.classifier_features(params, x))
    logits = jax.jit(lambda x: classifier_lib.classifier_logits(params, x))
    return ("FD-digits", lambda u8: np.asarray(features(_to_unit_range(u8))),
            lambda u8: np.asarray(logits(_to_unit_range(u8))))
  from dsno_jax.evaluation import inception
  params = inception.load_params(config.eval.inception_weights or None)
  return "FID", inception.pool3_feature_fn(params, value_range=(0.0, 255.0)), None


def _batches(images: np.ndarray, size: int):
  for i in range(0, len(images), size):
    yield images[i:i + size]


def statistics(feature_fn: FeatureFn, images_u8: np.ndarray, batch_size: int) -> fid_lib.FID:
  return fid_lib.statistics_from_batches(feature_fn, _batches(images_u8, batch_size))


def reference_statistics(config, workdir: str, metric_name: str, feature_fn: FeatureFn):
  """(mu, sigma): config.eval.reference_stats, else the train split's, cached in WORKDIR/eval."""
  if config.eval.reference_stats:
    return fid_lib.load_reference_statistics(config.eval.reference_stats)
  cache = os.path.join(eval_dir(workdir), f"reference_{config.data.name.replace('/', '_')}_"
                       f"{config.data.image_size}_{metric_name}.npz")
  if os.path.isfile(cache):
    return fid_lib.load_reference_statistics(cache)
  source = images_lib.load_source(config, workdir, config.data.train_split)
  indices = np.arange(len(source))
  metric = fid_lib.FID.empty()
  for chunk in _batches(indices, config.eval.batch_size):
    metric = metric.merge(fid_lib.FID.from_model_output(np.asarray(feature_fn(source.get(chunk)[0]))))
  mu, sigma = metric.statistics()
  if jax.process_index() == 0:
    fid_lib.save_reference_statistics(cache, mu, sigma)
  return mu, sigma


def score(images_u8, labels, feature_fn, logits_fn, reference, batch_size) -> Dict[str, float]:
  """The metric against the reference, and class accuracy when a classifier is at hand."""
  metric = statistics(feature_fn, images_u8, batch_size)
  row = {"metric": float(fid_lib.FID.with_reference(*reference).compute(metric))}
  if logits_fn is not None and labels is not None:
    logits = np.concatenate([logits_fn(b) for b in _batches(images_u8, batch_size)])
    row["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
  return row


def teacher_samples(config, workdir: str, solver: str, nfe: int, mesh, denoise
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """uint8 teacher samples (x-hat at t=0) of the same noise and labels as the student's."""
  run = config.copy_and_resolve_references()
  run.seed = config.seed + sampling.SAMPLE_SEED_OFFSET
  g = run.trajectory
  g.save_times, g.solver, g.num_steps, g.grid = (0.0,), solver, max(int(nfe), 1), "uniform_t"
  g.rtol = g.atol = config.eval.accurate_tolerance
  solve = generate_lib.make_solve(run, mesh)
  data = NamedSharding(mesh, PartitionSpec("data"))
  gather = jax.jit(lambda *a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))
  n, batch = config.eval.num_samples, config.eval.batch_size
  pieces = []
  for start in range(0, n, batch):
    indices = jax.device_put(np.arange(start, start + batch, dtype=np.int32), data)
    _, labels, targets = gather(*solve(denoise, indices))
    pieces.append((np.asarray(labels.addressable_data(0)),
                   np.asarray(targets.addressable_data(0))[:, -1]))
  labels, images = (np.concatenate(p)[:n] for p in zip(*pieces))
  return pictures.to_uint8(images), labels


def evaluate(config, workdir: str) -> Dict:
  """Prints and writes (WORKDIR/eval/results.json, fid_vs_nfe.png) the comparison table."""
  sharding.initialize_distributed(config)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.eval.batch_size, mesh)
  name, feature_fn, logits_fn = feature_function(config, workdir)
  reference = reference_statistics(config, workdir, name, feature_fn)
  batch = config.eval.batch_size
  conditional = config.data.num_classes > 1
  rows: List[Dict] = []

  if config.data.name == "digits":  # the data itself: held-out test split against train
    test = images_lib.load_source(config, workdir, config.data.eval_split)
    rows.append({"model": "data (test vs train)", "solver": "-", "nfe": 0,
                 **score(test.images, test.labels, feature_fn, logits_fn, reference, batch)})

  params, exported = sampling.load_student(workdir)
  exported.seed = config.seed
  _, labels, outputs = sampling.draw_samples(exported, params, config.eval.num_samples, batch, mesh)
  student = score(pictures.to_uint8(outputs[:, -1]), labels if conditional else None,
                  feature_fn, logits_fn, reference, batch)
  rows.append({"model": "DSNO", "solver": "one step", "nfe": 1, **student})

  denoise, identity = model_io.load_teacher(config, workdir)
  curves: Dict[str, Dict[int, float]] = {}
  for solver in config.eval.teacher_solvers:
    for nfe in config.eval.teacher_nfes:
      images, labels = teacher_samples(config, workdir, solver, nfe, mesh, denoise)
      row = score(images, labels if conditional else None, feature_fn, logits_fn, reference, batch)
      rows.append({"model": "teacher", "solver": solver, "nfe": int(nfe), **row})
      curves.setdefault(f"teacher {solver}", {})[int(nfe)] = row["metric"]
      logging.info("teacher %s NFE %d: %s %.4g", solver, nfe, name, row["metric"])
  accurate = config.eval.accurate_solver
  images, labels = teacher_samples(config, workdir, accurate, 1, mesh, denoise)
  rows.append({"model": "teacher", "solver": f"{accurate} (tol {config.eval.accurate_tolerance:g})",
               "nfe": -1, **score(images, labels if conditional else None, feature_fn, logits_fn,
                                  reference, batch)})

  table = format_table(rows, name)
  print(table)
  result = {"metric": name, "teacher": identity, "num_samples": config.eval.num_samples,
            "rows": rows}
  out = eval_dir(workdir)
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
      f.write(table + "\n")
    pictures.plot_metric_vs_nfe(
        curves, os.path.join(out, "fid_vs_nfe.png"), metric=name,
        points={"DSNO (1 NFE)": student["metric"]},
        title=f"{name}, {config.eval.num_samples} samples")
  return result


def format_table(rows: List[Dict], metric: str) -> str:
  accuracy = any("class_accuracy" in r for r in rows)
  head = f"| model | solver | NFE | {metric} |" + (" class accuracy |" if accuracy else "")
  lines = [head, "|" + "---|" * (4 + accuracy)]
  for r in rows:
    nfe = {0: "-", -1: "adaptive"}.get(r["nfe"], str(r["nfe"]))
    line = f"| {r['model']} | {r['solver']} | {nfe} | {r['metric']:.4g} |"
    if accuracy:
      line += f" {r['class_accuracy']:.3f} |" if "class_accuracy" in r else " - |"
    lines.append(line)
  return "\n".join(lines)
