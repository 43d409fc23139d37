"""One small function per mode, each `mode(config, workdir)`; `pipeline` runs the stages in order.

Imports are inside the functions so that a mode loads only what it needs.
"""
import json
import time
from typing import Callable, List, Optional, Tuple

from absl import logging

from dsno_jax import preemption, storage
from dsno_jax.workdir import Workdir

# The exit status of a run stopped for preemption (SIGTERM) at a safe point, after its
# checkpoint where it has one: launchers resume it later; it never goes on to the next stage.
PREEMPTED_EXIT_STATUS = preemption.EXIT_STATUS
Preempted = preemption.Preempted


def train_teacher(config, workdir: str) -> Optional[str]:
  """Trains the teacher UNet on the config's images; exports its EMA to WORKDIR/teacher.

  Raises Preempted when stopped for preemption before the last step (nothing is exported).
  """
  from dsno_jax import export as export_lib
  from dsno_jax.training import runs
  result = runs.train_teacher(config, workdir)
  if result.preempted:
    raise Preempted("teacher training preempted; its checkpoint is saved")
  return export_lib.export_teacher(config, workdir, result.state.ema_params)


def classifier(config, workdir: str):
  """Trains the digits classifier behind FD-digits (WORKDIR/classifier); other data need none."""
  if config.data.name != "digits":
    logging.info("classifier: only the digits use one (data.name=%r)", config.data.name)
    return None
  from dsno_jax.evaluation import classifier as classifier_lib
  return classifier_lib.ensure_classifier(config, workdir)


def generate(config, workdir: str) -> str:
  """Solves the teacher's PF-ODE from seeded noise; writes the trajectory dataset."""
  from dsno_jax.teachers import generate as generate_lib
  return generate_lib.generate(config, workdir)


def train(config, workdir: str):
  """Trains the DSNO student on the trajectory dataset; raises Preempted when stopped early."""
  from dsno_jax.training import runs
  result = runs.train_student(config, workdir)
  if result.preempted:
    raise Preempted("student training preempted; its checkpoint is saved")
  return result


def export(config, workdir: str) -> str:
  """Writes the EMA student and its config to WORKDIR/export."""
  from dsno_jax import export as export_lib
  return export_lib.export_student(config, workdir)


def refine(config, workdir: str) -> str:
  """Distribution-matching refinement of WORKDIR/export's one-step output (DMD); writes
  WORKDIR/export_refined. Raises Preempted when stopped early (nothing is exported)."""
  from dsno_jax import export as export_lib
  from dsno_jax.training import refine as refine_lib
  result = refine_lib.refine_student(config, workdir)
  if result.preempted:
    raise Preempted("refinement preempted; its checkpoint is saved")
  return export_lib.export_refined(config, workdir)


def _refine_stage(config, workdir: str) -> Optional[str]:
  """The pipeline's refine stage: `refine` when config.refine.in_pipeline, else nothing."""
  if not config.refine.in_pipeline:
    logging.info("pipeline: refine is off (config.refine.in_pipeline=False)")
    return None
  return refine(config, workdir)


def sample(config, workdir: str) -> str:
  """Draws one-step samples from WORKDIR/export; writes .npz and PNGs."""
  from dsno_jax.evaluation import sampling
  return sampling.sample(config, workdir)


def evaluate(config, workdir: str):
  """Student at 1 NFE and teacher at several NFEs: FID (or FD-digits), table, plot."""
  from dsno_jax.evaluation import evaluate as evaluate_lib
  return evaluate_lib.evaluate(config, workdir)


def _latest_step(directory: str) -> int:
  """The newest finished checkpoint's step, or -1; read from the directory alone (a
  CheckpointManager would synchronise the processes, and only some may ask)."""
  if not storage.isdir(directory):
    return -1
  import orbax.checkpoint as ocp
  return max(ocp.path.step.checkpoint_steps(directory), default=-1)


def _agreed(is_done: Callable[[], bool]) -> bool:
  """is_done() as process 0 finds it, on every process: all must run the same stages (their
  collectives pair up) even when one of them lists the bucket a moment before another writes."""
  done = bool(is_done())
  import jax
  if jax.process_count() == 1:
    return done
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(done)))


def stages(config, workdir: str) -> List[Tuple[str, Callable[[], bool], Callable]]:
  """(name, is_done(), run()) of every pipeline stage, in order; each is also a mode."""
  from dsno_jax.data import trajectories
  from dsno_jax.models.io import is_export
  run_dir = Workdir(workdir)
  needs_teacher = not config.teacher.checkpoint and config.teacher.kind == "unet"
  done = {
      train_teacher: lambda: not needs_teacher or is_export(run_dir.teacher_export),
      classifier: lambda: config.data.name != "digits" or is_export(run_dir.classifier),
      generate: lambda: trajectories.is_complete(run_dir.trajectories(config)),
      train: lambda: _latest_step(run_dir.checkpoints("student")) >= config.train.num_steps,
      export: lambda: is_export(run_dir.student_export),
      refine: lambda: not config.refine.in_pipeline or is_export(run_dir.refined_export),
      sample: lambda: storage.isfile(run_dir.samples_npz),
      evaluate: lambda: storage.isfile(run_dir.results),
  }
  run_as = {refine: _refine_stage}  # stages that may be switched off in the config
  return [(mode.__name__, is_done,
           lambda mode=mode: run_as.get(mode, mode)(config, run_dir.root))
          for mode, is_done in done.items()]


def pipeline(config, workdir: str):
  """Every stage in order, skipping finished ones; once one runs, every later one runs too."""
  timings, upstream_ran = [], False
  for name, is_done, run in stages(config, workdir):
    preemption.check(f"the pipeline, before {name},")
    if not upstream_ran and _agreed(is_done):
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
  from dsno_jax import parallel
  parallel.barrier("dsno_jax:pipeline_results")  # process 0 writes the results all read
  return json.loads(storage.read_text(Workdir(workdir).results))


MODES = {f.__name__: f for f in (train_teacher, classifier, generate, train, export, refine,
                                 sample, evaluate, pipeline)}


def run(mode: str, config, workdir: str):
  """Runs `mode` holding the workdir's lock, so no other run writes there meanwhile.

  Only process 0 of a multi-process run holds it (the others share its run).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {sorted(MODES)}")
  import jax
  from dsno_jax import lock, parallel, preflight
  preflight.check(config, workdir, mode)  # on every host, before any work or collective
  parallel.initialize_distributed(config)  # before jax.process_index() starts the backends
  with lock.hold(Workdir(workdir).lock, f"--mode={mode}", enabled=jax.process_index() == 0):
    with preemption.listening():
      return MODES[mode](config, workdir)
