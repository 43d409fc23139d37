"""One 3x3 convolution: XLA's forward, input and kernel gradients, and our "shifted" kernel gradient.

  python benchmarks/conv.py [--repeats 5] [--out benchmarks/results]

Part 1 splits a 32x32, 64->64, batch-32 convolution (2.4 GFLOP each way) into forward, input
gradient and kernel gradient, XLA's and ours (dsno_jax/models/conv.py). Part 2 sweeps shapes
for forward+backward with each algorithm: the data behind conv_impl="auto"'s size rule.
Prints tables; writes conv.json. XLA runs with dsno_jax.xla_flags' CPU flags (YNNPACK dots,
which make XLA's kernel gradient fast) unless DSNO_NO_CPU_XLA_FLAGS=1.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsno_jax import xla_flags  # noqa: E402
from dsno_jax.models import conv  # noqa: E402

xla_flags.add_cpu_flags()  # as dsno_jax.main runs; DSNO_NO_CPU_XLA_FLAGS=1 for XLA's defaults

SWEEP = [(256, 8, 32), (256, 8, 64), (32, 16, 128), (64, 16, 64), (8, 32, 64), (32, 32, 64),
         (16, 64, 32)]  # (batch, pixels square, channels in = out)


def ms(fn, *args, repeats):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 32, 32, 64)), jnp.float32)
  w = jnp.asarray(0.05 * rng.standard_normal((3, 3, 64, 64)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((32, 32, 32, 64)), jnp.float32)
  xla = lambda x, w: conv.conv2d(x, w, impl="xla")
  pads = ((1, 1), (1, 1))
  parts = {
      "forward": ms(xla, x, w, repeats=args.repeats),
      "input gradient (XLA)": ms(lambda x, w, g: jax.vjp(xla, x, w)[1](g)[0], x, w, g,
                                 repeats=args.repeats),
      "kernel gradient (XLA)": ms(lambda x, w, g: jax.vjp(xla, x, w)[1](g)[1], x, w, g,
                                  repeats=args.repeats),
      "kernel gradient (shifted)": ms(
          lambda x, g: conv.kernel_gradient(x, g, (3, 3), (1, 1), pads), x, g,
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
    for impl in ("xla", "shifted"):
      grad = jax.grad(lambda x, w, impl=impl: jnp.sum(conv.conv2d(x, w, impl=impl) ** 2),
                      argnums=(0, 1))
      row[impl] = ms(grad, x, w, repeats=args.repeats)
    row["auto"] = conv.resolve_impl("auto", (h, h))
    sweep.append(row)
  print("\nforward+backward (ms)\n\n| batch | HxW | C | XLA | shifted | auto picks |\n"
        "|---|---|---|---|---|---|")
  for r in sweep:
    print(f"| {r['batch']} | {r['pixels']}x{r['pixels']} | {r['channels']} | {r['xla']:.1f} | "
          f"{r['shifted']:.1f} | {r['auto']} |")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "conv.json")
  with open(path, "w") as f:
    json.dump({"backend": jax.default_backend(), "parts_ms": parts, "sweep_ms": sweep}, f,
              indent=1)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
