"""One 3x3 convolution: XLA's forward and gradients against a candidate's and PyTorch's.

  python benchmarks/conv.py [--repeats 5] [--out benchmarks/results] [--no-torch]

Part 1 splits a 32x32, 64->64, batch-32 convolution (2.4 GFLOP each way) into forward, input
gradient and kernel gradient, XLA's and the shifted candidate (benchmarks/candidates.py). Part 2
sweeps shapes for forward+backward with each kernel gradient: where, if anywhere, the shifted
one would pay (the models use XLA's, nn.Conv).
Part 3 takes the four convolution shapes of the bench DSNO (batch 8 x K 4 frames = 32 images)
and times each pass in XLA, in PyTorch (oneDNN, 2 threads, in a subprocess after JAX is done)
and, for the forward and forward+backward, as a Winograd F(2x2, 3x3) convolution written in
jnp (`winograd_conv`: 2.25x fewer multiplications, paid for in memory-bound transforms).
Prints tables; writes conv.json. XLA runs with dsno_jax.backend's CPU flag (YNNPACK dots,
which make XLA's kernel gradient fast; importing dsno_jax adds it) unless DSNO_NO_CPU_XLA_FLAGS=1.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsno_jax  # noqa: E402,F401 -- before JAX starts: the XLA:CPU flag, as every run gets
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import candidates  # noqa: E402

MODEL_SHAPES = [(32, 32, 64, 64), (32, 32, 128, 64), (32, 16, 128, 128),
                (32, 8, 256, 256)]  # (batch, pixels square, C in, C out): the bench DSNO's 3x3s
# Winograd F(2, 3): y = A^T [(G k G^T) * (B^T d B)] A on 4x4 input tiles d at stride 2.
WINO_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
WINO_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
WINO_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
SWEEP = [(256, 8, 32), (256, 8, 64), (32, 16, 128), (64, 16, 64), (8, 32, 64), (32, 32, 64),
         (16, 64, 32)]  # (batch, pixels square, channels in = out)


def ms(fn, *args, repeats):
  """Median ms of jit(fn)(*args) after a warm-up call (the compile)."""
  fn = jax.jit(fn)
  return ms_python(lambda: jax.block_until_ready(fn(*args)), repeats)


def _combine(coefficients, terms):
  """sum(c * t) over the nonzero coefficients, as adds XLA fuses (no constant matmul)."""
  out = None
  for c, t in zip(coefficients, terms):
    if c:
      t = t if c == 1 else -t if c == -1 else c * t
      out = t if out is None else out + t
  return out


def winograd_conv(x, kernel):
  """3x3, stride 1, SAME convolution NHWC x HWIO as Winograd F(2x2, 3x3): 16 batched matmuls
  over 2x2 output tiles. A candidate for the CPU measured here, not a model option."""
  n, h, w, _ = x.shape
  th, tw = -(-h // 2), -(-w // 2)
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  rows = [xp[:, d:d + 2 * th - 1:2] for d in range(4)]  # row d of every tile
  v = []
  for r in (_combine(b, rows) for b in WINO_BT):
    cols = [r[:, :, d:d + 2 * tw - 1:2] for d in range(4)]
    v += [_combine(b, cols) for b in WINO_BT]
  v = jnp.stack(v).reshape(16, n * th * tw, -1)
  g = jnp.asarray(WINO_G, x.dtype)
  u = jnp.einsum("ui,vj,ijco->uvco", g, g, kernel).reshape(16, kernel.shape[2], -1)
  m = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, n, th, tw, -1)
  half = [[_combine(a, [m[i, j] for i in range(4)]) for j in range(4)] for a in WINO_AT]
  y = jnp.stack([jnp.stack([_combine(a, half[p]) for a in WINO_AT], axis=3) for p in range(2)],
                axis=2)  # (n, th, 2, tw, 2, o)
  return y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :w]


def torch_passes(repeats: int) -> dict:
  """PyTorch's forward / input gradient / kernel gradient (ms) of MODEL_SHAPES, 2 threads."""
  import torch  # noqa: PLC0415 -- only in the subprocess, after JAX is done
  torch.set_num_threads(2)
  rng = np.random.default_rng(0)
  out = {}
  for n, h, c, o in MODEL_SHAPES:
    x = torch.tensor(rng.standard_normal((n, c, h, h)), dtype=torch.float32)
    w = torch.tensor(0.05 * rng.standard_normal((o, c, 3, 3)), dtype=torch.float32)
    g = torch.tensor(rng.standard_normal((n, o, h, h)), dtype=torch.float32)
    parts = {
        "forward": lambda: torch.nn.functional.conv2d(x, w, padding=1),
        "input gradient": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1),
        "kernel gradient": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1),
    }
    with torch.no_grad():
      out[str((n, h, c, o))] = {k: ms_python(f, repeats) for k, f in parts.items()}
  return out


def ms_python(fn, repeats: int) -> float:
  """Median ms of fn() after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def model_shapes(repeats: int, rng) -> list:
  """XLA's passes and the Winograd candidate on MODEL_SHAPES (ms), with Winograd's error."""
  rows = []
  for n, h, c, o in MODEL_SHAPES:
    x = jnp.asarray(rng.standard_normal((n, h, h, c)), jnp.float32)
    w = jnp.asarray(0.05 * rng.standard_normal((3, 3, c, o)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, h, h, o)), jnp.float32)
    xla = lambda x, w: candidates.conv2d(x, w, impl="xla")
    vjp = lambda f: (lambda x, w, g: jax.vjp(f, x, w)[1](g))
    ref, wino = jax.jit(xla)(x, w), jax.jit(winograd_conv)(x, w)
    rows.append({
        "shape": (n, h, c, o), "gflop": 2 * n * h * h * c * o * 9 / 1e9,
        "forward": ms(xla, x, w, repeats=repeats),
        "input gradient": ms(lambda x, w, g: vjp(xla)(x, w, g)[0], x, w, g, repeats=repeats),
        "kernel gradient": ms(lambda x, w, g: vjp(xla)(x, w, g)[1], x, w, g, repeats=repeats),
        "winograd forward": ms(winograd_conv, x, w, repeats=repeats),
        "winograd backward": ms(vjp(winograd_conv), x, w, g, repeats=repeats),
        "winograd max rel error": float(jnp.max(jnp.abs(wino - ref)) / jnp.max(jnp.abs(ref))),
    })
  return rows


def print_model_shapes(rows: list, torch_ms):
  print("\nthe bench DSNO's 3x3 convolutions, ms (GFLOP/s); torch = PyTorch/oneDNN, 2 threads\n")
  print("| batch, HxW, C->O | GFLOP | forward XLA | torch | input grad XLA | torch | "
        "kernel grad XLA | torch | fwd+bwd XLA / torch | Winograd fwd | Winograd fwd+bwd |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    t = (torch_ms or {}).get(str(tuple(r["shape"])))
    rate = lambda v: f"{v:.1f} ({r['gflop'] / v * 1e3:.0f})"
    cell = lambda k: rate(t[k]) if t else "-"
    xla_all = r["forward"] + r["input gradient"] + r["kernel gradient"]
    ratio = f"{xla_all / sum(t.values()):.2f}" if t else "-"
    n, h, c, o = r["shape"]
    print(f"| {n}, {h}x{h}, {c}->{o} | {r['gflop']:.2f} | {rate(r['forward'])} | "
          f"{cell('forward')} | {rate(r['input gradient'])} | {cell('input gradient')} | "
          f"{rate(r['kernel gradient'])} | {cell('kernel gradient')} | {ratio} | "
          f"{r['winograd forward']:.1f} | "
          f"{r['winograd forward'] + r['winograd backward']:.1f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch's passes")
  parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_worker:  # the subprocess: PyTorch only, JSON on stdout
    print(json.dumps(torch_passes(args.repeats)))
    return
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 32, 32, 64)), jnp.float32)
  w = jnp.asarray(0.05 * rng.standard_normal((3, 3, 64, 64)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((32, 32, 32, 64)), jnp.float32)
  xla = lambda x, w: candidates.conv2d(x, w, impl="xla")
  pads = ((1, 1), (1, 1))
  parts = {
      "forward": ms(xla, x, w, repeats=args.repeats),
      "input gradient (XLA)": ms(lambda x, w, g: jax.vjp(xla, x, w)[1](g)[0], x, w, g,
                                 repeats=args.repeats),
      "kernel gradient (XLA)": ms(lambda x, w, g: jax.vjp(xla, x, w)[1](g)[1], x, w, g,
                                  repeats=args.repeats),
      "kernel gradient (shifted)": ms(
          lambda x, g: candidates.kernel_gradient(x, g, (3, 3), (1, 1), pads), x, g,
          repeats=args.repeats),
  }
  gflop = 2 * 32 * 32 * 32 * 64 * 64 * 9 / 1e9
  print(f"3x3 conv, batch 32, 32x32, 64->64 ({gflop:.1f} GFLOP each)\n")
  print("| part | ms | GFLOP/s |\n|---|---|---|")
  for name, t in parts.items():
    print(f"| {name} | {t:.1f} | {gflop / t * 1e3:.0f} |")
  sweep = []
  for n, h, c in SWEEP:
    x = jnp.asarray(rng.standard_normal((n, h, h, c)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((3, 3, c, c)), jnp.float32)
    row = {"batch": n, "pixels": h, "channels": c}
    for impl in candidates.CONVS:
      grad = jax.grad(lambda x, w, impl=impl: jnp.sum(candidates.conv2d(x, w, impl=impl) ** 2),
                      argnums=(0, 1))
      row[impl] = ms(grad, x, w, repeats=args.repeats)
    row["faster"] = min(candidates.CONVS, key=lambda impl: row[impl])
    sweep.append(row)
  print("\nforward+backward (ms)\n\n| batch | HxW | C | XLA | shifted | faster |\n"
        "|---|---|---|---|---|---|")
  for r in sweep:
    print(f"| {r['batch']} | {r['pixels']}x{r['pixels']} | {r['channels']} | {r['xla']:.1f} | "
          f"{r['shifted']:.1f} | {r['faster']} |")
  shapes = model_shapes(args.repeats, rng)
  torch_ms = None
  if not args.no_torch:
    try:
      done = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-worker",
                             "--repeats", str(args.repeats)], capture_output=True, text=True,
                            check=True, timeout=1800)
      torch_ms = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError,
            IndexError) as e:  # the XLA figures above are still written
      detail = (getattr(e, "stderr", "") or "").strip().splitlines()[-1:]  # its last line
      print(f"PyTorch's passes not measured: {e} {' '.join(detail)}", flush=True)
  print_model_shapes(shapes, torch_ms)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "conv.json")
  with open(path, "w") as f:
    json.dump({"backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "parts_ms": parts, "sweep_ms": sweep, "model_shapes_ms": shapes,
               "torch_model_shapes_ms": torch_ms}, f, indent=1)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
