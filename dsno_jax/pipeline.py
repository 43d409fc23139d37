"""Mode `pipeline`: every stage in order; a stage runs when its output is missing or stale."""
import json
import os
import time
from typing import Callable, List, Tuple

from absl import logging
import orbax.checkpoint as ocp

from dsno_jax import modes
from dsno_jax.data import generate as generate_lib
from dsno_jax.data import trajectories
from dsno_jax.evaluation import evaluate as evaluate_lib
from dsno_jax.evaluation import sampling
from dsno_jax.training import checkpoints


def _latest_step(workdir: str, role: str) -> int:
  directory = checkpoints.checkpoint_dir(workdir, role)
  if not os.path.isdir(directory):
    return -1
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  manager.close()
  return -1 if step is None else int(step)


def _needs_teacher_training(config) -> bool:
  return not config.teacher.checkpoint and config.teacher.kind == "unet"


def stages(config, workdir: str) -> List[Tuple[str, Callable[[], bool], Callable]]:
  """(name, is_done(), run()) in order."""
  root = os.path.abspath(workdir)
  done = {
      "train_teacher": lambda: (not _needs_teacher_training(config)
                                or os.path.isdir(os.path.join(root, "teacher"))),
      "classifier": lambda: (config.data.name != "digits"
                             or os.path.isdir(evaluate_lib.classifier_dir(root))),
      "generate": lambda: trajectories.is_complete(generate_lib.trajectory_dir(config, root)),
      "train": lambda: _latest_step(root, "student") >= config.train.num_steps,
      "export": lambda: os.path.isdir(sampling.export_dir(root)),
      "sample": lambda: os.path.isfile(os.path.join(root, "samples", "samples.npz")),
      "evaluate": lambda: os.path.isfile(os.path.join(evaluate_lib.eval_dir(root), "results.json")),
  }
  run = {
      "train_teacher": modes.train_teacher,
      "classifier": evaluate_lib.ensure_classifier,
      "generate": modes.generate,
      "train": modes.train,
      "export": modes.export,
      "sample": modes.sample,
      "evaluate": modes.evaluate,
  }
  return [(name, done[name], lambda f=run[name]: f(config, root)) for name in run]


def pipeline(config, workdir: str):
  """Runs the stages; once one runs, every later one runs too (its inputs changed)."""
  timings, upstream_ran = [], False
  for name, is_done, run in stages(config, workdir):
    if not upstream_ran and is_done():
      logging.info("pipeline: %s is done, skipping", name)
      timings.append((name, "skipped"))
      continue
    logging.info("pipeline: running %s", name)
    start = time.time()
    run()
    timings.append((name, f"{time.time() - start:.0f} s"))
    upstream_ran = True
  summary = "\n".join(f"  {name:<14} {t}" for name, t in timings)
  print(f"pipeline stages:\n{summary}")
  results = os.path.join(evaluate_lib.eval_dir(workdir), "results.json")
  with open(results) as f:
    return json.load(f)
