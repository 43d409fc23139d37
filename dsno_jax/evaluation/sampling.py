"""Mode `sample`: one network evaluation maps noise to K outputs; the last is the sample."""
import os
from typing import Callable, Tuple

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from dsno_jax import diffusion, model_io, models
from dsno_jax.data import generate as generate_lib
from dsno_jax.evaluation import pictures
from dsno_jax.training import sharding

# Samples draw their noise from a stream of their own, never from the training trajectories'.
SAMPLE_SEED_OFFSET = 1_000_003


def export_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "export")


def load_student(workdir: str):
  """(params, the exported config) of WORKDIR/export, written by --mode=export."""
  path = export_dir(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no exported student at {path}: run --mode=export first")
  params, config, role = model_io.load_model(path)
  if role != "student":
    raise ValueError(f"{path} holds a {role}, expected the exported student")
  return params, config


def make_sampler(config, mesh) -> Callable:
  """jit (params, indices (B,) on `data`) -> (noise, labels, outputs (B, K, H, W, C)).

  Example i's noise and label come from the same per-index keys as the trajectories,
  offset by SAMPLE_SEED_OFFSET, so any sample can be redrawn alone on any number of devices.
  """
  model = models.student_from_config(config)
  logsnr = jnp.asarray(diffusion.save_logsnrs(config))
  s, c, num_classes = config.data.image_size, config.data.channels, config.data.num_classes

  def draw(params, indices):
    noise, labels = generate_lib.example_inputs(
        indices, seed=config.seed + SAMPLE_SEED_OFFSET, image_shape=(s, s, c),
        num_classes=num_classes)
    y = labels if num_classes > 1 else None
    return noise, labels, model.apply({"params": params}, noise, logsnr, y, train=False)

  data = NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(draw, in_shardings=(NamedSharding(mesh, PartitionSpec()), data),
                 out_shardings=(data, data, data))


def draw_samples(config, params, num_samples: int, batch_size: int, mesh=None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(noise, labels, outputs) of examples 0..num_samples-1 as numpy, on every host."""
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh)
  sampler = make_sampler(config, mesh)
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  data = NamedSharding(mesh, PartitionSpec("data"))
  gather = jax.jit(lambda *a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))
  pieces = []
  for start in range(0, num_samples, batch_size):
    # the last batch is padded with further indices and trimmed
    indices = np.arange(start, start + batch_size, dtype=np.int32)
    indices = jax.device_put(indices, data)
    noise, labels, outputs = gather(*sampler(params, indices))
    pieces.append(tuple(np.asarray(a.addressable_data(0)) for a in (noise, labels, outputs)))
  noise, labels, outputs = (np.concatenate(p)[:num_samples] for p in zip(*pieces))
  return noise, labels, outputs


def sample(config, workdir: str) -> str:
  """Writes WORKDIR/samples/{samples.npz, grid.png, trajectories.png}; returns the npz path."""
  sharding.initialize_distributed(config)
  params, exported = load_student(workdir)
  # the exported config builds the network; the run's config says how many samples
  exported.seed = config.seed
  n, batch = config.eval.num_samples, config.eval.batch_size
  noise, labels, outputs = draw_samples(exported, params, n, batch)
  out_dir = os.path.join(os.path.abspath(workdir), "samples")
  path = os.path.join(out_dir, "samples.npz")
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    np.savez(path, images=pictures.to_uint8(outputs[:, -1]), labels=labels)
    scale = max(1, 64 // exported.data.image_size)
    pictures.save_png(pictures.image_grid(outputs[:100, -1]), os.path.join(out_dir, "grid.png"),
                      scale)
    pictures.save_png(pictures.trajectory_strips(noise[:8], outputs[:8]),
                      os.path.join(out_dir, "trajectories.png"), scale)
  logging.info("wrote %d one-step samples to %s", n, path)
  return path
