"""Merges the `results.json` of several runs (e.g. one per seed) into one report: per-seed rows
under `runs`, rows aggregated over seeds (mean and std, `results.aggregate`) under `rows`.

  python tools/merge_results.py --out benchmarks/results/fmnist512_dinov2_cpu \
      --command "dsi-jax train --gin_file=... (seeds 0, 1, 2)" runs/s0 runs/s1 runs/s2
"""

from __future__ import annotations

import argparse
import os

from dsi_jax import results


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("inputs", nargs="+", help="run folders or results.json files")
  p.add_argument("--out", required=True, help="folder for the merged results.json")
  p.add_argument("--command", required=True, help="the command that made the inputs")
  args = p.parse_args(argv)
  reports = []
  for path in args.inputs:
    reports.append(
      results.load(os.path.join(path, "results.json") if os.path.isdir(path) else path)
    )
  runs = []
  for i, report in enumerate(reports):
    for row in report["rows"]:
      runs.append({**row, "seed": row.get("seed", report.get("config", {}).get("seed", i))})
  config = dict(reports[0].get("config", {}))
  config["seeds"] = sorted({r["seed"] for r in runs})
  config["merged_from"] = [os.path.basename(os.path.normpath(p)) for p in args.inputs]
  os.makedirs(args.out, exist_ok=True)
  results.write_report(args.out, results.aggregate(runs), config, command=args.command, runs=runs)


if __name__ == "__main__":
  main()
