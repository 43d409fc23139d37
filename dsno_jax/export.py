"""Exports of the trained networks side by side: the EMA teacher, the EMA student and the
refined student."""
from typing import Dict, Tuple

from absl import logging
import ml_collections

from dsno_jax import models, parallel, preemption
from dsno_jax.models import io as model_io
from dsno_jax.training import checkpoints
from dsno_jax.workdir import Workdir


def export_teacher(config, workdir: str, ema_params) -> str:
  """Writes the EMA teacher (global arrays, any sharding) to WORKDIR/teacher; returns its path."""
  ema = parallel.to_host(ema_params, parallel.make_mesh())
  path = model_io.save_model(Workdir(workdir).teacher_export, ema, config, role="teacher")
  parallel.barrier("dsno_jax:export_teacher")  # process 0 finishes the export's files last
  logging.info("exported the EMA teacher to %s", path)
  return path


def export_student(config, workdir: str) -> str:
  """Writes the EMA student of the newest checkpoint to WORKDIR/export; returns its path."""
  parallel.initialize_distributed(config)
  abstract = models.param_shapes(models.init_student, config)
  mesh = parallel.make_mesh()
  params, step = checkpoints.restore_ema_params(workdir, "student", abstract, config, mesh)
  preemption.check("export")  # before anything is written
  path = model_io.save_model(Workdir(workdir).student_export, parallel.to_host(params, mesh),
                             config, role="student")
  parallel.barrier("dsno_jax:export_student")  # process 0 finishes the export's files last
  logging.info("exported the EMA student of step %d to %s", step, path)
  return path


def export_refined(config, workdir: str) -> str:
  """Writes the EMA generator of the newest refine checkpoint to WORKDIR/export_refined.

  It is the whole DSNO student, but only its t=0 output (the one-step sample) was refined;
  its K-1 other outputs share the refined backbone, are not trained towards the teacher's
  trajectories (except by refine.regression_weight > 0) and are not to be trusted.
  """
  parallel.initialize_distributed(config)
  abstract = models.param_shapes(models.init_student, config)  # the EMA follows the generator
  mesh = parallel.make_mesh()
  params, step = checkpoints.restore_ema_params(workdir, "refine", abstract, config, mesh)
  preemption.check("export of the refined student")  # before anything is written
  path = model_io.save_model(Workdir(workdir).refined_export, parallel.to_host(params, mesh),
                             config, role="student")
  parallel.barrier("dsno_jax:export_refined")  # process 0 finishes the export's files last
  logging.info("exported the EMA refined student of step %d to %s", step, path)
  return path


def load_student(workdir: str, refined: bool = False) -> Tuple[Dict, ml_collections.ConfigDict]:
  """(params, the exported config) of WORKDIR/export (--mode=export), or with `refined` of
  WORKDIR/export_refined (--mode=refine: trust only its last, t=0, output)."""
  run = Workdir(workdir)
  path, mode = (run.refined_export, "refine") if refined else (run.student_export, "export")
  return model_io.load_student(path, mode)
