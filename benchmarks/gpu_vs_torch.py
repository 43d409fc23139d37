"""Ours against PyTorch on one GPU, side by side, in one run: the same DSNO network and weights.

For each of configs/cifar10.py (the paper's CIFAR-10 DSNO, ch 256, 65.8M parameters, at
`--cifar10-batch` 32: the paper's batch 256 on 8 devices) and configs/bench.py (ch 64, batch
8), ours (the package's model as a library user builds it: `models.student_from_config`,
the backend's default formulations) against benchmarks/torch_reference.py's DSNO loaded with
OUR parameters (`load_flax_params`):
  check     FIRST, outputs equal: one forward on the same weights and noise, ours at
            'highest' precision against torch with TF32 off (must agree within 1e-3 relative,
            max |a - b| / max |b|), and at the default precisions (TF32 on both) for the record;
  float32   TF32 allowed on both (JAX's default matmul precision, torch allow_tf32):
            forward (one-step sampling, images/s), train step (forward, MSE to random targets,
            backward, Adam; examples/s and ms; dropout on, as in training), peak memory (torch:
            max_memory_allocated from building the model on; ours: the compiled step's
            memory plan, and the allocator's peak so far), the first two step losses of both;
  bfloat16  the same with ours in config.model.dtype="bfloat16" and torch under
            autocast(bfloat16) (parameters float32 in both);
  torch:    eager NCHW, eager channels_last (TimeConv through torch.fft), and torch.compile
            (channels_last, mode `--compile-mode`, TimeConv as real DFT matmuls by default,
            `--compile-time-conv`: inductor has no complex code generation), each failure
            caught and reported; cudnn.benchmark on and Adam(fused=True) on CUDA;
  inception Inception-v3 pool3 features of uint8 32x32 images at `--inception-batch` 250
            (resize to 299 included): dsno_jax.evaluation.inception (random weights, 'highest'
            precision as FID uses it, and default precision) against pytorch-fid's
            InceptionV3([3]) built without its weight download and loaded with the same weights
            (TF32 on and off), images/s and the features' agreement.
FLOPs: XLA's cost analysis of the lowered program (XLA:GPU's compiled count omits cuDNN
convolutions), the same arithmetic for both frameworks; the matmul rates (8192^3, bfloat16 and
float32 at default precision, JAX and torch) are measured in the same run, and MFU = step
TFLOP/s / bfloat16 matmul TFLOP/s. Timing: after warm-up, `--repeats` rounds of
`--iters` back-to-back calls, the implementations interleaved round by round, medians.

Jobs run in priority order (CIFAR-10's check, float32, bfloat16; Inception; torch.compile of
the CIFAR-10 bfloat16 step; the bench config; the other torch.compile runs), each only if its
estimated time fits in what is left of `--budget-s` (counted from the start; torch.compile is
stopped by SIGALRM then, or after `--compile-cap-s`). Skipped jobs are listed, failures caught
and reported, the JSON rewritten after every job. JAX and torch share the process and the card
(JAX allocates on demand here).

  python benchmarks/gpu_vs_torch.py [--budget-s 420] [--out benchmarks/results/gpu_vs_torch.json]
      [--configs cifar10,bench] [--dtypes float32,bfloat16] [--sections models,compile,inception]
      [--repeats 5] [--iters 5] [--torch-compile auto|on|off] [--compile-mode default] [--tiny]
`--tiny` (a tiny version of each config, batch 2, one round) runs on a CPU in about a minute,
for the tests. On a CPU without --tiny it compares what a library user gets with PyTorch
(`--threads` threads) in one process, interleaved: torch's OpenMP threads lose more than XLA's
pool to a shared machine, so quote CPU ratios from a quiet machine only.
"""
import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import unittest.mock

START = time.perf_counter()  # the budget counts from here, imports included
# JAX shares the card with torch in this process: allocate on demand, not 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import dsno_jax  # noqa: E402,F401 -- before JAX starts: the XLA:CPU flag, as every user gets
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torch_reference as tr  # noqa: E402
from dsno_jax import diffusion, models  # noqa: E402

CHECK_TOLERANCE = 1e-3  # max |ours - torch| / max |torch|, float32 with TF32 off
TARGETS = {"step_speedup": 1.3, "mfu": 0.40, "sampling_speedup": 1.3}
SECTIONS = ("models", "compile", "inception")
# Seconds each job is expected to take on an H200 (from benchmarks/h200/gpu.json's compile
# times: CIFAR-10 forward ~11 s, train step ~40 s per dtype; bench 8-11 s and 25-37 s).
ESTIMATE_S = {"matmul": 10, ("cifar10", "float32"): 90, ("cifar10", "bfloat16"): 80,
              ("bench", "float32"): 60, ("bench", "bfloat16"): 55, "inception": 60,
              ("cifar10", "compile"): 90, ("bench", "compile"): 60}
MIN_COMPILE_S = 60  # torch.compile is started only with this much budget left


# --- configs and parameters ------------------------------------------------------------------

def tiny_config(name: str):
  """A few-second CPU stand-in for configs/<name>: 16x16x3, ch 32, K = 4, batch 2, with the
  same features (cifar10: ResnetBlock resampling, dropout, attention at both resolutions)."""
  from configs import bench
  config = bench.get_config()
  data, model = config.data, config.model
  data.image_size, config.train.batch_size = 16, 2
  model.ch, model.emb_ch, model.num_res_blocks = 32, 64, 1
  if name == "cifar10":
    model.ch_mult, model.attn_resolutions = (1, 1), (8, 16)
    model.resblock_resample, model.dropout = True, 0.2
  else:
    model.ch_mult, model.attn_resolutions = (1, 2), (8,)
  return config


def make_config(name: str, dtype: str, batch: int, tiny: bool):
  config = tiny_config(name) if tiny else importlib.import_module(f"configs.{name}").get_config()
  config.model.dtype = dtype
  if batch:
    config.train.batch_size = batch
  return config


def comparison_params(config, seed: int = 0):
  """Random float32 parameters (numpy, our tree) that make every path of the network matter.

  Our init zeroes conv2, conv_out and proj_out and makes the TimeConvs tiny, which would hide a
  wrong residual branch from an output comparison: here kernels are N(0, 1/fan_in), biases
  N(0, 0.1^2), norm scales 1 + N(0, 0.1^2), TimeConv weights N(0, 1/C^2)."""
  shapes = flax.traverse_util.flatten_dict(models.param_shapes(models.init_student, config))
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in shapes.items():
    leaf, parent, shape = path[-1], path[-2] if len(path) > 1 else "", tuple(s.shape)
    if leaf == "kernel":
      fan_in = shape[0] if parent in ("q", "k", "v") else int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif leaf == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif leaf.startswith("weight_"):  # TimeConv (C_in, C_out, modes)
      value = rng.standard_normal(shape) / shape[0]
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[path] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


def relative_diff(ours, ref) -> dict:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return {"max_rel": float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30)),
          "rel_l2": float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30)),
          "finite": bool(np.all(np.isfinite(ours)) and np.all(np.isfinite(ref)))}


# --- timing ----------------------------------------------------------------------------------

class Contestant:
  """One implementation's callables: forward() and step() each run one call and return
  something to wait on; sync(x) waits for it; mode(phase) prepares 'forward' or 'step'."""

  def __init__(self, name, forward, step, sync, mode=lambda phase: None):
    self.name, self.forward, self.step, self.sync, self.mode = name, forward, step, sync, mode


def time_rounds(contestants, phase: str, rounds: int, iters: int) -> dict:
  """{name: median seconds per call}: `rounds` rounds, each timing `iters` back-to-back calls of
  every contestant in turn (so machine drift hits all alike)."""
  times = {c.name: [] for c in contestants}
  for c in contestants:
    c.mode(phase)
  for _ in range(rounds):
    for c in contestants:
      fn = getattr(c, phase)
      start = time.perf_counter()
      out = None
      for _ in range(iters):
        out = fn()
      c.sync(out)
      times[c.name].append((time.perf_counter() - start) / iters)
  return {name: statistics.median(ts) for name, ts in times.items()}


def throughput(fn, sync, repeats: int, iters: int) -> float:
  sync(fn())
  return time_rounds([Contestant("x", fn, fn, sync)], "forward", repeats, iters)["x"]


class BudgetExceeded(Exception):
  pass


@contextlib.contextmanager
def deadline(seconds):
  """Raise BudgetExceeded in the main thread after `seconds` (None: no limit)."""
  if (seconds is None or not hasattr(signal, "setitimer")
      or threading.current_thread() is not threading.main_thread()):
    yield
    return

  def stop(signum, frame):
    raise BudgetExceeded(f"stopped after {seconds:.0f} s (time budget)")

  previous = signal.signal(signal.SIGALRM, stop)
  signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


# --- environment -----------------------------------------------------------------------------

def torch_device(backend: str):
  """torch's device matching JAX's backend, or (None, why) when torch cannot follow."""
  if backend == "cpu":
    return torch.device("cpu"), None
  if backend == "gpu" and torch.cuda.is_available():
    return torch.device("cuda"), None
  return None, f"JAX runs on {backend} but torch {torch.__version__} has no such device"


def environment() -> dict:
  import jaxlib  # noqa: PLC0415
  env = {"python": platform.python_version(), "machine": platform.machine(),
         "cpu_count": os.cpu_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
         "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
         "jax_devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  try:
    with open("/proc/cpuinfo") as f:
      env["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  try:
    env["jax_environment_info"] = jax.print_environment_info(return_string=True)
  except Exception as e:  # noqa: BLE001
    env["jax_environment_info"] = repr(e)
  try:
    from jax._src.lib import cuda_versions  # noqa: PLC0415
    if cuda_versions is not None:
      env["jax_cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
      env["jax_cudnn"] = cuda_versions.cudnn_get_version()
      env["jax_cuda_driver"] = cuda_versions.cuda_driver_get_version()
  except Exception:  # noqa: BLE001 -- only some builds have these
    pass
  if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(torch_device_name=props.name,
               torch_device_memory_mib=props.total_memory / 2 ** 20,
               torch_cudnn=torch.backends.cudnn.version(),
               multiprocessors=props.multi_processor_count)
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    if smi.returncode == 0:
      name, driver, memory = [s.strip() for s in smi.stdout.splitlines()[0].split(",")]
      env.update(gpu_name=name, driver=driver, gpu_memory=memory)
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    pass
  return env


def set_tf32(enabled: bool):
  torch.backends.cuda.matmul.allow_tf32 = enabled
  torch.backends.cudnn.allow_tf32 = enabled


def matmul_rates(n: int, device, repeats: int, iters: int) -> dict:
  """TFLOP/s of an n^3 matmul: JAX bfloat16 and float32 at default precision (TF32 on NVIDIA);
  torch bfloat16 and float32 with TF32 allowed."""
  rng = np.random.default_rng(0)
  a32 = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  out = {"n": n}
  mm = jax.jit(lambda x: x @ x)
  for name, x in (("jax_bfloat16", a32.astype(jnp.bfloat16)), ("jax_float32_default", a32)):
    out[name] = 2.0 * n ** 3 / throughput(lambda x=x: mm(x), jax.block_until_ready, repeats,
                                          iters) / 1e12
  if device is not None:
    sync = torch_sync(device)
    t = torch.randn(n, n, device=device)
    for name, x in (("torch_bfloat16", t.to(torch.bfloat16)), ("torch_float32_tf32", t)):
      out[name] = 2.0 * n ** 3 / throughput(lambda x=x: x @ x, sync, repeats, iters) / 1e12
  return out


def torch_sync(device):
  if device.type == "cuda":
    return lambda _=None: torch.cuda.synchronize()
  return lambda _=None: None


def import_inception():
  """dsno_jax.evaluation.inception; loaded from its file when the evaluation package's other
  modules cannot import here (it needs only numpy, JAX, Flax and dsno_jax.weights)."""
  try:
    from dsno_jax.evaluation import inception  # noqa: PLC0415
    return inception
  except ImportError:
    path = os.path.join(ROOT, "dsno_jax", "evaluation", "inception.py")
    spec = importlib.util.spec_from_file_location("dsno_inception_standalone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- ours ------------------------------------------------------------------------------------

def cpu_specs(tree):
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=cpu), tree)


def flops_of(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def lowered_flops(jitted, *args) -> float:
  """XLA's FLOP count of the lowered (unoptimised) program, lowered for the CPU (XLA:GPU counts
  cuDNN convolutions as zero, and gives no count for unoptimised programs: see
  benchmarks/README.md)."""
  return flops_of(jitted.lower(*cpu_specs(args)))


@contextlib.contextmanager
def matmul_precision(precision: str):
  """JAX's default precision of matmuls and convolutions traced within."""
  if hasattr(jax, "default_matmul_precision"):
    with jax.default_matmul_precision(precision):
      yield
    return
  previous = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", precision)
  try:
    yield
  finally:
    jax.config.update("jax_default_matmul_precision", previous)


def allocator_peak_mib() -> float:
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001
    stats = {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2 ** 20


def plan_mib(memory) -> float:
  if memory is None:
    return float("nan")
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2 ** 20


class Ours:
  """Our DSNO of `config` (the package's defaults): jitted forward and train step, on `case`'s
  weights and data."""

  def __init__(self, case, config):
    self.case, self.config = case, config
    self.model = models.student_from_config(config)
    logsnr = jnp.asarray(case.logsnr)
    model, opt = self.model, optax.adam(config.train.learning_rate)
    self.opt = opt

    def forward(p, z, y):
      return model.apply({"params": p}, z, logsnr, y, train=False)

    def step(p, o, z, y, t, key):
      def loss_fn(p):
        out = model.apply({"params": p}, z, logsnr, y, train=True, rngs={"dropout": key})
        return jnp.mean((out - t) ** 2)
      loss, g = jax.value_and_grad(loss_fn)(p)
      updates, o = opt.update(g, o, p)
      return optax.apply_updates(p, updates), o, loss

    self.forward_fn, self.step_fn = forward, step
    self.forward = jax.jit(forward)
    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.params = jax.tree_util.tree_map(jnp.asarray, case.params)
    self.z, self.t = jnp.asarray(case.noise), jnp.asarray(case.targets)
    self.y = None if case.labels is None else jnp.asarray(case.labels)
    self.key = jax.random.PRNGKey(0)
    self.info = {"time_conv_formulation": self.model.time_conv_formulation}
    self.lowered = {}  # what was compiled, kept for its FLOP count on a CPU

  def compile_forward(self, precision=None):
    start = time.perf_counter()
    if precision is None:
      self.lowered["forward"] = self.forward.lower(self.params, self.z, self.y)
      compiled = self.lowered["forward"].compile()
    else:
      with matmul_precision(precision):
        compiled = jax.jit(self.forward_fn).lower(self.params, self.z, self.y).compile()
    return compiled, time.perf_counter() - start

  def compile_step(self):
    opt_state = self.opt.init(self.params)
    start = time.perf_counter()
    self.lowered["step"] = self.step.lower(self.params, opt_state, self.z, self.y, self.t,
                                           self.key)
    compiled = self.lowered["step"].compile()
    return compiled, time.perf_counter() - start

  def flops(self) -> tuple:
    """(forward, step) FLOPs of the lowered programs, lowered for the CPU."""
    if jax.default_backend() == "cpu" and len(self.lowered) == 2:
      return tuple(flops_of(self.lowered[p]) for p in ("forward", "step"))
    opt_state = jax.eval_shape(self.opt.init, self.params)
    return (lowered_flops(jax.jit(self.forward_fn), self.params, self.z, self.y),
            lowered_flops(jax.jit(self.step_fn), self.params, opt_state, self.z, self.y, self.t,
                          self.key))

  def contestant(self, fwd, step) -> Contestant:
    """Fresh, donated copies of the parameters and optimiser state for `step`."""
    state = [jax.tree_util.tree_map(jnp.copy, self.params), None]
    state[1] = self.opt.init(state[0])

    def one_step():
      state[0], state[1], loss = step(state[0], state[1], self.z, self.y, self.t, self.key)
      return loss

    return Contestant("ours", lambda: fwd(self.params, self.z, self.y), one_step,
                      jax.block_until_ready)


# --- torch -----------------------------------------------------------------------------------

class TorchRun:
  """benchmarks/torch_reference.py's DSNO of `case` on torch's device, with our weights."""

  def __init__(self, case, dtype: str, channels_last: bool, compiled: bool = False,
               compile_mode=None, time_conv: str = "fft"):
    self.case, self.device = case, case.device
    self.bf16 = dtype == "bfloat16"
    cuda = self.device.type == "cuda"
    if cuda:
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
      self.base = torch.cuda.memory_allocated()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = tr.DSNO.from_config(case.config_f32, channels_last=channels_last,
                                time_conv=time_conv)
    tr.load_flax_params(model, case.params)
    self.model = model.to(self.device, memory_format=fmt)
    self.run = torch.compile(self.model, mode=compile_mode) if compiled else self.model
    self.opt = torch.optim.Adam(self.model.parameters(), lr=case.config_f32.train.learning_rate,
                                fused=cuda)
    to = lambda a: torch.from_numpy(np.array(a)).to(self.device)
    self.noise = to(case.noise).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
    self.targets = to(case.targets).permute(0, 1, 4, 2, 3).contiguous()
    self.logsnr = to(case.logsnr)
    self.labels = None if case.labels is None else to(case.labels)
    self.name = ("torch.compile" if compiled else "torch eager") + (
        " channels_last" if channels_last else " NCHW") + (
        f" ({time_conv} TimeConv)" if time_conv != "fft" else "")
    self.sync = torch_sync(self.device)

  def autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

  def forward(self):
    with torch.no_grad(), self.autocast():
      return self.run(self.noise, self.logsnr, self.labels)

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    with self.autocast():
      out = self.run(self.noise, self.logsnr, self.labels)
    loss = F.mse_loss(out.float(), self.targets)
    loss.backward()
    self.opt.step()
    return loss.detach()

  def mode(self, phase):
    self.model.train(phase == "step")

  def output_nhwc(self, out) -> np.ndarray:
    return out.float().permute(0, 1, 3, 4, 2).cpu().numpy()

  def peak_mib(self) -> float:
    if self.device.type != "cuda":
      return float("nan")
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20

  def contestant(self) -> Contestant:
    return Contestant(self.name, self.forward, self.step, self.sync, self.mode)

  def close(self):
    del self.run, self.model, self.opt
    if self.device.type == "cuda":
      torch.cuda.empty_cache()


# --- the comparison --------------------------------------------------------------------------

class Case:
  """One config at one batch: the weights, noise, targets and labels both frameworks get."""

  def __init__(self, name, args, device):
    self.name, self.args, self.device = name, args, device
    batch = args.cifar10_batch if name == "cifar10" else args.bench_batch
    self.config_f32 = make_config(name, "float32", batch, args.tiny)
    config = self.config_f32
    self.batch = config.train.batch_size
    s, c = config.data.image_size, config.data.channels
    self.logsnr = np.asarray(diffusion.save_logsnrs(config), np.float32)
    k = len(self.logsnr)
    rng = np.random.default_rng(1)
    self.noise = rng.standard_normal((self.batch, s, s, c)).astype(np.float32)
    self.targets = rng.standard_normal((self.batch, k, s, s, c)).astype(np.float32)
    classes = config.data.num_classes
    self.labels = rng.integers(0, classes, (self.batch,)).astype(np.int32) if classes > 1 else None
    self.params = comparison_params(config)
    self.n_params = models.count_params(self.params)
    self.ours, self.ours_rows, self.ours_out, self.contestants = {}, {}, {}, {}
    self.forward = {}  # dtype -> (compiled forward, compile seconds)
    self.flops = None  # (forward, step, dtype counted in)

  def config(self, dtype):
    return make_config(self.name, dtype, self.batch, self.args.tiny)

  def our_model(self, dtype) -> Ours:
    if dtype not in self.ours:
      self.ours[dtype] = Ours(self, self.config(dtype))
    return self.ours[dtype]


def warm(c: Contestant, phase: str, calls: int):
  c.mode(phase)
  fn = getattr(c, phase)
  outs = []
  for _ in range(calls):
    outs.append(fn())
  c.sync(outs[-1])
  return outs


def check_job(ctx, case: Case) -> dict:
  """Outputs of one forward, ours against torch (eager NCHW, float32) on the same weights."""
  ours = case.our_model("float32")
  fwd, compile_s = ours.compile_forward()
  case.forward["float32"] = (fwd, compile_s)
  ours_default = np.asarray(fwd(ours.params, ours.z, ours.y))
  gpu = ctx.device is not None and ctx.device.type == "cuda"
  if gpu:
    fwd_highest, _ = ours.compile_forward("highest")
    ours_highest = np.asarray(fwd_highest(ours.params, ours.z, ours.y))
  else:  # XLA:CPU computes float32 matmuls in float32 at every precision
    ours_highest = ours_default
  run = TorchRun(case, "float32", channels_last=False)
  run.mode("forward")
  try:
    set_tf32(False)
    strict = run.output_nhwc(run.forward())
    set_tf32(True)
    tf32 = run.output_nhwc(run.forward())
  finally:
    set_tf32(True)
    run.close()
  exact = relative_diff(ours_highest, strict)
  result = {"config": case.name, "batch": case.batch, "params": case.n_params,
            "float32": exact, "tf32": relative_diff(ours_default, tf32),
            "tolerance": CHECK_TOLERANCE,
            "equal": bool(exact["finite"] and exact["max_rel"] <= CHECK_TOLERANCE),
            "output_max_abs": float(np.max(np.abs(strict))), **ours.info}
  result["tf32_within_tolerance"] = bool(result["tf32"]["max_rel"] <= CHECK_TOLERANCE)
  return result


def model_job(ctx, case: Case, dtype: str) -> list:
  """Ours against torch eager (NCHW and channels_last) at `dtype`: rows for the table."""
  ours = case.our_model(dtype)
  if dtype == "float32" and "float32" in case.forward:
    fwd, compile_fwd = case.forward["float32"]
  else:
    fwd, compile_fwd = ours.compile_forward()
    case.forward[dtype] = (fwd, compile_fwd)
  step, compile_step = ours.compile_step()
  if case.flops is None:  # the network's arithmetic: the same program in either dtype
    case.flops = ours.flops() + (dtype,)
  fwd_flop, step_flop, counted_in = case.flops
  mine = ours.contestant(fwd, step)
  case.ours_out[dtype] = np.asarray(warm(mine, "forward", 2)[0])
  losses = {"ours": [float(l) for l in warm(mine, "step", 3)][:2]}
  case.contestants[dtype] = mine
  rows = [{"impl": "ours", "compile_forward_s": compile_fwd, "compile_step_s": compile_step,
           "peak_mib": plan_mib(step.memory_analysis()), "peak_source": "XLA memory plan",
           "allocator_peak_mib_so_far": allocator_peak_mib(), **ours.info}]
  contestants, runs = [mine], []
  try:
    for channels_last in (False, True) if ctx.device is not None else ():
      run = TorchRun(case, dtype, channels_last)
      runs.append(run)
      c = run.contestant()
      out = warm(c, "forward", 3)[0]
      losses[run.name] = [float(l) for l in warm(c, "step", 3)][:2]
      rows.append({"impl": run.name, "peak_mib": run.peak_mib(),
                   "peak_source": "torch.cuda.max_memory_allocated (own)",
                   "max_rel_diff_vs_ours": relative_diff(case.ours_out[dtype],
                                                         run.output_nhwc(out))["max_rel"]})
      contestants.append(c)
    timed(ctx, contestants, rows)
  finally:
    for run in runs:
      run.close()
  for row in rows:
    row.update(config=case.name, batch=case.batch, dtype=dtype, forward_gflop=fwd_flop / 1e9,
               step_gflop=step_flop / 1e9, flops_counted_in=counted_in,
               first_losses=losses.get(row["impl"]))
    set_rates(row, ctx.rates)
  case.ours_rows[dtype] = rows[0]
  return rows


def compile_job(ctx, case: Case, dtype: str) -> list:
  """torch.compile (channels_last) at `dtype`, stopped when the budget runs out; timed in the
  same rounds as ours again when ours ran at this dtype."""
  args = ctx.args
  run = None
  suffix = f" ({args.compile_time_conv} TimeConv)" if args.compile_time_conv != "fft" else ""
  row = {"impl": "torch.compile channels_last" + suffix,
         "compile_mode": args.compile_mode or "default", "config": case.name,
         "batch": case.batch, "dtype": dtype}
  try:
    start = time.perf_counter()
    limit = None if args.tiny else max(min(ctx.remaining() - 5, args.compile_cap_s), 1.0)
    with deadline(limit):
      run = TorchRun(case, dtype, channels_last=True, compiled=True,
                     compile_mode=args.compile_mode, time_conv=args.compile_time_conv)
      c = run.contestant()
      out = warm(c, "forward", 3)[0]
      warm(c, "step", 3)
    row["compile_s"] = time.perf_counter() - start
    row.update(peak_mib=run.peak_mib(), peak_source="torch.cuda.max_memory_allocated (own)")
    if dtype in case.ours_out:
      row["max_rel_diff_vs_ours"] = relative_diff(case.ours_out[dtype],
                                                  run.output_nhwc(out))["max_rel"]
    mine = case.contestants.get(dtype)
    if mine is not None:
      again = {"impl": "ours"}
      timed(ctx, [mine, c], [again, row])
      row["ours_same_rounds_ms"] = {"forward": again["forward_ms"], "step": again["step_ms"]}
    else:
      timed(ctx, [c], [row])
  except Exception as e:  # noqa: BLE001 -- report and go on: a failed compile is a result
    row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    row["traceback_tail"] = traceback.format_exc()[-3000:]
    with contextlib.suppress(Exception):
      torch._dynamo.reset()
  finally:
    if run is not None:
      run.close()
  if case.flops is not None:
    row.update(forward_gflop=case.flops[0] / 1e9, step_gflop=case.flops[1] / 1e9,
               flops_counted_in=case.flops[2])
    set_rates(row, ctx.rates)
  return [row]


def timed(ctx, contestants, rows):
  """Forward and step medians of `contestants` into the matching `rows` (same order)."""
  args = ctx.args
  fwd = time_rounds(contestants, "forward", args.repeats, args.iters)
  step = time_rounds(contestants, "step", args.repeats, args.iters)
  for c, row in zip(contestants, rows):
    row.update(forward_ms=1e3 * fwd[c.name], step_ms=1e3 * step[c.name])


def set_rates(row: dict, rates: dict):
  if "forward_ms" not in row or "forward_gflop" not in row:
    return
  b = row["batch"]
  row["images_per_s"] = b / (row["forward_ms"] / 1e3)
  row["examples_per_s"] = b / (row["step_ms"] / 1e3)
  row["forward_tflops"] = row["forward_gflop"] / row["forward_ms"]
  row["step_tflops"] = row["step_gflop"] / row["step_ms"]
  bf16 = rates.get("jax_bfloat16")
  if bf16:
    row["mfu_bf16_matmul"] = row["step_tflops"] / bf16
    row["forward_mfu_bf16_matmul"] = row["forward_tflops"] / bf16
  tf32 = rates.get("jax_float32_default")
  if tf32 and row["dtype"] == "float32":
    row["step_fraction_of_float32_matmul"] = row["step_tflops"] / tf32


# --- Inception -------------------------------------------------------------------------------

def torch_inception(inception, params, device):
  """pytorch-fid's InceptionV3([3]) (resize and normalisation on) with our Inception weights."""
  import pytorch_fid.inception as pfi  # noqa: PLC0415
  net = tr.fid_inception_v3_random(pfi)
  state = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    value = np.asarray(value, np.float32)
    state[inception.torch_name(path)] = torch.from_numpy(
        value.transpose(3, 2, 0, 1).copy() if value.ndim == 4 else value)
  missing, unexpected = net.load_state_dict(state, strict=False)
  missing = [m for m in missing if not m.startswith("fc.") and "num_batches_tracked" not in m]
  if missing or unexpected:
    raise ValueError(f"Inception weights do not fit: missing {missing}, unexpected {unexpected}")
  with unittest.mock.patch.object(pfi, "fid_inception_v3", lambda: net):
    model = pfi.InceptionV3([3])
  return model.to(device).eval()


def inception_job(ctx) -> list:
  args = ctx.args
  inception = import_inception()
  b = args.inception_batch
  params = inception.init_params(0)
  images = np.random.default_rng(2).integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
  dev_params, dev_images = jax.device_put(params), jax.device_put(images)
  gpu = ctx.device is not None and ctx.device.type == "cuda"
  contestants, rows, outputs = [], [], {}
  for precision in ("highest", None) if gpu else ("highest",):
    name = f"ours ({precision or 'default'} precision)"
    fn = lambda p=precision: inception.inception_features(dev_params, dev_images, precision=p)
    start = time.perf_counter()
    outputs[name] = np.asarray(fn())
    rows.append({"impl": name, "compile_s": time.perf_counter() - start})
    contestants.append(Contestant(name, fn, fn, jax.block_until_ready))
  reference = outputs["ours (highest precision)"]
  if ctx.device is not None:
    try:
      model = torch_inception(inception, params, ctx.device)
      x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).to(ctx.device)
      for tf32 in (True, False) if gpu else (False,):
        name = f"pytorch-fid InceptionV3([3]) (TF32 {'on' if tf32 else 'off'})"

        def fn(tf32=tf32):
          set_tf32(tf32)
          with torch.no_grad():
            return model(x)[0]

        out = fn()
        ctx_sync = torch_sync(ctx.device)
        ctx_sync()
        set_tf32(True)
        outputs[name] = out[:, :, 0, 0].float().cpu().numpy()
        rows.append({"impl": name})
        contestants.append(Contestant(name, fn, fn, ctx_sync))
    except Exception as e:  # noqa: BLE001
      rows.append({"impl": "pytorch-fid InceptionV3([3])",
                   "error": f"{type(e).__name__}: {str(e)[:1000]}"})
  try:
    times = time_rounds(contestants, "forward", args.repeats, max(1, args.iters // 2))
  finally:
    set_tf32(True)
  for row in rows:
    if row["impl"] in times:
      row.update(batch=b, batch_ms=1e3 * times[row["impl"]],
                 images_per_s=b / times[row["impl"]],
                 max_rel_diff_vs_ours_highest=relative_diff(outputs[row["impl"]],
                                                            reference)["max_rel"])
  return rows


# --- running it all --------------------------------------------------------------------------

class Context:
  def __init__(self, args, device):
    self.args, self.device = args, device
    self.start = START if args.budget_from_import else time.perf_counter()
    self.rates = {}
    self.cases = {}

  def elapsed(self):
    return time.perf_counter() - self.start

  def remaining(self):
    return self.args.budget_s - self.elapsed()

  def case(self, name):
    if name not in self.cases:
      self.cases[name] = Case(name, self.args, self.device)
    return self.cases[name]


def jobs(args, device):
  """(description, estimate key, kind, thunk(ctx)) in priority order: the first config's check,
  float32 and bfloat16; Inception; torch.compile of the first config in bfloat16; the other
  configs; the other torch.compile runs."""
  compile_on = "compile" in args.sections and device is not None and (
      args.torch_compile == "on" or (args.torch_compile == "auto" and device.type == "cuda"))
  out, later = [], []
  for i, name in enumerate(args.configs):
    if "models" in args.sections:
      if device is not None:
        out.append((f"{name}: outputs equal (ours vs torch, float32)", (name, "check"), "check",
                    lambda ctx, n=name: check_job(ctx, ctx.case(n))))
      order = sorted(args.dtypes, key=lambda d: (d != "float32") if i == 0 else (d != "bfloat16"))
      for dtype in order:
        out.append((f"{name} {dtype}: ours vs torch eager", (name, dtype), "rows",
                    lambda ctx, n=name, d=dtype: model_job(ctx, ctx.case(n), d)))
    if i == 0 and "inception" in args.sections:
      out.append(("inception: ours vs pytorch-fid", "inception", "inception", inception_job))
    if compile_on:
      for dtype in sorted(args.dtypes, key=lambda d: d != "bfloat16"):
        job = (f"{name} {dtype}: torch.compile", (name, "compile"), "rows",
               lambda ctx, n=name, d=dtype: compile_job(ctx, ctx.case(n), d))
        (out if i == 0 and dtype == "bfloat16" else later).append(job)
  if not args.configs and "inception" in args.sections:
    out.append(("inception: ours vs pytorch-fid", "inception", "inception", inception_job))
  return out + later


def estimate(key, args) -> float:
  if args.tiny:
    return 1.0
  if isinstance(key, tuple) and key[1] == "check":
    return 30.0 if key[0] == "cifar10" else 20.0
  return float(ESTIMATE_S.get(key, 60))


def run(args) -> dict:
  device, why_not = torch_device(jax.default_backend())
  if not args.matmul_n:
    args.matmul_n = 2048 if jax.default_backend() == "cpu" else 8192
  if device is not None and device.type == "cpu":
    torch.set_num_threads(args.threads)
  if device is not None and device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    set_tf32(True)
  ctx = Context(args, device)
  result = {"args": vars(args), "env": environment(), "targets": TARGETS,
            "check_tolerance": CHECK_TOLERANCE, "torch_device": str(device), "checks": [],
            "rows": [], "inception": [], "skipped": [], "errors": []}
  if why_not:
    result["errors"].append(f"torch not measured: {why_not}")

  def save():
    result["total_s"] = ctx.elapsed()
    summarise(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1, default=str)

  print(f"[{ctx.elapsed():.0f}s] matmul rates", flush=True)
  try:
    ctx.rates = result["matmul_tflops"] = matmul_rates(args.matmul_n, device, args.repeats,
                                                       args.iters)
    print(f"matmul TFLOP/s: {ctx.rates}", flush=True)
  except Exception as e:  # noqa: BLE001
    result["errors"].append(f"matmul rates: {type(e).__name__}: {e}")
  save()
  for what, key, kind, thunk in jobs(args, device):
    need = MIN_COMPILE_S if (isinstance(key, tuple) and key[1] == "compile"
                             and not args.tiny) else estimate(key, args)
    if ctx.elapsed() + need > args.budget_s:
      result["skipped"].append(f"{what} (budget: {ctx.elapsed():.0f} s spent + ~{need:.0f} s "
                               f"> {args.budget_s:.0f} s)")
      print(f"[{ctx.elapsed():.0f}s] SKIPPED {what}: time budget", flush=True)
      continue
    print(f"[{ctx.elapsed():.0f}s] {what}", flush=True)
    start = time.perf_counter()
    try:
      out = thunk(ctx)
      if kind == "check":
        result["checks"].append(out)
        print(f"  max rel diff float32 {out['float32']['max_rel']:.2e}, TF32 "
              f"{out['tf32']['max_rel']:.2e}: {'EQUAL' if out['equal'] else 'NOT EQUAL'}",
              flush=True)
      elif kind == "rows":
        result["rows"].extend(out)
        for r in out:
          print("  " + row_line(r), flush=True)
      else:
        result["inception"].extend(out)
    except Exception as e:  # noqa: BLE001 -- one failed job must not lose the others
      result["errors"].append(f"{what}: {type(e).__name__}: {str(e)[:2000]}")
      print(f"FAILED {what}: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}",
            flush=True)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    save()
  save()
  return result


def summarise(result: dict):
  """Per (config, dtype): ours against torch's best, and the issue's targets."""
  groups = {}
  for r in result["rows"]:
    groups.setdefault((r["config"], r["dtype"]), []).append(r)
  summary = []
  for (config, dtype), rows in groups.items():
    ours = next((r for r in rows if r["impl"] == "ours" and "step_ms" in r), None)
    theirs = [r for r in rows if r["impl"] != "ours" and "step_ms" in r and "error" not in r]
    if not ours or not theirs:
      continue
    best_step = min(theirs, key=lambda r: r["step_ms"])
    best_fwd = min(theirs, key=lambda r: r["forward_ms"])
    s = {"config": config, "dtype": dtype, "ours_step_ms": ours["step_ms"],
         "torch_best_step_ms": best_step["step_ms"], "torch_best_step_impl": best_step["impl"],
         "step_speedup": best_step["step_ms"] / ours["step_ms"],
         "ours_images_per_s": ours["images_per_s"],
         "torch_best_images_per_s": best_fwd["images_per_s"],
         "torch_best_forward_impl": best_fwd["impl"],
         "sampling_speedup": ours["images_per_s"] / best_fwd["images_per_s"],
         "ours_mfu_bf16_matmul": ours.get("mfu_bf16_matmul"),
         "torch_compared": sorted(r["impl"] for r in theirs)}
    if dtype == "bfloat16":
      s["targets_met"] = {
          "step_1.3x_torch_best": s["step_speedup"] >= TARGETS["step_speedup"],
          "step_40%_bf16_matmul": (s["ours_mfu_bf16_matmul"] or 0) >= TARGETS["mfu"],
          "sampling_1.3x_torch_best": s["sampling_speedup"] >= TARGETS["sampling_speedup"]}
    summary.append(s)
  result["summary"] = summary


def fmt(x, spec=".2f", missing="-"):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return missing
  return format(x, spec)


def row_line(r: dict) -> str:
  if "error" in r:
    return f"{r['config']} {r['dtype']} {r['impl']}: FAILED {r['error'][:300]}"
  return (f"{r['config']} b{r['batch']} {r['dtype']} {r['impl']}: forward "
          f"{fmt(r.get('forward_ms'))} ms ({fmt(r.get('images_per_s'), '.0f')} img/s), step "
          f"{fmt(r.get('step_ms'))} ms, MFU {fmt(r.get('mfu_bf16_matmul'), '.1%')}, peak "
          f"{fmt(r.get('peak_mib'), '.0f')} MiB")


def print_tables(result: dict):
  env, rates = result["env"], result.get("matmul_tflops", {})
  print(f"\n{env.get('gpu_name') or env['device_kind']} ({env['backend']}; driver "
        f"{env.get('driver', '-')}; jax {env['jax']}, jaxlib {env['jaxlib']}, torch "
        f"{env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env.get('torch_cudnn', '-')})); "
        f"torch on {result['torch_device']}")
  if rates:
    print(f"matmul {rates['n']}^3 TFLOP/s: JAX bfloat16 {fmt(rates.get('jax_bfloat16'), '.1f')}, "
          f"float32 default {fmt(rates.get('jax_float32_default'), '.1f')}; torch bfloat16 "
          f"{fmt(rates.get('torch_bfloat16'), '.1f')}, float32 TF32 "
          f"{fmt(rates.get('torch_float32_tf32'), '.1f')}")
  if result["checks"]:
    print("\n| config | params | ours 'highest' vs torch TF32 off: max rel (rel L2) | "
          "default (TF32) both: max rel (rel L2) | equal (<= 1e-3) |")
    print("|---|---|---|---|---|")
    for c in result["checks"]:
      print(f"| {c['config']} b{c['batch']} | {c['params']:,} | {c['float32']['max_rel']:.2e} "
            f"({c['float32']['rel_l2']:.2e}) | {c['tf32']['max_rel']:.2e} "
            f"({c['tf32']['rel_l2']:.2e}) | {'yes' if c['equal'] else 'NO'} |")
  if result["rows"]:
    print("\n| config | dtype | implementation | fwd ms | img/s | step ms | ex/s | step TFLOP/s | "
          "MFU (bf16 mm) | peak MiB | compile s | max rel diff vs ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
      if "error" in r:
        print(f"| {r['config']} b{r['batch']} | {r['dtype']} | {r['impl']} | failed: "
              f"{r['error'][:120]} | | | | | | | | |")
        continue
      compile_s = r.get("compile_s", None)
      if r["impl"] == "ours":
        compile_s = r.get("compile_forward_s", 0) + r.get("compile_step_s", 0)
      print(f"| {r['config']} b{r['batch']} | {r['dtype']} | {r['impl']} | "
            f"{fmt(r.get('forward_ms'))} | {fmt(r.get('images_per_s'), '.0f')} | "
            f"{fmt(r.get('step_ms'))} | {fmt(r.get('examples_per_s'), '.0f')} | "
            f"{fmt(r.get('step_tflops'), '.1f')} | {fmt(r.get('mfu_bf16_matmul'), '.1%')} | "
            f"{fmt(r.get('peak_mib'), '.0f')} | {fmt(compile_s, '.0f')} | "
            f"{fmt(r.get('max_rel_diff_vs_ours'), '.1e')} |")
  if result.get("summary"):
    print("\n| config | dtype | ours step ms | torch best step ms (which) | step speed-up | "
          "ours img/s | torch best img/s | sampling speed-up | ours MFU | targets (1.3x, 40%, "
          "1.3x) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in result["summary"]:
      met = s.get("targets_met")
      met = ", ".join("met" if v else "NOT met" for v in met.values()) if met else "-"
      print(f"| {s['config']} | {s['dtype']} | {s['ours_step_ms']:.2f} | "
            f"{s['torch_best_step_ms']:.2f} ({s['torch_best_step_impl']}) | "
            f"{s['step_speedup']:.2f}x | {s['ours_images_per_s']:.0f} | "
            f"{s['torch_best_images_per_s']:.0f} | {s['sampling_speedup']:.2f}x | "
            f"{fmt(s['ours_mfu_bf16_matmul'], '.1%')} | {met} |")
  if result["inception"]:
    print("\n| Inception-v3 pool3 | batch | ms/batch | images/s | compile s | max rel diff vs ours "
          "highest |")
    print("|---|---|---|---|---|---|")
    for r in result["inception"]:
      if "error" in r:
        print(f"| {r['impl']} | failed: {r['error'][:120]} | | | | |")
        continue
      print(f"| {r['impl']} | {r.get('batch', '-')} | {fmt(r.get('batch_ms'))} | "
            f"{fmt(r.get('images_per_s'), '.0f')} | {fmt(r.get('compile_s'), '.0f')} | "
            f"{fmt(r.get('max_rel_diff_vs_ours_highest'), '.1e')} |")
  if result["skipped"]:
    print("\nskipped (time budget):\n  " + "\n  ".join(result["skipped"]))
  if result["errors"]:
    print("\nfailed:\n  " + "\n  ".join(e[:500] for e in result["errors"]))
  print(f"\ntotal {result['total_s']:.0f} s")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "gpu_vs_torch.json"), help="JSON file")
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="start no job that would end after this many seconds (counted "
                      "from the start of the process)")
  parser.add_argument("--compile-cap-s", type=float, default=180.0,
                      help="stop one torch.compile (warm-up included) after this long")
  parser.add_argument("--configs", default="cifar10,bench")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--cifar10-batch", type=int, default=32)
  parser.add_argument("--bench-batch", type=int, default=0, help="0: the config's (8)")
  parser.add_argument("--inception-batch", type=int, default=250)
  parser.add_argument("--repeats", type=int, default=5, help="timing rounds (median)")
  parser.add_argument("--iters", type=int, default=5, help="back-to-back calls per round")
  parser.add_argument("--matmul-n", type=int, default=0, help="0: 8192 on GPUs, 2048 on CPUs")
  parser.add_argument("--torch-compile", default="auto", choices=("auto", "on", "off"),
                      help="auto: on CUDA only")
  parser.add_argument("--compile-mode", default="default",
                      help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
  parser.add_argument("--compile-time-conv", default="dft", choices=("fft", "dft"),
                      help="torch.compile's TimeConv formulation (inductor has no complex "
                      "code generation; eager runs use fft)")
  parser.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny configs, batch 2, one round: a CPU smoke run for the tests")
  args = parser.parse_args(argv)
  args.budget_from_import = argv is None  # run as a script (not from the tests)
  args.configs = [c for c in args.configs.split(",") if c]
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  args.sections = [s for s in args.sections.split(",") if s]
  for c in args.configs:
    if c not in ("cifar10", "bench"):
      parser.error(f"--configs: {c!r} is not cifar10 or bench")
  for d in args.dtypes:
    if d not in ("float32", "bfloat16"):
      parser.error(f"--dtypes: {d!r} is not float32 or bfloat16")
  for s in args.sections:
    if s not in SECTIONS:
      parser.error(f"--sections: {s!r} is not one of {SECTIONS}")
  if args.tiny:
    args.repeats, args.iters = min(args.repeats, 1), min(args.iters, 1)
    args.matmul_n = 256
    args.inception_batch = 1
    args.cifar10_batch = min(args.cifar10_batch, 2)
    args.bench_batch = min(args.bench_batch, 2) if args.bench_batch else 2
    if args.compile_mode == "default":
      args.compile_mode = None
  if args.compile_mode == "default":
    args.compile_mode = None
  return args


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  print_tables(result)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
