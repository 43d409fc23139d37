"""Mode `evaluate`: FID (FD-digits on the digits) of DSNO at 1 NFE against the teacher's solvers."""
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import numpy as np

from dsno_jax import export, parallel, pictures
from dsno_jax.data import images as images_lib
from dsno_jax.evaluation import classifier as classifier_lib
from dsno_jax.evaluation import fid as fid_lib
from dsno_jax.evaluation import sampling
from dsno_jax.teachers import generate, loading
from dsno_jax.workdir import Workdir

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> (N, D)


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


def reference_statistics(config, workdir: str, metric_name: str, feature_fn: FeatureFn):
  """(mu, sigma): config.eval.reference_stats, else the train split's, cached in WORKDIR/eval.

  Each process computes the statistics of its share of the split; the shares are merged.
  """
  if config.eval.reference_stats:
    return fid_lib.load_reference_statistics(config.eval.reference_stats)
  cache = Workdir(workdir).reference_statistics(
      f"{config.data.name.replace('/', '_')}_{config.data.image_size}_{metric_name}")
  if os.path.isfile(cache):
    return fid_lib.load_reference_statistics(cache)
  source = images_lib.load_source(config, workdir, config.data.train_split)
  share = np.array_split(np.arange(len(source)), jax.process_count())[jax.process_index()]
  batches = (source.get(chunk)[0] for chunk in _batches(share, config.eval.batch_size))
  metric = fid_lib.merge_across_processes(fid_lib.statistics_from_batches(feature_fn, batches))
  mu, sigma = metric.statistics()
  if jax.process_index() == 0:
    fid_lib.save_reference_statistics(cache, mu, sigma)
  return mu, sigma


def score(images_u8, labels, feature_fn, logits_fn, reference, batch_size) -> Dict[str, float]:
  """The metric against the reference, and class accuracy when a classifier is at hand."""
  metric = fid_lib.statistics_from_batches(feature_fn, _batches(images_u8, batch_size))
  row = {"metric": float(fid_lib.FID.with_reference(*reference).compute(metric))}
  if logits_fn is not None and labels is not None:
    logits = np.concatenate([logits_fn(b) for b in _batches(images_u8, batch_size)])
    row["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
  return row


def teacher_samples(config, solver: str, nfe: int, mesh, denoise
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """uint8 teacher samples (x-hat at t=0) of the same noise and labels as the student's."""
  run = config.copy_and_resolve_references()
  run.seed = config.seed + sampling.SAMPLE_SEED_OFFSET
  solve = run.trajectory
  solve.save_times, solve.solver, solve.num_steps, solve.grid = (0.0,), solver, max(int(nfe), 1), "uniform_t"
  solve.rtol = solve.atol = config.eval.accurate_tolerance
  _, labels, targets = parallel.draw(generate.make_solve(run, mesh), denoise,
                                     config.eval.num_samples, config.eval.batch_size, mesh)
  return pictures.to_uint8(targets[:, -1]), labels


def evaluate(config, workdir: str) -> Dict:
  """Prints and writes (WORKDIR/eval/results.json, fid_vs_nfe.png) the comparison table."""
  parallel.initialize_distributed(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval.batch_size, mesh)
  name, feature_fn, logits_fn = feature_function(config, workdir)
  reference = reference_statistics(config, workdir, name, feature_fn)
  batch = config.eval.batch_size
  conditional = config.data.num_classes > 1
  rows: List[Dict] = []

  if config.data.name == "digits":  # the data itself: held-out test split against train
    test = images_lib.load_source(config, workdir, config.data.eval_split)
    rows.append({"model": "data (test vs train)", "solver": "-", "nfe": 0,
                 **score(test.images, test.labels, feature_fn, logits_fn, reference, batch)})

  params, exported = export.load_student(workdir)
  exported.seed = config.seed
  _, labels, outputs = sampling.draw_samples(exported, params, config.eval.num_samples, batch, mesh)
  student = score(pictures.to_uint8(outputs[:, -1]), labels if conditional else None,
                  feature_fn, logits_fn, reference, batch)
  rows.append({"model": "DSNO", "solver": "one step", "nfe": 1, **student})

  denoise, identity = loading.load_teacher(config, workdir)
  curves: Dict[str, Dict[int, float]] = {}
  for solver in config.eval.teacher_solvers:
    for nfe in config.eval.teacher_nfes:
      images, labels = teacher_samples(config, solver, nfe, mesh, denoise)
      row = score(images, labels if conditional else None, feature_fn, logits_fn, reference, batch)
      rows.append({"model": "teacher", "solver": solver, "nfe": int(nfe), **row})
      curves.setdefault(f"teacher {solver}", {})[int(nfe)] = row["metric"]
      logging.info("teacher %s NFE %d: %s %.4g", solver, nfe, name, row["metric"])
  accurate = config.eval.accurate_solver
  images, labels = teacher_samples(config, accurate, 1, mesh, denoise)
  rows.append({"model": "teacher", "solver": f"{accurate} (tol {config.eval.accurate_tolerance:g})",
               "nfe": -1, **score(images, labels if conditional else None, feature_fn, logits_fn,
                                  reference, batch)})

  table = format_table(rows, name)
  print(table)
  result = {"metric": name, "teacher": identity, "num_samples": config.eval.num_samples,
            "rows": rows}
  run = Workdir(workdir)
  if jax.process_index() == 0:
    os.makedirs(run.eval, exist_ok=True)
    with open(run.results, "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(run.eval, "results.md"), "w") as f:
      f.write(table + "\n")
    pictures.plot_metric_vs_nfe(
        curves, os.path.join(run.eval, "fid_vs_nfe.png"), metric=name,
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
