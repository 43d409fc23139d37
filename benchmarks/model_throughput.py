"""DSNO speed on the bench config: each optimisation against the plain path and PyTorch, in one run.

Measured in one process, one after another (CPU timings drift; only ratios within a run mean
much):
  1. the machine's float32 matmul peak (2048^3, XLA and numpy);
  2. for each model variant (VARIANTS: plain = XLA's convolution gradients, nn.GroupNorm-style
     norms, FFT TimeConv; each fast path alone: the shifted kernel gradient and the plain norm
     of benchmarks/candidates.py against the fused GroupNorm+FiLM+swish, models/norm.py, and
     the DFT-matmul TimeConv, models/time_conv.py; and their combinations, with or without
     nn.remat on every block; fused_norm+dft is what the package builds on a CPU), the
     compile times, the one-step
     forward and the train step (forward, backward, Adam), XLA's FLOP count of each (lowered
     program), the achieved GFLOP/s and its fraction of the matmul peak, and the train step's
     temporary memory (XLA's memory analysis: activations and workspace);
  3. sampling: one-step DSNO images/s against the bench teacher UNet with DDIM at 8, 16, 64
     NFE (the same backbone, random weights, the variant with the fastest forward), as a ratio;
  4. the PyTorch reference of the same network (benchmarks/torch_reference.py), in a
     subprocess after JAX is done, unless --no-torch.

  python benchmarks/model_throughput.py [--dtype float32|bfloat16] [--repeats 5]
      [--variants plain,fused_norm+dft,...] [--nfes 8,16,64] [--no-torch] [--out DIR]
XLA runs with dsno_jax.backend's CPU flag, which importing dsno_jax adds;
DSNO_NO_CPU_XLA_FLAGS=1 measures XLA's default CPU code instead.
"""
import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import dsno_jax  # noqa: E402,F401 -- before JAX starts: the XLA:CPU flag, as every run gets
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import candidates  # noqa: E402
from configs import bench  # noqa: E402
from dsno_jax import diffusion, models, ode  # noqa: E402


class Variant(NamedTuple):
  conv: str  # candidates.CONVS: "xla" (nn.Conv) | "shifted"
  norm: str  # candidates.NORMS: "fused" (models/norm.py) | "plain"
  time_conv: str  # config.model.time_conv_impl: "fft" | "dft"
  remat: bool  # config.model.remat


VARIANTS = {
    "plain": Variant("xla", "plain", "fft", False),
    "fused_norm": Variant("shifted", "fused", "fft", False),  # session 2's "+ fused norm"
    "optimised": Variant("shifted", "fused", "dft", False),
    "optimised+remat": Variant("shifted", "fused", "dft", True),
    # Each fast path alone, and remat alone (for accelerators: benchmarks/gpu.py).
    "shifted_conv_only": Variant("shifted", "plain", "fft", False),
    "fused_norm_only": Variant("xla", "fused", "fft", False),
    "dft_only": Variant("xla", "plain", "dft", False),
    "fused_norm+dft": Variant("xla", "fused", "dft", False),  # what the package builds on CPU
    "remat": Variant("xla", "plain", "fft", True),
}


def formulations(variant: str):
  """The context in which a model is traced to compute as `variant`'s conv and norm."""
  return candidates.formulations(VARIANTS[variant].conv, VARIANTS[variant].norm)


def random_params(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32), shapes)


def median_seconds(fn, repeats):
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def flops_of(program) -> float:
  """XLA's FLOP count of a jax Lowered or Compiled program."""
  cost = program.cost_analysis()
  if not cost:
    raise ValueError(f"XLA gave no cost analysis for {type(program).__name__} on "
                     f"{jax.default_backend()}")
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def matmul_peak(repeats: int) -> dict:
  n = 2048
  a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  x = jnp.asarray(a)
  mm = jax.jit(lambda x: x @ x)
  flop = 2.0 * n ** 3
  xla = flop / median_seconds(lambda: mm(x).block_until_ready(), repeats) / 1e9
  numpy = flop / median_seconds(lambda: a @ a, repeats) / 1e9
  return {"xla_gflops": xla, "numpy_gflops": numpy}


def bench_config(dtype: str, variant: str, config=None, batch: int = 0):
  """`config` (default: the bench config) with the model dtype and the variant's TimeConv and
  remat (its conv and norm are applied when the model is traced: `formulations`)."""
  config = bench.get_config() if config is None else config
  model = config.model
  model.dtype = dtype
  model.time_conv_impl, model.remat = VARIANTS[variant].time_conv, VARIANTS[variant].remat
  if batch:
    config.train.batch_size = batch
  return config


def student_programs(config, variant: str) -> dict:
  """The DSNO of `config` (from bench_config(..., variant, ...)) computed as `variant` on
  random parameters and data: jitted forward and train step (MSE to random targets, Adam;
  parameters and optimiser state donated) and their arguments."""
  model = models.student_from_config(config)
  b, s, c = config.train.batch_size, config.data.image_size, config.data.channels
  k = len(config.trajectory.save_times)
  params = random_params(models.param_shapes(models.init_student, config), 0)
  rng = np.random.default_rng(1)
  noise = jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.float32)
  targets = jnp.asarray(rng.standard_normal((b, k, s, s, c)), jnp.float32)
  logsnr = jnp.asarray(diffusion.save_logsnrs(config))
  classes = config.data.num_classes
  y = jnp.asarray(rng.integers(0, classes, (b,)), jnp.int32) if classes > 1 else None
  opt = optax.adam(2e-4)

  def forward(p, z):
    with formulations(variant):
      return model.apply({"params": p}, z, logsnr, y, train=False)

  def loss_fn(p):
    return jnp.mean((forward(p, noise) - targets) ** 2)

  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, o = opt.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  return {"forward": jax.jit(forward),
          "step": jax.jit(step, donate_argnums=(0, 1)), "params": params,
          "opt_state": opt.init(params), "noise": noise, "batch": b, "K": k}


def model_flops(programs: dict) -> tuple:
  """(forward, train step) FLOPs from XLA's cost analysis of the lowered, unoptimised programs.

  The network's arithmetic, the same on every backend: compiled programs can hide FLOPs (XLA:GPU
  turns convolutions into cuDNN custom calls, which its cost analysis counts as zero)."""
  # Lowered for the CPU: XLA:GPU's cost analysis of an unoptimised program returns nothing.
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  spec = lambda tree: jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), tree)
  params = spec(programs["params"])
  return (flops_of(programs["forward"].lower(params, spec(programs["noise"]))),
          flops_of(programs["step"].lower(params, spec(programs["opt_state"]))))


def student_speed(dtype: str, variant: str, repeats: int, peak: float, config=None,
                  keep_step: bool = False) -> dict:
  """Forward and train-step speed of the DSNO of `bench_config(dtype, variant, config)`.

  With keep_step, the result also holds '_step': (compiled train step, [params, opt_state])
  for a caller that profiles it (not JSON-serialisable: pop it before dumping)."""
  config = bench_config(dtype, variant, config)
  prog = student_programs(config, variant)
  params, noise, b = prog["params"], prog["noise"], prog["batch"]
  fwd_flop, step_flop = model_flops(prog)
  start = time.perf_counter()
  compiled_fwd = prog["forward"].lower(params, noise).compile()
  compile_fwd = time.perf_counter() - start
  start = time.perf_counter()
  compiled_step = prog["step"].lower(params, prog["opt_state"]).compile()
  compile_step = time.perf_counter() - start
  fwd_s = median_seconds(lambda: compiled_fwd(params, noise).block_until_ready(), repeats)
  state = [params, prog["opt_state"]]

  def one_step():
    state[0], state[1], loss = compiled_step(*state)
    loss.block_until_ready()

  step_s = median_seconds(one_step, repeats)
  memory = compiled_step.memory_analysis()
  result = {
      "train_step_temp_mib": memory.temp_size_in_bytes / 2 ** 20 if memory else float("nan"),
      "variant": variant, "dtype": dtype, **VARIANTS[variant]._asdict(),
      "compile_forward_s": compile_fwd, "compile_train_step_s": compile_step,
      "forward_s": fwd_s, "train_step_s": step_s,
      "forward_gflop": fwd_flop / 1e9, "train_step_gflop": step_flop / 1e9,
      "compiled_forward_gflop": flops_of(compiled_fwd) / 1e9,
      "compiled_train_step_gflop": flops_of(compiled_step) / 1e9,
      "images_per_s": b / fwd_s, "batch": b, "K": prog["K"],
      "params": models.count_params(state[0]),
      "train_step_args_mib": memory.argument_size_in_bytes / 2 ** 20 if memory else float("nan"),
      "train_step_peak_mib": peak_mib(memory),
  }
  set_rates(result, peak)
  if keep_step:
    result["_step"] = (compiled_step, state)
  return result


def set_rates(row: dict, peak_gflops: float):
  """GFLOP/s of the row's forward and train step, and their fractions of `peak_gflops`."""
  for what in ("forward", "train_step"):
    row[f"{what}_gflops"] = row[f"{what}_gflop"] / row[f"{what}_s"]
    row[f"{what}_peak_fraction"] = row[f"{what}_gflops"] / peak_gflops


def peak_mib(memory) -> float:
  """XLA's peak estimate of a compiled step: arguments + outputs + temporaries - aliased."""
  if memory is None:
    return float("nan")
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2 ** 20


def teacher_ddim_speed(dtype: str, variant: str, nfes, repeats: int, config=None) -> list:
  """Images/s of the teacher UNet sampling with DDIM at each NFE (batch as DSNO's)."""
  config = bench_config(dtype, variant, config)
  model = models.teacher_from_config(config)
  b, s, c = config.train.batch_size, config.data.image_size, config.data.channels
  params = random_params(models.param_shapes(models.init_teacher, config), 2)
  z1 = jnp.asarray(np.random.default_rng(3).standard_normal((b, s, s, c)), jnp.float32)
  rows = []
  def sample(p, z, nfe):
    with formulations(variant):
      return ode.trajectory(
          diffusion.unet_denoiser(model, p, config.teacher.mean_type, config.teacher.clip_x),
          z, (0.0,), solver="ddim", num_steps=nfe)

  for nfe in nfes:
    sample_nfe = jax.jit(functools.partial(sample, nfe=nfe))
    compiled = sample_nfe.lower(params, z1).compile()
    seconds = median_seconds(lambda: compiled(params, z1).block_until_ready(),
                             max(1, repeats // 2))
    rows.append({"nfe": nfe, "seconds_per_batch": seconds, "images_per_s": b / seconds})
  return rows


def torch_reference(repeats: int, out_dir: str):
  path = os.path.join(out_dir, "torch_reference.json")
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "torch_reference.py"),
         "--repeats", str(repeats), "--out", path]
  try:
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=1800)
  except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as e:
    print(f"PyTorch reference not measured: {e}", flush=True)
    return None
  with open(path) as f:
    return json.load(f)


def print_tables(result: dict):
  peak, rows, ref = result["matmul_peak"], result["variants"], result.get("torch")
  print(f"\nmatmul peak (float32 2048^3): XLA {peak['xla_gflops']:.0f} GFLOP/s, numpy "
        f"{peak['numpy_gflops']:.0f} GFLOP/s; backend {result['backend']}, "
        f"{result['devices']} device(s); XLA_FLAGS={result['xla_flags']!r}\n")
  print("| variant | compile fwd s | compile step s | forward s | train step s | fwd GFLOP | "
        "step GFLOP | fwd GFLOP/s (% peak) | step GFLOP/s (% peak) | step temp MiB | "
        "vs torch fwd | vs torch step |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    vs = lambda ours, key: f"{ref[key] / ours:.2f}x" if ref else "-"
    print(f"| {r['variant']} ({r['dtype']}) | {r['compile_forward_s']:.1f} | "
          f"{r['compile_train_step_s']:.1f} | {r['forward_s']:.3f} | {r['train_step_s']:.3f} | "
          f"{r['forward_gflop']:.1f} | {r['train_step_gflop']:.1f} | "
          f"{r['forward_gflops']:.1f} ({100 * r['forward_peak_fraction']:.0f}%) | "
          f"{r['train_step_gflops']:.1f} ({100 * r['train_step_peak_fraction']:.0f}%) | "
          f"{r['train_step_temp_mib']:.0f} | "
          f"{vs(r['forward_s'], 'forward_s')} | {vs(r['train_step_s'], 'train_step_s')} |")
  if ref:
    print(f"| PyTorch reference ({ref['threads']} threads) | - | - | {ref['forward_s']:.3f} | "
          f"{ref['train_step_s']:.3f} | | | | | | 1.00x | 1.00x |")
  print("\n(vs torch: PyTorch's time / ours, so > 1 is faster than the reference)")
  sampling = result.get("sampling")
  if sampling:
    one = sampling["dsno_images_per_s"]
    print(f"\n| sampler ({sampling['variant']}) | NFE | images/s | DSNO speed-up |")
    print("|---|---|---|---|")
    print(f"| DSNO one step | 1 | {one:.2f} | 1.0x |")
    for r in sampling["teacher_ddim"]:
      print(f"| teacher DDIM | {r['nfe']} | {r['images_per_s']:.3f} | "
            f"{one / r['images_per_s']:.1f}x |")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--variants", default="plain,fused_norm_only,dft_only,fused_norm+dft,"
                      "shifted_conv_only,optimised,optimised+remat")
  parser.add_argument("--nfes", default="8,16,64", help="teacher DDIM NFEs ('' to skip)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  variants = args.variants.split(",")
  for v in variants:
    if v not in VARIANTS:
      parser.error(f"--variants: {v!r} is not one of {sorted(VARIANTS)}")
  peak = matmul_peak(args.repeats)
  result = {"backend": jax.default_backend(), "devices": jax.device_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "matmul_peak": peak, "variants": []}
  for v in variants:
    r = student_speed(args.dtype, v, args.repeats, peak["xla_gflops"])
    result["variants"].append(r)
    print(f"{v}: forward {r['forward_s']:.3f} s, train step {r['train_step_s']:.3f} s",
          flush=True)
  if args.nfes:
    fastest = min(result["variants"], key=lambda r: r["forward_s"])
    best = fastest["variant"]
    nfes = [int(n) for n in args.nfes.split(",")]
    result["sampling"] = {
        "variant": best,
        "dsno_images_per_s": fastest["images_per_s"],
        "teacher_ddim": teacher_ddim_speed(args.dtype, best, nfes, args.repeats)}
  result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  if not args.no_torch and jax.default_backend() == "cpu":
    result["torch"] = torch_reference(args.repeats, args.out)
  print_tables(result)
  path = os.path.join(args.out, f"model_throughput_{args.dtype}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
