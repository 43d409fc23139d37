"""The two training runs: the teacher UNet on images, the DSNO student on trajectories."""
from typing import Callable

from absl import logging

from dsno_jax import parallel
from dsno_jax.data import images, trajectories
from dsno_jax.teachers import loading
from dsno_jax.training import objectives
from dsno_jax.training.loop import RunResult, train
from dsno_jax.workdir import Workdir


def train_teacher(config, workdir: str) -> RunResult:
  """Diffusion training of the teacher on config.data, resuming from its newest checkpoint."""
  parallel.initialize_distributed(config)
  objective = objectives.teacher_objective(config)
  source = images.load_source(config, workdir, config.data.train_split)

  def make_batches(start_step):
    return images.batch_iterator(source, global_batch_size=objective.settings.batch_size,
                                 seed=config.seed, start_step=start_step,
                                 random_flip=config.data.random_flip,
                                 num_workers=config.data.num_workers)

  return train(config, workdir, objective, make_batches)


def teacher_params_loader(config, workdir: str) -> Callable:
  """() -> the configured teacher's parameters (read only when a new run starts)."""
  def load():
    params, identity = loading.load_teacher_params(config, workdir)
    logging.info("initialising the student from %s", identity)
    return params
  return load


def train_student(config, workdir: str) -> RunResult:
  """DSNO on the trajectories (config.trajectory.dir or WORKDIR/trajectories)."""
  parallel.initialize_distributed(config)
  directory = Workdir(workdir).trajectories(config)
  logsnr = trajectories.check_logsnrs(config, directory)
  metadata = trajectories.read_metadata(directory)
  trajectories.check_noise(directory, metadata)
  noise_seed = int(metadata["seed"]) if metadata["noise"] == "seeded" else None
  objective = objectives.student_objective(config, logsnr, teacher_params_loader(config, workdir),
                                           noise_seed=noise_seed)

  def make_batches(start_step):
    return trajectories.batch_iterator(directory, global_batch_size=objective.settings.batch_size,
                                       seed=config.seed, start_step=start_step,
                                       num_workers=config.data.num_workers,
                                       cache_gb=config.data.cache_gb)

  return train(config, workdir, objective, make_batches)
