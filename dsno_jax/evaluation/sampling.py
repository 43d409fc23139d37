"""One-step sampling: one network evaluation maps noise to K outputs; the last is the sample."""
import os
from typing import Callable, Tuple

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from dsno_jax import diffusion, export, models, parallel, pictures
from dsno_jax.data import noise as noise_lib
from dsno_jax.workdir import Workdir

# Samples draw their noise from a stream of their own, never from the training trajectories'.
SAMPLE_SEED_OFFSET = 1_000_003


def make_sampler(config, mesh) -> Callable:
  """jit (params, indices (B,) on `data`) -> (noise, labels, outputs (B, K, H, W, C)).

  Example i's noise and label come from the same per-index keys as the trajectories,
  offset by SAMPLE_SEED_OFFSET, so any sample can be redrawn alone on any number of devices.
  """
  model = models.student_from_config(config)
  logsnr = jnp.asarray(diffusion.save_logsnrs(config))
  size, channels = config.data.image_size, config.data.channels
  num_classes = config.data.num_classes

  def draw(params, indices):
    noise, labels = noise_lib.example_inputs(
        indices, seed=config.seed + SAMPLE_SEED_OFFSET, image_shape=(size, size, channels),
        num_classes=num_classes)
    y = labels if num_classes > 1 else None
    return noise, labels, model.apply({"params": params}, noise, logsnr, y, train=False)

  data = NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(draw, in_shardings=(NamedSharding(mesh, PartitionSpec()), data),
                 out_shardings=(data, data, data))


def draw_samples(config, params, num_samples: int, batch_size: int, mesh=None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(noise, labels, outputs) of examples 0..num_samples-1 as numpy, on every host."""
  mesh = mesh or parallel.make_mesh()
  return parallel.draw(make_sampler(config, mesh), params, num_samples, batch_size, mesh)


def sample(config, workdir: str) -> str:
  """Writes WORKDIR/samples/{samples.npz, grid.png, trajectories.png}; returns the npz path."""
  parallel.initialize_distributed(config)
  params, exported = export.load_student(workdir)
  # the exported config builds the network; the run's config says how many samples
  exported.seed = config.seed
  noise, labels, outputs = draw_samples(exported, params, config.eval.num_samples,
                                        config.eval.batch_size)
  run = Workdir(workdir)
  if jax.process_index() == 0:
    os.makedirs(run.samples, exist_ok=True)
    np.savez(run.samples_npz, images=pictures.to_uint8(outputs[:, -1]), labels=labels)
    scale = max(1, 64 // exported.data.image_size)
    pictures.save_png(pictures.image_grid(outputs[:100, -1]),
                      os.path.join(run.samples, "grid.png"), scale)
    pictures.save_png(pictures.trajectory_strips(noise[:8], outputs[:8]),
                      os.path.join(run.samples, "trajectories.png"), scale)
  logging.info("wrote %d one-step samples to %s", config.eval.num_samples, run.samples_npz)
  return run.samples_npz
