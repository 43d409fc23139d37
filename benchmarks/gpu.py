"""Issue 8's benchmarks on one accelerator: float32 and bfloat16, TFLOP/s against the card, a profile.

One process, sections in this order, each skipped once `--budget-s` seconds have passed (a
lent GPU is held for minutes only), the JSON rewritten after every section:
  (always)   the card's matmul rate (8192^3): float32 at 'highest' precision (true f32),
             float32 at JAX's default precision (TF32 matrix units on NVIDIA), bfloat16;
  bench      the bench config (benchmarks/model_throughput.py) at `--bench-batch` per dtype:
             forward, train step (forward, backward, Adam), XLA's FLOPs, TFLOP/s and the
             fraction of the matching matmul peak; the float32 run also samples one-step
             DSNO against teacher DDIM at 8, 16, 64 NFE (images/s, the paper's ratio);
  student    the `--student-config` architecture (default configs/cifar10.py: ch 256, 65.8M
             parameters) at `--student-batch` per device (32: the paper's batch 256 on 8
             devices), float32 and bfloat16, with XLA's memory plan of the compiled step and
             the allocator's peak; the float32 step is profiled (jax.profiler, Perfetto trace
             summed by kernel and by kind of kernel);
  remat      the same student, float32, with nn.remat on every block: step time and memory;
  memory     compile only (nothing runs): XLA's memory plan of the `--memory-config` train step
             (default configs/imagenet64.py) at `--memory-batch` (32) per device, float32,
             without and with remat: what one accelerator needs for the paper's per-device batch;
  variants   the bench config at `--variants-batch` with each of the CPU fast paths alone,
             against plain XLA (on accelerators the package keeps XLA's convolution and FFT
             TimeConv: dsno_jax/backend.py; this checks that the CPU ones would not pay).

  python benchmarks/gpu.py [--out DIR] [--budget-s 420] [--repeats 20]
      [--sections bench,student,remat,memory,variants] [--student-config cifar10]
      [--student-batch 32] [--student-variant plain] [--dtypes float32,bfloat16]
  python benchmarks/gpu.py --recount benchmarks/h200/gpu.json --out DIR   (FLOPs only, any host)
On a CPU the student section profiles XLA:CPU's ops instead of kernels; where the bench train
step's time goes on the CPU, with the formulations the package builds there:
  python benchmarks/gpu.py --sections student --student-config bench --student-batch 8
      --student-variant fused_norm+dft --dtypes float32 --matmul-n 2048 --repeats 3
      --profile-steps 1 --out benchmarks/results
The parameters are random and the loss is a mean squared error against random targets: the
compute of the network, not of the paper's VGG loss.
"""
import argparse
import functools
import glob
import gzip
import importlib
import json
import os
import shutil
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import model_throughput as mt  # noqa: E402

SECTIONS = ("bench", "student", "remat", "memory", "variants")
# Kernel name fragments -> kind, first match wins (cuDNN/cuBLAS/CUTLASS and XLA's own names).
KERNEL_KINDS = (
    # XLA:CPU with YNNPACK fusions (dsno_jax/backend.py): convolutions, dots and reductions
    # run inside "ynn_fusion.N"; "transpose_copy_fusion.N" are layout changes.
    ("YNNPACK fusion (convolution, matmul, reduction)", ("ynn_fusion",)),
    ("convolution", ("convolution", "convolve", "conv2d", "implicit", "dgrad", "wgrad", "fprop",
                     "cudnn", "winograd")),
    ("matmul", ("gemm", "cublas", "cutlass", "xmma", "gemv", "triton_gemm", "dot")),
    ("fft", ("fft",)),
    ("reduction", ("reduce", "reduction")),
    ("copy/transpose", ("memcpy", "memset", "copy", "transpose")),
    ("elementwise fusion", ("fusion", "loop_", "elementwise")),
)


def matmul_peaks(repeats: int, n: int) -> dict:
  """TFLOP/s of an n^3 matmul: float32 'highest', float32 default precision, bfloat16."""
  rng = np.random.default_rng(0)
  a32 = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  out = {}
  for name, x, precision in (("float32_highest", a32, "highest"),
                             ("float32_default", a32, None),
                             ("bfloat16", a32.astype(jnp.bfloat16), None)):
    mm = jax.jit(lambda x, p=precision: jnp.matmul(x, x, precision=p))
    seconds = mt.median_seconds(lambda: mm(x).block_until_ready(), repeats)
    out[name] = 2.0 * n ** 3 / seconds / 1e12
  return out


def peak_for(dtype: str, peaks: dict) -> float:
  """The matmul rate a model in `dtype` can reach at JAX's default precision, TFLOP/s."""
  return peaks["bfloat16" if dtype == "bfloat16" else "float32_default"]


def speed_row(label: str, config, dtype: str, variant: str, *, repeats: int, peaks: dict,
              keep_step: bool = False) -> dict:
  row = mt.student_speed(dtype, variant, repeats, 1e3 * peak_for(dtype, peaks), config,
                         keep_step)
  row["label"], row["config"] = label, label.split()[0]
  row["allocator_peak_mib"] = allocator_peak_mib()
  return row


def recount(path: str, out: str) -> dict:
  """Recount the FLOPs of the rows of an earlier gpu.json by lowering each program here.

  For runs made before the FLOPs came from the lowered programs (the first H200 run took them
  from XLA:GPU's compiled cost analysis, which counts cuDNN convolutions as zero)."""
  with open(path) as f:
    result = json.load(f)
  for row in result["rows"]:
    name = row.get("config") or row["label"].split()[0]
    base = None if name == "bench" else student_config(name)
    config = mt.bench_config(row["dtype"], row["variant"], base, row["batch"])
    fwd, step = mt.model_flops(mt.student_programs(config, row["variant"]))
    row["forward_gflop"], row["train_step_gflop"] = fwd / 1e9, step / 1e9
    row["flops_recounted_on"] = jax.default_backend()
    mt.set_rates(row, 1e3 * peak_for(row["dtype"], result["peak_tflops"]))
  with open(os.path.join(out, "gpu.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  return result


def memory_plan(name: str, batch: int, variant: str, **_) -> dict:
  """XLA's memory plan of the float32 train step of configs/<name> at `batch`; nothing runs."""
  config = mt.bench_config("float32", variant, student_config(name), batch)
  prog = mt.student_programs(config, variant)
  start = time.perf_counter()
  memory = prog["step"].lower(prog["params"], prog["opt_state"]).compile().memory_analysis()
  gib = lambda b: b / 2 ** 30
  return {"config": name, "batch": batch, "variant": variant, "dtype": "float32",
          "compile_s": time.perf_counter() - start,
          "args_gib": gib(memory.argument_size_in_bytes), "temp_gib": gib(memory.temp_size_in_bytes),
          "output_gib": gib(memory.output_size_in_bytes),
          "alias_gib": gib(memory.alias_size_in_bytes), "peak_gib": mt.peak_mib(memory) / 1024}


def student_config(name: str):
  return importlib.import_module(f"configs.{name}").get_config()


def allocator_peak_mib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2 ** 20


def profile(compiled_step, state, steps: int, log_dir: str) -> dict:
  """Trace `steps` train steps; device time by kernel and by kind, from the Perfetto trace."""
  for _ in range(2):
    state[0], state[1], loss = compiled_step(*state)
  loss.block_until_ready()
  start = time.perf_counter()
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(steps):
      state[0], state[1], loss = compiled_step(*state)
    loss.block_until_ready()
  wall = time.perf_counter() - start
  paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    return {"error": f"no perfetto_trace.json.gz under {log_dir}"}
  summary = summarise_trace(paths[-1], steps)
  summary["traced_wall_s_per_step"] = wall / steps
  summary["trace_file"] = os.path.join(os.path.dirname(log_dir), "perfetto_trace.json.gz")
  shutil.copy(paths[-1], summary["trace_file"])  # where the device tool brings files back
  return summary


DERIVED_LINES = ("xla modules", "xla ops", "steps", "launch stats", "source code",
                 "tensorflow ops", "framework")
# XLA:CPU events that wrap or wait for the ops (they would count the ops' time twice).
CPU_WRAPPERS = ("ThunkExecutor::", "SlinkyThreadPool::", "end: ")


def summarise_trace(path: str, steps: int) -> dict:
  """Per-step time of each kernel in a Perfetto/Chrome trace written by jax.profiler.

  Kernels are the complete events on an accelerator's stream lines ('/device:GPU:0', thread
  'Stream #..'; the profiler's derived lines, XLA Modules/Ops and Steps, repeat them and are
  left out); on a CPU-only trace, the ops on XLA's compute threads (tf_XLAEigen) stand in for
  them, without the executor's wrapping and waiting events."""
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {k: n for k, n in threads.items()
            if "/device:" in procs.get(k[0], "") and "CPU" not in procs[k[0]].upper()}
  tracks = {k for k, n in device.items() if "stream" in n.lower()}
  if not tracks:
    tracks = {k for k, n in device.items() if n.lower() not in DERIVED_LINES}
  cpu = not tracks
  if cpu:
    tracks = {k for k, n in threads.items() if n.startswith("tf_XLAEigen")}
  by_kernel = defaultdict(float)
  for e in events:
    if cpu and e.get("name", "").startswith(CPU_WRAPPERS):
      continue
    if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in tracks:
      by_kernel[e.get("name", "?")] += float(e.get("dur", 0.0)) / 1e3  # us -> ms
  by_kind = defaultdict(float)
  for name, ms in by_kernel.items():
    by_kind[kernel_kind(name)] += ms
  busy = sum(by_kernel.values())
  top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15]
  return {"tracks": sorted(f"{procs.get(p, p)} / {threads[(p, t)]}" for p, t in tracks),
          "kernels": len(by_kernel),
          "device_busy_ms_per_step": busy / steps,
          "by_kind_ms_per_step": {k: v / steps for k, v in
                                  sorted(by_kind.items(), key=lambda kv: -kv[1])},
          "top_kernels_ms_per_step": [(n[:90], ms / steps) for n, ms in top]}


def kernel_kind(name: str) -> str:
  low = name.lower()
  for kind, fragments in KERNEL_KINDS:
    if any(f in low for f in fragments):
      return kind
  return "other"


def jobs(args):
  """(section, description, thunk) in the order they run; a thunk returns a row or None."""
  bench = lambda dtype, variant, batch: mt.bench_config(dtype, variant, batch=batch)
  out = []
  for dtype in ("float32", "bfloat16"):
    out.append(("bench", f"bench b{args.bench_batch} {dtype}", functools.partial(
        speed_row, f"bench b{args.bench_batch}", bench(dtype, "plain", args.bench_batch),
        dtype, "plain")))
  if args.nfes:
    out.append(("bench", "teacher DDIM sampling", None))  # filled in by run (needs the rows)
  student = [(dtype, args.student_variant, "student") for dtype in args.dtypes.split(",")]
  for dtype, variant, section in student + [("float32", "remat", "remat")]:
    label = f"{args.student_config} b{args.student_batch}"
    config = mt.bench_config(dtype, variant, student_config(args.student_config),
                             args.student_batch)
    out.append((section, f"{label} {variant} {dtype}", functools.partial(
        speed_row, label, config, dtype, variant,
        keep_step=section == "student" and dtype == "float32" and args.profile_steps > 0)))
  for variant in ("plain", "remat"):
    out.append(("memory", f"{args.memory_config} b{args.memory_batch} {variant} memory plan",
                functools.partial(memory_plan, args.memory_config, args.memory_batch, variant)))
  for variant in ("plain", "shifted_conv_only", "fused_norm_only", "dft_only"):
    label = f"bench b{args.variants_batch}"
    out.append(("variants", f"{label} {variant}", functools.partial(
        speed_row, label, bench("float32", variant, args.variants_batch), "float32", variant)))
  return [j for j in out if j[0] in args.sections]


def run(args) -> dict:
  start = time.perf_counter()
  elapsed = lambda: time.perf_counter() - start
  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "jax": jax.__version__, "matmul_n": args.matmul_n,
            "rows": [], "skipped": [], "errors": []}
  path = os.path.join(args.out, "gpu.json")

  def save():
    with open(path, "w") as f:
      json.dump(result, f, indent=1, default=str)

  result["peak_tflops"] = matmul_peaks(args.repeats, args.matmul_n)
  print(f"matmul TFLOP/s: {result['peak_tflops']}", flush=True)
  save()
  for section, what, thunk in jobs(args):
    if elapsed() > args.budget_s:
      result["skipped"].append(what)
      continue
    print(f"[{elapsed():.0f}s] {what}", flush=True)
    try:
      if thunk is None:  # one-step DSNO vs teacher DDIM, same config, batch and dtype
        row = next(r for r in result["rows"] if r["label"] == f"bench b{args.bench_batch}")
        config = mt.bench_config(row["dtype"], "plain", batch=args.bench_batch)
        result["sampling"] = {
            "dsno_images_per_s": row["images_per_s"], "dtype": row["dtype"],
            "batch": args.bench_batch, "teacher_ddim": mt.teacher_ddim_speed(
                row["dtype"], "plain", args.nfes, args.repeats, config)}
      else:
        row = thunk(repeats=args.repeats, peaks=result["peak_tflops"])
        if section == "memory":
          result.setdefault("memory_plans", []).append(row)
          print(f"{what}: peak {row['peak_gib']:.2f} GiB", flush=True)
          save()
          continue
        step = row.pop("_step", None)
        result["rows"].append(row)
        print_row(row)
        if step is not None:
          result["profile"] = profile(*step, args.profile_steps,
                                      os.path.join(args.out, "trace"))
        del step
    except Exception as e:  # noqa: BLE001 -- one failed measurement must not lose the rest
      result["errors"].append(f"{what}: {type(e).__name__}: {e}")
      print(f"FAILED {what}: {type(e).__name__}: {e}", flush=True)
    save()
  result["total_s"] = elapsed()
  save()
  return result


def print_row(r: dict):
  print(f"{r['label']} {r['variant']} {r['dtype']}: forward {1e3 * r['forward_s']:.2f} ms, "
        f"step {1e3 * r['train_step_s']:.2f} ms, compile {r['compile_train_step_s']:.1f} s",
        flush=True)


def print_speed_table(rows: list):
  print("| model | variant | dtype | fwd ms | step ms | img/s fwd | fwd TFLOP/s (% peak) | "
        "step TFLOP/s (% peak) | step GFLOP | XLA peak MiB (temp) | allocator peak MiB | "
        "compile step s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['label']} | {r['variant']} | {r['dtype']} | {1e3 * r['forward_s']:.2f} | "
          f"{1e3 * r['train_step_s']:.2f} | {r['images_per_s']:.0f} | "
          f"{r['forward_gflops'] / 1e3:.1f} ({100 * r['forward_peak_fraction']:.0f}%) | "
          f"{r['train_step_gflops'] / 1e3:.1f} ({100 * r['train_step_peak_fraction']:.0f}%) | "
          f"{r['train_step_gflop']:.0f} | {r['train_step_peak_mib']:.0f} "
          f"({r['train_step_temp_mib']:.0f}) | {r['allocator_peak_mib']:.0f} | "
          f"{r['compile_train_step_s']:.1f} |")


def print_tables(result: dict):
  p = result["peak_tflops"]
  print(f"\n{result['device_kind']} ({result['backend']}, jax {result['jax']}): matmul "
        f"{result['matmul_n']}^3 "
        f"TFLOP/s: float32 highest {p['float32_highest']:.1f}, float32 default (TF32) "
        f"{p['float32_default']:.1f}, bfloat16 {p['bfloat16']:.1f}\n")
  if result.get("rows"):
    print_speed_table(result["rows"])
  sampling = result.get("sampling")
  if sampling:
    one = sampling["dsno_images_per_s"]
    print(f"\n| sampler (bench, batch {sampling['batch']}, {sampling['dtype']}) | NFE | "
          "images/s | DSNO speed-up |")
    print("|---|---|---|---|")
    print(f"| DSNO one step | 1 | {one:.0f} | 1.0x |")
    for r in sampling["teacher_ddim"]:
      print(f"| teacher DDIM | {r['nfe']} | {r['images_per_s']:.0f} | "
            f"{one / r['images_per_s']:.1f}x |")
  prof = result.get("profile")
  if prof and prof.get("device_busy_ms_per_step"):
    print(f"\nprofile of the float32 student step ({len(prof['tracks'])} tracks, "
          f"{prof['kernels']} kernels): busy "
          f"{prof['device_busy_ms_per_step']:.2f} ms of {1e3 * prof['traced_wall_s_per_step']:.2f}"
          f" ms wall per step")
    print("| kind of kernel | ms per step | share |")
    print("|---|---|---|")
    for kind, ms in prof["by_kind_ms_per_step"].items():
      print(f"| {kind} | {ms:.2f} | {100 * ms / prof['device_busy_ms_per_step']:.0f}% |")
    print("\n| kernel | ms per step |")
    print("|---|---|")
    for name, ms in prof["top_kernels_ms_per_step"]:
      print(f"| `{name}` | {ms:.3f} |")
  if result.get("memory_plans"):
    print("\n| train step memory plan (float32, per device) | args GiB | temp GiB | peak GiB | "
          "compile s |")
    print("|---|---|---|---|---|")
    for m in result["memory_plans"]:
      print(f"| {m['config']} b{m['batch']} {m['variant']} | {m['args_gib']:.2f} | "
            f"{m['temp_gib']:.2f} | {m['peak_gib']:.2f} | {m['compile_s']:.0f} |")
  if result["skipped"]:
    print(f"\nskipped (time budget): {result['skipped']}")
  if result["errors"]:
    print("\nfailed:\n" + "\n".join(result["errors"]))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.environ.get("OUT") or
                      os.path.join(ROOT, "benchmarks", "results"))
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="start no new section after this many seconds")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--matmul-n", type=int, default=8192)
  parser.add_argument("--bench-batch", type=int, default=8, help="8: the issue's bench batch")
  parser.add_argument("--nfes", default="8,16,64")
  parser.add_argument("--student-config", default="cifar10")
  parser.add_argument("--student-batch", type=int, default=32)
  parser.add_argument("--student-variant", default="plain", choices=sorted(mt.VARIANTS),
                      help="model_throughput.VARIANTS; on GPU/TPU the package builds "
                      "fused_norm_only (plain: flax-style norms, as the recorded H200 runs)")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="of the student section")
  parser.add_argument("--memory-config", default="imagenet64")
  parser.add_argument("--memory-batch", type=int, default=32,
                      help="32: the paper's per-device batch")
  parser.add_argument("--variants-batch", type=int, default=128)
  parser.add_argument("--profile-steps", type=int, default=5)
  parser.add_argument("--recount", metavar="GPU_JSON",
                      help="only recount the FLOPs of an earlier run's rows (no timing)")
  args = parser.parse_args()
  args.sections = args.sections.split(",")
  for s in args.sections:
    if s not in SECTIONS:
      parser.error(f"--sections: {s!r} is not one of {SECTIONS}")
  for d in args.dtypes.split(","):
    if d not in ("float32", "bfloat16"):
      parser.error(f"--dtypes: {d!r} is not float32 or bfloat16")
  args.nfes = [int(n) for n in args.nfes.split(",")] if args.nfes else []
  os.makedirs(args.out, exist_ok=True)
  result = recount(args.recount, args.out) if args.recount else run(args)
  print_tables(result)
  print(f"\nwrote {os.path.join(args.out, 'gpu.json')}")


if __name__ == "__main__":
  main()
