"""Shared pieces of the training tests: compilation cache, synthetic trajectories, subprocesses."""
import os
import signal
import socket
import sys
import tempfile

import jax
import numpy as np

from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One persistent cache for this process and the subprocesses: a program compiled once (in any
# of them) is loaded, not recompiled, by the next run that needs it.
CACHE_DIR = os.environ.get("DSNO_TEST_JIT_CACHE",
                           os.path.join(tempfile.gettempdir(), "dsno_jax_test_jit_cache"))


def use_compilation_cache():
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def subprocess_env(num_devices: int) -> dict:
  """Environment of a child python: CPU, num_devices virtual devices, the shared cache."""
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "TF_CPP_MIN_LOG_LEVEL": "2",
      "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
  })
  return env


def python() -> str:
  return sys.executable


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def trajectory_pool(config, num_examples: int = 64, seed: int = 0) -> dict:
  """A learnable stand-in for a trajectory dataset: targets are smooth functions of the noise.

  {noise (N,H,W,C), targets (N,K,H,W,C), label (N,), index (N,)} as numpy.
  """
  s, c, k = config.data.image_size, config.data.channels, len(config.trajectory.save_times)
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((num_examples, s, s, c)).astype(np.float32)
  label = rng.integers(0, max(config.data.num_classes, 1), num_examples).astype(np.int32)
  gains = np.linspace(0.3, 1.2, k, dtype=np.float32)[None, :, None, None, None]
  shift = (label.astype(np.float32) / 10.0 - 0.45)[:, None, None, None, None]
  targets = np.tanh(gains * noise[:, None] + shift).astype(np.float32)
  return {"noise": noise, "targets": targets, "label": label,
          "index": np.arange(num_examples, dtype=np.int64)}


def pool_batches(pool: dict, *, global_batch_size: int, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1, nan_at_step=None,
                 sigterm_at_step=None):
  """Endless per-host batches of the pool; step s's global batch depends only on (seed, s).

  nan_at_step: that batch's targets are NaN. sigterm_at_step: this process gets SIGTERM when
  that batch is made (the loop's prefetch makes it a step or two ahead).
  """
  n = len(pool["index"])
  local = global_batch_size // process_count
  step = start_step
  while True:
    rows = np.random.default_rng([seed, step]).choice(n, global_batch_size, replace=False)
    rows = rows[process_index * local:(process_index + 1) * local]
    batch = {name: value[rows] for name, value in pool.items()}
    if step == nan_at_step:
      batch["targets"] = np.full_like(batch["targets"], np.nan)
    if step == sigterm_at_step:
      os.kill(os.getpid(), signal.SIGTERM)
    yield batch
    step += 1


def one_level_config():
  """configs/tiny.py with a one-level UNet (attention kept): the loop is under test, not the
  network, and this compiles in about half the time."""
  config = tiny.get_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), (8,)
  return config


def student_config(**train):
  """A one-level student that learns visibly in a few dozen steps of batch 8."""
  config = one_level_config()
  settings = config.train
  settings.init_from_teacher, settings.batch_size = False, 8
  settings.learning_rate, settings.warmup_steps = 2e-3, 2
  settings.ema_decay, settings.log_every, settings.checkpoint_every = 0.9, 1, 3
  for name, value in train.items():
    settings[name] = value
  return config


def mesh_of(num_devices: int):
  return jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))


def run_student(workdir, pool, *, num_steps, mesh=None, process_index=0, process_count=1,
                nan_at_step=None, sigterm_at_step=None, **train):
  """loop.train of the student_config student on pool batches (mesh None: every device)."""
  from dsno_jax import diffusion
  from dsno_jax.training import loop, objectives
  config = student_config(num_steps=num_steps, **train)
  objective = objectives.student_objective(config, diffusion.save_logsnrs(config))
  batches = lambda start: pool_batches(
      pool, global_batch_size=config.train.batch_size, seed=config.seed, start_step=start,
      process_index=process_index, process_count=process_count, nan_at_step=nan_at_step,
      sigterm_at_step=sigterm_at_step)
  return loop.train(config, str(workdir), objective, batches, mesh=mesh)


def write_pool_dataset(config, directory: str, pool: dict, shard_size: int = 8) -> str:
  """The first config.trajectory.num_examples of `pool` as a trajectory dataset (noise stored)."""
  from dsno_jax.data import trajectories
  from dsno_jax.teachers import generate
  plan = dict(generate.plan_from_config(config, "synthetic"), noise="stored",
              shard_size=shard_size)
  trajectories.prepare(directory, plan)
  for shard in range(trajectories.num_shards(plan["num_examples"], shard_size)):
    rows = trajectories.shard_range(shard, plan["num_examples"], shard_size)
    trajectories.write_shard(directory, plan, shard,
                             {k: v[rows.start:rows.stop] for k, v in pool.items()})
  trajectories.finalize(directory, plan)
  return directory

