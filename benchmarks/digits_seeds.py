"""How much do the digits pipeline's results move with the seed? Runs it for several seeds and
tables each row's mean +- standard deviation over them.

  python benchmarks/digits_seeds.py --root /tmp/digits_seeds --seeds 0 1 2
      [--config configs/digits.py] [--set train.num_steps=800 ...]
      [--out benchmarks/results/digits_seeds]

Each seed runs `python -m dsno_jax.main --mode=pipeline --config.seed=SEED` in ROOT/seed_SEED
(the pipeline skips the stages already finished there, so a stopped sweep resumes), with its
console in ROOT/seed_SEED/pipeline.log. The FD-digits classifier has its own seed
(`eval.classifier_seed`), so every seed is scored by the same features. Prints the markdown
table and writes OUT.json (every seed's rows and the summary) and OUT.md.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# (results.json key, table title) of the columns averaged over seeds, in the table's order
COLUMNS = (
    ("class_accuracy", "class accuracy"),
    ("nn_train_median", "nearest-train, features (median)"),
    ("near_copies", "near copies, features"),
    ("pixel_near_copies", "near copies, pixels"),
    ("nn_ratio_copies", "copies, pixels (ratio < 1/3)"),
)


def run_seed(config: str, root: str, seed: int, overrides: Sequence[str]) -> dict:
  """Runs (or finishes) the pipeline of one seed in ROOT/seed_SEED: its wall seconds and the
  stage times the pipeline printed."""
  workdir = os.path.join(root, f"seed_{seed}")
  os.makedirs(workdir, exist_ok=True)
  command = [sys.executable, "-m", "dsno_jax.main", f"--config={config}",
             f"--workdir={workdir}", "--mode=pipeline", f"--config.seed={seed}"]
  command += [f"--config.{o}" for o in overrides]
  start, path = time.time(), os.path.join(workdir, "pipeline.log")
  with open(path, "a") as log:
    offset = log.tell()
    print(f"seed {seed}: {' '.join(command)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
  if done.returncode:
    raise SystemExit(f"seed {seed}: the pipeline exited with status {done.returncode}; its "
                     f"console is in {path}")
  with open(path) as f:
    f.seek(offset)
    printed = f.read().split("pipeline stages:")[-1]
  return {"wall_s": time.time() - start,
          "stages": dict(re.findall(r"^  (\w+)\s+(\d+ s|skipped)$", printed, re.M))}


def load_results(root: str, seeds: Sequence[int]) -> Dict[int, dict]:
  """{seed: ROOT/seed_SEED/eval/results.json}, or SystemExit naming the missing file."""
  results = {}
  for seed in seeds:
    path = os.path.join(root, f"seed_{seed}", "eval", "results.json")
    if not os.path.isfile(path):
      raise SystemExit(f"{path} does not exist: run the pipeline of seed {seed} first")
    with open(path) as f:
      results[seed] = json.load(f)
  return results


def _mean_std(values: List[float]) -> Dict[str, float]:
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
  return {"mean": mean, "std": std, "n": n, "values": values}


def summarise(results: Dict[int, dict]) -> List[dict]:
  """One entry per row of the seeds' tables (model, solver and, unless adaptive, NFE), in the
  first seed's order: the NFE and every measured column as {mean, std (sample, n - 1), n,
  values in seed order}."""
  metrics = {r["metric"] for r in results.values()}
  if len(metrics) != 1:
    raise ValueError(f"the seeds' results use different metrics {sorted(metrics)}")
  order, rows = [], {}
  for seed, result in results.items():
    for row in result["rows"]:
      key = (row["model"], row["solver"], None if row.get("adaptive") else row["nfe"])
      if key not in rows:
        order.append(key)
        rows[key] = {"model": row["model"], "solver": row["solver"],
                     "adaptive": bool(row.get("adaptive")), "seeds": [], "columns": {}}
      rows[key]["seeds"].append(seed)
      for name in ("nfe", "metric") + tuple(c for c, _ in COLUMNS):
        if name in row:
          rows[key]["columns"].setdefault(name, []).append(float(row[name]))
  return [dict(rows[k], columns={name: _mean_std(v) for name, v in rows[k]["columns"].items()})
          for k in order]


def _cell(stats: Dict[str, float], spec: str = ".3f", share: bool = False) -> str:
  """'mean ± std' (the mean alone for one seed), shares as percentages."""
  scale, unit, spec = (100.0, "%", ".2f") if share else (1.0, "", spec)
  cell = f"{scale * stats['mean']:{spec}}{unit}"
  return cell if stats["n"] < 2 else f"{cell} ± {scale * stats['std']:{spec}}{unit}"


def markdown(summary: List[dict], metric: str, seeds: Sequence[int]) -> str:
  """The table: a row per (model, solver), each column's mean ± std over the seeds."""
  columns = [(c, t) for c, t in COLUMNS if any(c in r["columns"] for r in summary)]
  head = f"| model | solver | NFE | {metric} |" + "".join(f" {t} |" for _, t in columns)
  lines = [f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}:", "",
           head, "|" + "---|" * (4 + len(columns))]
  for row in summary:
    cols = row["columns"]
    nfe = cols["nfe"]["mean"]
    nfe = "-" if nfe == 0 else (f"{_cell(cols['nfe'], '.1f')} (mean)" if row["adaptive"]
                                else str(int(nfe)))
    model = row["model"] + (f" ({len(row['seeds'])} seeds)"
                            if len(row["seeds"]) != len(seeds) else "")
    line = f"| {model} | {row['solver']} | {nfe} | {_cell(cols['metric'])} |"
    line += "".join(f" {_cell(cols[c], share=c.endswith('copies')) if c in cols else '-'} |"
                    for c, _ in columns)
    lines.append(line)
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="directory of the seeds' workdirs")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="config overrides for every seed, e.g. train.num_steps=800")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "digits_seeds"))
  parser.add_argument("--table-only", action="store_true",
                      help="only table the results.json files already in ROOT")
  args = parser.parse_args(argv)
  if len(set(args.seeds)) != len(args.seeds):
    raise SystemExit(f"--seeds {args.seeds} repeats a seed")
  runs = {}
  if not args.table_only:
    for seed in args.seeds:
      runs[seed] = run_seed(args.config, os.path.abspath(args.root), seed, args.set)
      print(f"seed {seed}: {runs[seed]['wall_s']:.0f} s; stages {runs[seed]['stages']}")
  results = load_results(args.root, args.seeds)
  summary = summarise(results)
  metric = next(iter(results.values()))["metric"]
  table = markdown(summary, metric, args.seeds)
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump({"config": args.config, "overrides": args.set, "seeds": args.seeds,
               "runs": runs, "metric": metric, "summary": summary,
               "results": {str(s): r for s, r in results.items()}}, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(table + "\n")
  return summary


if __name__ == "__main__":
  main()
