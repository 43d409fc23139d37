"""How accurate are the evaluation's teacher solves on a trained teacher? Measured on a finished
digits pipeline's UNet teacher.

  python benchmarks/teacher_solves.py --workdir W [--config digits]
      [--num_samples 200] [--out benchmarks/results/teacher_solves]

RMSE and largest error of the final x-hat (t=0) of each solve against a dopri5 solve at
rtol = atol = 1e-6 from the same noise and labels (the evaluation's first NUM_SAMPLES
examples, `evaluation.sampling.sample_inputs`), with each solve's mean NFE and seconds. Prints
a markdown table; writes OUT.json and OUT.md.
"""
import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsno_jax import parallel  # noqa: E402
from dsno_jax.evaluation import sampling  # noqa: E402
from dsno_jax.teachers import loading  # noqa: E402

REFERENCE = ("dopri5", 1, 1e-6)
# (solver, steps, tolerance): the adaptive rows' tolerance, the fixed-step rows' steps
SOLVES = (("dopri5", 1, 1e-4), ("dopri5", 1, 1e-5), ("phi2m", 32, None), ("phi2m", 64, None),
          ("phi3m", 32, None), ("phi3m", 64, None), ("phi3m", 128, None))


def solve(config, denoise, mesh, solver: str, steps: int, tolerance):
  """(x-hat (N, H, W, C) float64, mean NFE, seconds) of one solve of the first N examples."""
  n = config.eval.num_samples
  jitted = sampling.make_teacher_sampler(config, mesh, solver, steps, tolerance or 1e-4)
  start = time.time()
  _, x_hat, nfe, successful = sampling.draw_logged(jitted, denoise, n, n, mesh,
                                                   f"{solver} {steps}")
  if not successful.all():
    raise SystemExit(f"{solver}: {int(np.sum(~successful))} of {n} solves ran out of steps "
                     f"(ode.MAX_ADAPTIVE_STEPS); their samples are not solutions")
  return x_hat.astype(np.float64), float(np.mean(nfe)), time.time() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished digits pipeline's workdir")
  parser.add_argument("--config", default="digits", help="a module of configs/")
  parser.add_argument("--num_samples", type=int, default=200)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "teacher_solves"))
  args = parser.parse_args()
  config = importlib.import_module(f"configs.{args.config}").get_config()
  config.eval.num_samples = config.eval.batch_size = args.num_samples
  mesh = parallel.make_mesh()
  denoise, identity = loading.load_teacher(config, args.workdir)
  reference, reference_nfe, reference_s = solve(config, denoise, mesh, *REFERENCE)
  rows = []
  for solver, steps, tolerance in SOLVES:
    x, nfe, seconds = solve(config, denoise, mesh, solver, steps, tolerance)
    error = np.abs(x - reference)
    rows.append({"solver": solver, "setting": f"tol {tolerance:g}" if tolerance else
                 f"{steps} steps", "nfe": nfe, "rmse": float(np.sqrt(np.mean(error ** 2))),
                 "max_error": float(error.max()), "seconds": seconds})
  lines = [f"Against dopri5 at tol 1e-6 ({reference_nfe:.0f} NFE, {reference_s:.0f} s); "
           f"teacher {identity}; {args.num_samples} samples",
           "", "| solver | setting | NFE | RMSE | max error | seconds |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['solver']} | {r['setting']} | {r['nfe']:.1f} | {r['rmse']:.2e} | "
            f"{r['max_error']:.2e} | {r['seconds']:.0f} |" for r in rows]
  table = "\n".join(lines)
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(table + "\n")
  with open(args.out + ".json", "w") as f:
    json.dump({"teacher": identity, "num_samples": args.num_samples,
               "reference": {"solver": "dopri5", "tolerance": 1e-6, "nfe": reference_nfe,
                             "seconds": reference_s}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
