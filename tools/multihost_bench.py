"""One gin experiment as several processes against one process with as many devices.

  python tools/multihost_bench.py --out benchmarks/results/multihost_cpu

Runs `dsi-jax train --gin_file GIN` (default: the Fashion-MNIST 512, clustered-ids
experiment, seed 0) twice in fresh workdirs: as 1 process with 2 CPU devices
(`--local_devices 2`) and as 2 processes with 1 device each (`--num_processes 2
--local_devices 1`, joined through localhost). Same mesh shape (data = 2), same seed, same
global batches: the metrics should agree. Writes both runs' ViT-DSI rows (with a `layout`
column and the wall time) and the largest metric difference between them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

from dsi_jax import results

LAYOUTS = (("1 process x 2 devices", ["--local_devices", "2"]),)
LAYOUTS += (("2 processes x 1 device", ["--num_processes", "2", "--local_devices", "1"]),)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--gin_file", default="gin_configs/experiments/fmnist512_clustered.gin")
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--keep", default=None, help="keep the run folders here")
  args = p.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix="multihost-")
  dsi_jax = os.path.join(os.path.dirname(sys.executable), "dsi-jax")
  rows, metrics = [], {}
  for layout, flags in LAYOUTS:
    workdir = os.path.join(root, layout.replace(" ", "_"))
    cmd = [dsi_jax, "train", f"--gin_file={args.gin_file}", *flags]
    cmd += [f"--gin_bindings=dsi_jax.run_experiment.workdir='{workdir}'"]
    cmd += [f"--gin_bindings={b}" for b in args.gin_bindings]
    print("$", " ".join(shlex.quote(c) for c in cmd[1:]), file=sys.stderr)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    seconds = round(time.time() - t0, 1)
    for row in results.load(os.path.join(workdir, "results.json"))["rows"]:
      if row["model"] == "vit_dsi":
        setting = f"{row['setting']}, {layout}"
        rows.append({**row, "setting": setting, "layout": layout, "wall_seconds": seconds})
        metrics[(layout, row["setting"])] = {
          k: v for k, v in row.items() if results.is_metric(k) and isinstance(v, float)
        }
  diffs = [
    abs(metrics[(LAYOUTS[0][0], s)][k] - metrics[(LAYOUTS[1][0], s)][k])
    for (layout, s), values in metrics.items()
    if layout == LAYOUTS[0][0]
    for k in values
  ]
  config = {
    "gin_file": args.gin_file,
    "gin_bindings": args.gin_bindings,
    "layouts": {name: flags for name, flags in LAYOUTS},
    "max_abs_metric_difference": max(diffs),
  }
  command = results.invocation("python " + sys.argv[0])
  results.write_report(args.out, rows, config, command=command)
  print(f"largest metric difference between the layouts: {max(diffs):.2e}")


if __name__ == "__main__":
  main()
