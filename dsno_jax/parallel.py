"""Device mesh, shardings, per-host input, gathering to the host, multi-process start-up, and one
failed process stopping them all."""
import atexit
import concurrent.futures
import logging as python_logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsno_jax import preemption
from dsno_jax.errors import UserError

DATA_AXIS = "data"
# Parameters smaller than this (elements) stay replicated under FSDP: sharding them saves
# little memory and costs one all-gather each.
FSDP_MIN_SIZE = 2 ** 14
# Longest wait at a barrier for a process that is alive but stuck (one that failed or died ends
# the wait at once through `fail_every_process`, or within JAX's heartbeat timeout).
BARRIER_TIMEOUT_S = 600
FAILED_EXIT_STATUS = 1
_FAILURE_KEY = "dsno_jax/failure"  # coordination-service key: the first failure's message
_SEEN_DIR = "dsno_jax/failure_seen/"  # one key per process that has logged it
_WATCH_EVERY_S = 1.0
_SEEN_WAIT_S = 20.0  # how long process 0 (the service) waits for the others to log a failure


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "")
  return int(value) if value.strip() else None


def _cluster_env_says_multiprocess() -> bool:
  """True when a scheduler (SLURM, Open MPI) started several processes, or on a Cloud TPU VM.

  On TPU VMs (libtpu installed) JAX finds the slice's workers itself, one or many.
  """
  import importlib.util
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if (_env_int(name) or 1) > 1:
      return True
  return importlib.util.find_spec("libtpu") is not None


def initialize_distributed(config) -> None:
  """Starts jax.distributed when there are several processes; a no-op for one process.

  The coordinator comes from config.distributed (coordinator_address, num_processes,
  process_id), else from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID), else from JAX's cluster auto-detection (Cloud TPU, SLURM, Open MPI).
  Must run before anything touches a JAX device.
  """
  if jax.distributed.is_initialized():
    return
  dist = config.get("distributed", None)
  address = (dist.coordinator_address if dist else "") or os.environ.get(
      "JAX_COORDINATOR_ADDRESS", "")
  num_processes = (dist.num_processes if dist and dist.num_processes > 0
                   else _env_int("JAX_NUM_PROCESSES"))
  process_id = (dist.process_id if dist and dist.process_id >= 0
                else _env_int("JAX_PROCESS_ID"))
  if address and num_processes and num_processes > 1:
    if process_id is None or not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id}; expected an integer in [0, {num_processes}) "
                       "(config.distributed.process_id or JAX_PROCESS_ID)")
    # CPU processes need a collectives library to talk to each other (GPUs/TPUs ignore this)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id)
  elif _cluster_env_says_multiprocess():
    jax.distributed.initialize()
  if jax.distributed.is_initialized() and jax.process_count() > 1:
    _start_failure_watch()


def _client():
  """The coordination service's client of this process (JAX has no public handle), or None."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


_watch = {"stop": threading.Event(), "reported": False}


def _exit_now(status: int):
  """Ends the process at once: JAX's shutdown would first wait for every other process."""
  for handler in python_logging.getLogger().handlers:
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def _stop_after_failure(client):
  """Records that this process has logged the failure, then ends it (status 1).

  Process 0 hosts the coordination service, so it ends last: had it gone first, the others
  would abort in JAX's error handler before logging anything.
  """
  try:
    client.key_value_set(f"{_SEEN_DIR}{jax.process_index()}", "seen")
    deadline = time.time() + _SEEN_WAIT_S
    while jax.process_index() == 0 and time.time() < deadline:
      if len(client.key_value_dir_get(_SEEN_DIR)) >= jax.process_count():
        time.sleep(0.5)  # the last of them is still exiting
        break
      time.sleep(0.1)
  except Exception:  # pylint: disable=broad-except
    pass  # the service is gone: process 0 has exited already
  _exit_now(FAILED_EXIT_STATUS)


def _start_failure_watch():
  """A daemon thread that logs another process's failure and ends this one (status 1).

  A process blocked in a collective or a barrier cannot raise; without this it would wait for
  the failed process until a timeout.
  """
  client, stop = _client(), _watch["stop"]

  def watch():
    while not stop.wait(_WATCH_EVERY_S):
      if _watch["reported"]:
        return
      try:
        message = client.key_value_try_get(_FAILURE_KEY)
      except Exception:  # pylint: disable=broad-except
        continue  # not found: nothing failed (if the service died, JAX's heartbeats end us)
      logging.error("stopping this process (%d) too: %s", jax.process_index(), message)
      _stop_after_failure(client)

  threading.Thread(target=watch, name="dsno_jax_failure_watch", daemon=True).start()
  atexit.register(stop.set)  # a run that ends normally stops watching


def fail_every_process(error: BaseException) -> None:
  """Logs `error`, has every other process log it and exit, and ends this process (status 1).

  With one process, returns (the caller raises as usual). With several, the others stop within
  about a second, wherever they wait; this one skips JAX's shutdown, which would wait for them.
  """
  if not (jax.distributed.is_initialized() and jax.process_count() > 1):
    return
  client = _client()
  _watch["reported"] = True
  first = (str(error).strip().splitlines() or [""])[0]
  message = f"process {jax.process_index()} of {jax.process_count()} failed: " \
            f"{type(error).__name__}: {first}"
  # a user error's message says what to fix; its traceback would only bury it
  logging.error("%s; stopping every process", message,
                exc_info=None if isinstance(error, UserError) else error)
  try:
    client.key_value_set(_FAILURE_KEY, message)
  except Exception:  # pylint: disable=broad-except
    pass  # another process reported its failure first: the others are stopping already
  _stop_after_failure(client)


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every host, axis `data`, in process order."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum: int = 1) -> int:
  """Per-device examples of one micro-batch; UserError when the batch does not divide."""
  devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % devices:
    raise UserError(f"global batch size {global_batch_size} is not divisible by the "
                    f"{devices} devices; use a multiple of {devices}")
  per_device = global_batch_size // devices
  if grad_accum < 1 or per_device % grad_accum:
    raise UserError(f"grad_accum={grad_accum} does not divide the {per_device} examples per "
                    f"device (global batch {global_batch_size} over {devices} devices)")
  return per_device // grad_accum


def fsdp_spec(shape, num_shards: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Shards the largest axis divisible by num_shards of a big array; replicates the rest."""
  if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  axes = sorted(range(len(shape)), key=lambda a: -shape[a])
  for axis in axes:
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
  """NamedShardings for a pytree of arrays: replicated, or FSDP by shape.

  The rule depends only on an array's shape, so parameters, their EMA and Adam's moments
  (same shapes) are sharded alike.
  """
  num_shards = mesh.devices.size if fsdp else 1
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, num_shards)), abstract_state)


def global_batch(local_batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Per-host numpy arrays (this host's rows) -> global arrays sharded on `data`."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local_batch.items()}


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Waits until every process gets here (the coordination service's barrier, no collective);
  TimeoutError after timeout_s."""
  if jax.process_count() > 1:
    import orbax.checkpoint as ocp
    try:
      ocp.multihost.sync_global_processes(name, timeout=timeout_s,
                                          processes=set(range(jax.process_count())))
    except Exception as e:  # pylint: disable=broad-except
      raise TimeoutError(f"process {jax.process_index()}: not every process reached {name!r} "
                         f"within {timeout_s} s ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}); see the other "
                         "processes' logs") from e


def compile_in_lockstep(jitted, *args, name: str = "compiled"):
  """jitted compiled for args on every process, returned once all processes have it.

  XLA's CPU collectives (gloo) give up when processes reach their first collective more
  than ~30 s apart, which uneven compile times easily cause; compiling first and meeting
  at a barrier keeps them together. On one process this is just lower + compile.
  """
  compiled = lower_and_compile(jitted, *args)
  barrier(f"dsno_jax:{name}")
  return compiled


def lower_and_compile(jitted, *args):
  """jitted lowered and compiled for args (arrays or jax.ShapeDtypeStructs)."""
  return jitted.lower(*args).compile()


class AheadOfTime:
  """Compiles programs on worker threads before they are needed; `get` returns one once every
  process has it, as compile_in_lockstep does.

  XLA compiles without holding the GIL, so a program compiles while others compile or run.
  The workers never wait for other processes (the barrier is in `get`, on the calling thread,
  in the order the programs are used), so a failed process cannot leave one of them blocked.
  """

  def __init__(self, workers: int = 2):
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, "dsno_jax-compile")
    self._programs = {}

  def start(self, key, compile_fn: Callable, *args) -> None:
    """Begins compile_fn(*args) (e.g. lower_and_compile) under `key`, unless begun already."""
    if key not in self._programs:
      self._programs[key] = self._pool.submit(compile_fn, *args)

  def get(self, key, compile_fn: Callable, *args, name: str = "compiled"):
    """The program under `key` (begun now if it was not), once every process has it."""
    self.start(key, compile_fn, *args)
    program = self._programs[key].result()
    barrier(f"dsno_jax:{name}")
    return program

  def close(self) -> None:
    """Drops what was not begun; waits only for the compilations under way."""
    self._pool.shutdown(wait=True, cancel_futures=True)


def to_host(tree, mesh: Mesh):
  """Global arrays (replicated or sharded, on one or several processes) -> numpy, on every host."""
  gather = jax.jit(lambda t: t, out_shardings=replicated(mesh))
  tree = compile_in_lockstep(gather, tree, name="to_host")(tree)
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def round_up_batch(batch_size: int, num_devices: int, *, grad_accum: int = 1,
                   name: str = "") -> int:
  """The smallest multiple of num_devices * grad_accum that is >= batch_size: every device gets
  the same number of examples in every micro-batch. Logs the change under `name` when given."""
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"{name or 'batch size'}={batch_size!r}; expected a positive integer")
  multiple = num_devices * max(int(grad_accum), 1)
  rounded = -(-int(batch_size) // multiple) * multiple
  if name and rounded != batch_size:
    logging.info("%s=%d rounded up to %d, a multiple of the %d devices%s", name, batch_size,
                 rounded, num_devices, f" x grad_accum {grad_accum}" if grad_accum > 1 else "")
  return rounded


def draw(fn: Callable, params, num_examples: int, batch_size: int, mesh: Mesh,
         columns: Tuple[np.ndarray, ...] = ()) -> Tuple:
  """fn(params, indices (B,), *column rows (B, ...)) -> a tuple of (B, ...) arrays, on `data`,
  for indices 0..num_examples-1 in batches of batch_size; returns the tuple as numpy, on every
  host. `columns`: per-example inputs (num_examples, ...) fed beside the indices.

  `fn` is jitted by the caller with `params` replicated. Batches are rounded up to a multiple of
  the device count and the last one is filled with further indices (and copies of the last
  column rows); the extra rows are dropped, so every example's value depends only on its index
  and columns, whatever the device count and batch size.
  """
  batch_size = round_up_batch(batch_size, mesh.devices.size)
  params = jax.device_put(params, replicated(mesh))
  data = batch_sharding(mesh)
  gather = jax.jit(lambda *a: a, out_shardings=replicated(mesh))
  pieces = []
  for start in range(0, num_examples, batch_size):
    preemption.check("drawing examples")  # callers write only what returns: a safe point
    rows = np.minimum(np.arange(start, start + batch_size), num_examples - 1)
    inputs = [np.arange(start, start + batch_size, dtype=np.int32)]
    inputs += [np.asarray(column)[rows] for column in columns]
    outputs = gather(*fn(params, *(jax.device_put(x, data) for x in inputs)))
    pieces.append(tuple(np.asarray(a.addressable_data(0)) for a in outputs))
  return tuple(np.concatenate(p)[:num_examples] for p in zip(*pieces))


def process_share(num_examples: int) -> np.ndarray:
  """This process's rows of 0..num_examples-1: contiguous, in process order, sizes within one."""
  return np.array_split(np.arange(num_examples), jax.process_count())[jax.process_index()]


def all_processes(value) -> np.ndarray:
  """Every process's `value` (same shape on all), stacked in process order: (P, ...)."""
  if jax.process_count() == 1:
    return np.asarray(value)[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(value), tiled=False))


def gather_shares(local: np.ndarray, num_examples: int) -> np.ndarray:
  """Each process's `process_share(num_examples)` rows (n_p, ...) -> all rows (num_examples, ...),
  on every host."""
  sizes = [len(s) for s in np.array_split(np.arange(num_examples), jax.process_count())]
  if len(local) != sizes[jax.process_index()]:
    raise ValueError(f"{len(local)} local rows; expected this process's share of "
                     f"{num_examples}, {sizes[jax.process_index()]} rows")
  padded = np.zeros((max(sizes),) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  return np.concatenate([rows[:n] for rows, n in zip(all_processes(padded), sizes)])


def jit_rowwise(fn: Callable, mesh: Mesh) -> Callable:
  """fn(params, x (B, ...)) -> a pytree of (B, ...) arrays, jitted with params replicated and
  x and the outputs split on `data`: every device computes its own rows."""
  return jax.jit(fn, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=batch_sharding(mesh))


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a global array split on its leading axis, as numpy, in row order."""
  blocks = {}
  for shard in array.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard.data)  # replicas hold the same rows
  return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def map_local_rows(jitted: Callable, params, fetch: Callable[[np.ndarray], np.ndarray],
                   num_local: int, batch_size: int, mesh: Mesh) -> Iterator[Tuple[int, Any]]:
  """Runs `jitted` (from `jit_rowwise`) over every device of every host on this process's rows.

  fetch(positions (n,)) -> this process's input rows (n, ...) at those positions of
  0..num_local-1. Each step, every process feeds batch_size / P of its rows (batch_size rounded
  up to a multiple of the device count), which become one global batch on `data`; a short or
  missing piece is padded with copies of a row, so every step has one shape (one compilation),
  and the padding is dropped. Yields
  (first position, outputs of that batch's rows as numpy) per batch with rows. The processes
  agree on the number of steps (the largest num_local, one all-gather); each gets back only
  its own rows, with no all-gather of outputs. Every process must call this alike.
  """
  batch_size = round_up_batch(batch_size, mesh.devices.size)
  per_process = batch_size // jax.process_count()
  counts = all_processes(np.int32(num_local))
  if counts.min() < 1:
    raise ValueError(f"rows per process {counts.tolist()}; expected at least 1 on each of the "
                     f"{jax.process_count()} processes")
  params = jax.device_put(params, replicated(mesh))
  sharding = batch_sharding(mesh)
  filler = None
  for start in range(0, int(counts.max()), per_process):
    preemption.check("computing outputs")  # callers write only what it yields: a safe point
    n = max(0, min(per_process, num_local - start))
    if n:
      rows = np.asarray(fetch(np.arange(start, start + n)))
      filler = rows[-1:]
    else:
      rows = filler[:0]
    rows = np.concatenate([rows, np.repeat(filler, per_process - n, axis=0)])
    outputs = jitted(params, jax.make_array_from_process_local_data(sharding, rows))
    if n:
      yield start, jax.tree_util.tree_map(lambda a, n=n: local_rows(a)[:n], outputs)


def _accelerator_present() -> Optional[str]:
  """"GPU" or "TPU" when this machine has one (device files or driver tools), else None."""
  import glob
  import shutil
  if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"):
    return "GPU"
  if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
    return "TPU"
  return None


def describe_runtime(mesh: Mesh, per_device_batch: Optional[int] = None) -> str:
  """One line: platform, versions, processes, devices and their kind, mesh, per-device batch.

  Logs a warning when the machine has a GPU or TPU but JAX runs on the CPU (a CPU-only
  jaxlib, or JAX_PLATFORMS=cpu), which would otherwise go unnoticed for days.
  """
  import jaxlib
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  line = (f"platform {jax.default_backend()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}; "
          f"process {jax.process_index()} of {jax.process_count()}; "
          f"{jax.local_device_count()} local / {len(devices)} global devices ({', '.join(kinds)}); "
          f"mesh {dict(mesh.shape)}")
  if per_device_batch is not None:
    line += f"; {per_device_batch} examples per device"
  present = _accelerator_present()
  if present and jax.default_backend() == "cpu":
    logging.warning("this machine has a %s but JAX runs on the CPU: install the accelerator "
                    "jaxlib (pip install -e \".[%s]\") or unset JAX_PLATFORMS", present,
                    "cuda" if present == "GPU" else "tpu")
  return line

