"""How accurate is each teacher ODE solver at a given NFE? Measured on the exact digits-mixture
teacher.

  python benchmarks/solvers.py [--out benchmarks/results/] [--num_draws 64]

RMSE of the final x-hat (t=0) of every solver and grid against a float64 Dopri8
solve at tolerance 1e-10, on 64 noise draws of the 10-component digits mixture (64 dims,
exact denoiser), for NFE 8..1024 and adaptive Tsit5/Dopri5 at several tolerances. The fixed-step
solvers are DDIM, DPM-Solver++(2M)/(3M) as published (dpmpp2m, dpmpp3m) and the project's
VP-angle variant (phi2m, phi3m); NFE counts every network evaluation (the x-hat at t=0 costs
none). Reports the NFE at which each solver first reaches the accuracy of DDIM with 512
uniform-t steps. Prints tables; writes solvers.json and solvers.png.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import ode, teachers

NFES = (8, 16, 32, 64, 128, 256, 512, 1024)
TOLERANCES = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
REFERENCE_TOL = 1e-10
FINAL = (0.0,)  # only the sample matters for the accuracy table
FINAL_LOGSNR = ode.logsnr_of_times(FINAL, -20.0, 20.0)


def _rmse(a, b) -> float:
  return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def reference(mixture, z1):
  """Float64 Dopri8 final x-hat at REFERENCE_TOL, and its distance to the 10x looser solve."""
  with jax.enable_x64(True):
    z64 = jnp.asarray(np.asarray(z1), jnp.float64)
    solve = jax.jit(lambda z, tol: ode.integrate(
        mixture.denoise, z, FINAL_LOGSNR, solver="dopri8", rtol=tol, atol=tol))
    x_ref, stats = solve(z64, REFERENCE_TOL)
    x_loose, _ = solve(z64, 10 * REFERENCE_TOL)
    return np.asarray(x_ref[:, -1]), _rmse(x_ref, x_loose), float(np.mean(stats["nfe"]))


def fixed_step_sweep(mixture, z1, x_ref, nfes, grids=ode.GRIDS):
  """{solver: {grid: {nfe: rmse}}} for the fixed-step solvers; one compile per (solver, length)."""
  results = {}
  for solver in ode.FIXED_STEP_SOLVERS:
    solve = jax.jit(lambda z, grid, solver=solver: ode.integrate(
        mixture.denoise, z, FINAL_LOGSNR, solver=solver, grid_logsnrs=grid)[0])
    results[solver] = {}
    for grid in grids:
      results[solver][grid] = {}
      for n in nfes:
        assert ode.nfe(solver, n, grid, FINAL) == n
        x = solve(z1, ode.logsnr_grid(n, grid, FINAL))
        results[solver][grid][n] = _rmse(x[:, -1], x_ref)
  return results


def adaptive_sweep(mixture, z1, x_ref, tolerances):
  """{solver: [(tol, mean nfe, rmse)]} for Tsit5 and Dopri5 under PID control (rtol = atol)."""
  results = {}
  for solver in ("tsit5", "dopri5"):
    solve = jax.jit(lambda z, tol, solver=solver: ode.integrate(
        mixture.denoise, z, FINAL_LOGSNR, solver=solver, rtol=tol, atol=tol))
    results[solver] = []
    for tol in tolerances:
      x, stats = solve(z1, tol)
      results[solver].append((tol, float(np.mean(stats["nfe"])), _rmse(x[:, -1], x_ref)))
  return results


def nfe_to_reach(curve, target):
  """Smallest swept NFE with rmse <= target, and the log-log interpolated crossing (or None)."""
  points = sorted(curve.items())
  for i, (n, err) in enumerate(points):
    if err <= target:
      if i == 0:
        return n, float(n)
      (n0, e0), (n1, e1) = points[i - 1], (n, err)
      frac = (np.log(e0) - np.log(target)) / (np.log(e0) - np.log(e1))
      return n, float(np.exp(np.log(n0) + frac * (np.log(n1) - np.log(n0))))
  return None, None


def plot(path, fixed, adaptive, target):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 5))
  styles = {"uniform_t": "-", "uniform_logsnr": "--", "edm": ":"}
  colors = {"ddim": "C0", "dpmpp2m": "C1", "dpmpp3m": "C2", "phi2m": "C5", "phi3m": "C6",
            "tsit5": "C3", "dopri5": "C4"}
  for solver, grids in fixed.items():
    for grid, curve in grids.items():
      n, err = zip(*sorted(curve.items()))
      ax.loglog(n, err, styles[grid], color=colors[solver], marker=".", label=f"{solver} {grid}")
  for solver, rows in adaptive.items():
    _, n, err = zip(*rows)
    ax.loglog(n, err, "o", color=colors[solver], label=f"{solver} (PID)")
  ax.axhline(target, color="k", lw=0.8, label="DDIM 512 uniform_t")
  ax.set_xlabel("NFE")
  ax.set_ylabel("RMSE of the final x-hat vs float64 Dopri8")
  ax.set_title("PF-ODE solvers on the digits mixture (64 dims, 64 draws)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--num_draws", type=int, default=64)
  parser.add_argument("--grids", default=",".join(ode.GRIDS), help="comma-separated grids")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()

  mixture = teachers.digits_mixture(8)
  z1 = jax.random.normal(jax.random.PRNGKey(0), (args.num_draws, 8, 8, 1))
  x_ref, ref_err, ref_nfe = reference(mixture, z1)
  print(f"reference: float64 dopri8 tol {REFERENCE_TOL:g}, mean NFE {ref_nfe:.0f}, "
        f"RMSE to the tol {10 * REFERENCE_TOL:g} solve {ref_err:.1e}")
  fixed = fixed_step_sweep(mixture, z1, x_ref, NFES, tuple(args.grids.split(",")))
  adaptive = adaptive_sweep(mixture, z1, x_ref, TOLERANCES)
  target = fixed["ddim"]["uniform_t"][512]

  print(f"\nRMSE of the final x-hat vs NFE (float32 solves, {args.num_draws} draws)")
  print(f"{'solver':8s} {'grid':15s}" + "".join(f"{n:>9d}" for n in NFES) + "  NFE to DDIM-512")
  reach = {}
  for solver, grids in fixed.items():
    for grid, curve in grids.items():
      swept, crossing = nfe_to_reach(curve, target)
      reach[f"{solver}/{grid}"] = {"swept": swept, "interpolated": crossing}
      where = "-" if swept is None else f"{swept} (~{crossing:.0f})"
      print(f"{solver:8s} {grid:15s}" + "".join(f"{curve[n]:9.1e}" for n in NFES) + f"  {where}")
  print("\nadaptive (PID, rtol = atol): tol, mean NFE, RMSE")
  for solver, rows in adaptive.items():
    print(f"{solver:7s} " + "  ".join(f"{tol:.0e}: {n:.0f} NFE {err:.1e}" for tol, n, err in rows))
    crossing = next((n for _, n, err in rows if err <= target), None)
    reach[solver] = {"swept": crossing, "interpolated": crossing}
    print(f"{'':7s} reaches DDIM-512 at {'-' if crossing is None else f'{crossing:.0f} NFE'}")
  print(f"\nDDIM-512 (uniform_t) RMSE {target:.2e}")

  results = {
      "device": str(jax.devices()[0]), "num_draws": args.num_draws,
      "reference": {"solver": "dopri8", "dtype": "float64", "tol": REFERENCE_TOL,
                    "mean_nfe": ref_nfe, "rmse_to_10x_looser": ref_err},
      "ddim512_rmse": target,
      "fixed_step": {s: {g: {str(n): e for n, e in c.items()} for g, c in gr.items()}
                     for s, gr in fixed.items()},
      "adaptive": {s: [dict(tol=t, nfe=n, rmse=e) for t, n, e in rows] for s, rows in adaptive.items()},
      "nfe_to_reach_ddim512": reach,
      "wall_s": time.perf_counter() - start,
  }
  with open(os.path.join(args.out, "solvers.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(os.path.join(args.out, "solvers.png"), fixed, adaptive, target)
  print(f"\nwrote {args.out}/solvers.json and solvers.png in {results['wall_s']:.0f} s")


if __name__ == "__main__":
  main()
