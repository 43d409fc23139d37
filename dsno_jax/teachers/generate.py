"""The teacher's trajectories: solve its PF-ODE from seeded noise and write the trajectory dataset."""
import functools
import time
from typing import Dict, List, Tuple

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from dsno_jax import diffusion, ode, parallel, preemption
from dsno_jax.data import noise as noise_lib
from dsno_jax.data import trajectories
from dsno_jax.teachers import loading
from dsno_jax.workdir import Workdir

_LOG_EVERY_S = 10.0


def plan_from_config(config, teacher_identity: str) -> Dict:
  """Everything that determines the dataset's contents (recorded as its metadata)."""
  trajectory = config.trajectory
  size, channels = config.data.image_size, config.data.channels
  return {
      "format": trajectories.FORMAT, "noise": "seeded",
      "num_examples": int(trajectory.num_examples), "shard_size": int(trajectory.shard_size),
      "image_shape": [size, size, channels], "num_classes": int(config.data.num_classes),
      "num_times": len(trajectory.save_times),
      "save_times": [float(t) for t in trajectory.save_times],
      "logsnrs": [float(v) for v in diffusion.save_logsnrs(config)],
      "logsnr_min": float(config.diffusion.logsnr_min),
      "logsnr_max": float(config.diffusion.logsnr_max),
      "solver": trajectory.solver, "grid": trajectory.grid,
      "num_steps": int(trajectory.num_steps),
      # ODE evaluations per trajectory (None for adaptive solvers), and those the targets add:
      # 0 for fixed-step solvers, whose steps evaluate the x-hats at the save times
      "nfe": ode.nfe(trajectory.solver, trajectory.num_steps, trajectory.grid,
                     tuple(trajectory.save_times), config.diffusion.logsnr_min,
                     config.diffusion.logsnr_max),
      "target_nfe": ode.target_nfe(trajectory.solver, trajectory.save_times),
      "rtol": float(trajectory.rtol), "atol": float(trajectory.atol),
      "teacher": teacher_identity, "seed": int(config.seed),
      "targets_dtype": trajectory.targets_dtype,
  }


def make_solve(config, mesh: Mesh):
  """jit (denoise, indices (B,) sharded on `data`) -> (noise, labels, targets (B,K,H,W,C)).

  Cached on the settings, so generating again in one process does not recompile.
  """
  trajectory = config.trajectory
  return _make_solve(
      mesh, seed=int(config.seed),
      image_shape=(config.data.image_size, config.data.image_size, config.data.channels),
      num_classes=int(config.data.num_classes),
      save_times=tuple(float(t) for t in trajectory.save_times), solver=trajectory.solver,
      num_steps=int(trajectory.num_steps), grid=trajectory.grid, rtol=float(trajectory.rtol),
      atol=float(trajectory.atol),
      logsnr_min=float(config.diffusion.logsnr_min),
      logsnr_max=float(config.diffusion.logsnr_max))


@functools.lru_cache(maxsize=8)
def _make_solve(mesh: Mesh, *, seed, image_shape, num_classes, save_times, **solver_args):
  def solve(denoise, indices):
    noise, labels = noise_lib.example_inputs(indices, seed=seed, image_shape=image_shape,
                                   num_classes=num_classes)
    targets = ode.trajectory(denoise, noise, save_times,
                             y=labels if num_classes > 1 else None, **solver_args)
    return noise, labels, targets

  # Each example is solved independently, so every device solves its own rows (shard_map):
  # left to the SPMD partitioner, diffrax's loop (with its host-callback error checks) would
  # be pinned to one device.
  batch, whole = PartitionSpec("data"), PartitionSpec()
  solve = jax.shard_map(solve, mesh=mesh, in_specs=(whole, batch), out_specs=(batch,) * 3,
                        check_vma=False)
  data, replicated = NamedSharding(mesh, batch), NamedSharding(mesh, whole)
  return jax.jit(solve, in_shardings=(replicated, data), out_shardings=(data, data, data))


def _host_local(array) -> np.ndarray:
  """This host's rows of a `data`-sharded global array, in order."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


def _host_chunks(plan: Dict, done, local_batch: int) -> List[Tuple[int, range]]:
  """(shard, indices) pieces of at most local_batch of this host's unfinished shards."""
  total = trajectories.num_shards(plan["num_examples"], plan["shard_size"])
  chunks = []
  for shard in range(jax.process_index(), total, jax.process_count()):
    if shard in done:
      continue
    indices = trajectories.shard_range(shard, plan["num_examples"], plan["shard_size"])
    chunks += [(shard, indices[i:i + local_batch]) for i in range(0, len(indices), local_batch)]
  return chunks


class _Progress:
  """Logs this host's examples/s and the run's ETA; the first round (compilation) is timed apart."""

  def __init__(self, num_rounds: int):
    self.num_rounds, self.rounds, self.examples = num_rounds, 0, 0
    self.start = self.first_done = time.time()
    self.last_log = 0.0

  def update(self, examples: int):
    self.rounds += 1
    now = time.time()
    if self.rounds == 1:
      self.first_done = now
      logging.info("trajectories: first batch (with compilation) took %.1f s", now - self.start)
    else:
      self.examples += examples
    if self.rounds > 1 and now - self.last_log > _LOG_EVERY_S:
      per_round = (now - self.first_done) / (self.rounds - 1)
      logging.info("trajectories: round %d/%d, %.1f examples/s on this host, ETA %.0f s",
                   self.rounds, self.num_rounds, self.examples / max(now - self.first_done, 1e-9),
                   per_round * (self.num_rounds - self.rounds))
      self.last_log = now

  def finish(self):
    logging.info("trajectories: %d rounds in %.1f s", self.rounds, time.time() - self.start)


def check_settings(settings) -> None:
  """ValueError naming the first count of config.trajectory that is not a positive integer."""
  for name in ("num_examples", "shard_size", "batch_size", "num_steps"):
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"trajectory.{name}={value!r}; expected a positive integer (set "
                       f"--config.trajectory.{name}=...)")


def generate(config, workdir: str, *, devices=None) -> str:
  """Writes (or finishes) the trajectory dataset of `config`; returns its directory.

  Every host writes its own shards (shard s belongs to host s % process_count); shards
  already on disk are skipped, so a killed run resumes where it stopped. `devices` (default
  every device of every host, in process order) form the `data` mesh. With several hosts
  the directory must be on a file system that every host sees.
  """
  parallel.initialize_distributed(config)
  directory = Workdir(workdir).trajectories(config)
  settings = config.trajectory
  check_settings(settings)
  # the student's run on these processes reads shards of its own on each: refused before any work
  trajectories.check_shards_per_host(settings.num_examples, settings.shard_size,
                                     jax.process_count())
  denoise, identity = loading.load_teacher(config, workdir)
  plan = plan_from_config(config, identity)
  # The others read the plan only once process 0 has written it: before, they could find the
  # directory half-begun (another file there, no plan yet) and refuse it.
  is_leader = jax.process_index() == 0
  if is_leader:
    complete = trajectories.prepare(directory, plan, write=True)
  parallel.barrier("dsno_jax:trajectories_plan_written")
  if not is_leader:
    complete = trajectories.prepare(directory, plan, write=False)
  if complete:
    logging.info("trajectories: %s is already complete", directory)
    return directory

  mesh = parallel.make_mesh() if devices is None else Mesh(np.asarray(devices), ("data",))
  if settings.batch_size % mesh.size:
    raise ValueError(f"config.trajectory.batch_size={settings.batch_size} must be a multiple of the "
                     f"device count {mesh.size}")
  local_batch = settings.batch_size // jax.process_count()
  if settings.shard_size % local_batch:
    logging.warning("trajectories: shard_size=%d is not a multiple of the per-host batch %d; "
                    "the last batch of every shard is padded (wasted work)", settings.shard_size,
                    local_batch)
  chunks = _host_chunks(plan, trajectories.existing_shards(directory, plan), local_batch)
  # Every host must join every solve; hosts with fewer pieces pad with dummy batches.
  num_rounds = int(np.max(parallel.all_processes(np.int32(len(chunks)))))
  logging.info("trajectories: %d examples in %d shards to %s; this host: %d batches of %d, "
               "%d rounds", plan["num_examples"], trajectories.num_shards(
                   plan["num_examples"], plan["shard_size"]), directory, len(chunks),
               local_batch, num_rounds)
  if plan["nfe"] is not None:
    logging.info("trajectories: %s on %d %s steps, %d denoiser evaluations per trajectory",
                 plan["solver"], plan["num_steps"], plan["grid"],
                 plan["nfe"] + plan["target_nfe"])

  solve = make_solve(config, mesh)
  denoise = jax.device_put(denoise, NamedSharding(mesh, PartitionSpec()))
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  buffers: Dict[str, list] = {"noise": [], "targets": [], "label": [], "index": []}
  progress = _Progress(num_rounds)

  def collect(chunk, outputs):
    shard, indices = chunk
    noise, labels, targets = (_host_local(x) for x in outputs)
    n = len(indices)  # drop the padding
    if not np.isfinite(targets[:n]).all():
      raise FloatingPointError(
          f"the teacher {identity} gives non-finite trajectory targets for examples "
          f"{indices[0]}..{indices[-1]}: stopping before shard {shard} is written, so the "
          f"dataset at {directory} stays incomplete. Check that the teacher's weights are "
          "finite (its training may have diverged) and that config.teacher.mean_type and "
          "config.trajectory (solver, num_steps, grid) suit it")
    for key, value in (("noise", noise), ("targets", targets), ("label", labels),
                       ("index", np.asarray(indices))):
      buffers[key].append(value[:n])
    if indices.stop == trajectories.shard_range(shard, plan["num_examples"],
                                                plan["shard_size"]).stop:
      trajectories.write_shard(directory, plan, shard,
                               {k: np.concatenate(v) for k, v in buffers.items()})
      for v in buffers.values():
        v.clear()
    return n

  pending = None  # dispatch round r before fetching round r-1, so writing overlaps solving
  for r in range(num_rounds + 1):
    outputs = chunk = None
    # a stop keeps every shard already finished; the one in progress is solved again on resume
    stop = r < num_rounds and preemption.reached()
    if r < num_rounds and not stop:
      chunk = chunks[r] if r < len(chunks) else None  # None: a dummy batch of padding
      local = np.zeros((local_batch,), np.int32)
      if chunk is not None:
        local[:len(chunk[1])] = chunk[1]
        local[len(chunk[1]):] = chunk[1][-1]
      indices = jax.make_array_from_process_local_data(data_sharding, local)
      outputs = solve(denoise, indices)
    if pending is not None:
      if pending[0] is not None:
        progress.update(collect(*pending))
      else:
        jax.block_until_ready(pending[1])
        progress.update(0)
    pending = (chunk, outputs)
    if stop:
      raise preemption.Preempted(
          f"generation stopped on SIGTERM after round {r} of {num_rounds}; every shard written "
          f"to {directory} is whole, and --mode=generate resumes with the others")
  progress.finish()

  parallel.barrier("dsno_jax:trajectories_shards_written")
  if is_leader:
    trajectories.finalize(directory, plan)
  parallel.barrier("dsno_jax:trajectories_complete")
  return directory
