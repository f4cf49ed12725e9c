"""Helpers shared by the `tools/bench_*.py` scripts: argument parsing, the machine, timing,
Markdown tables and the JSON report."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def int_list(text: str) -> list[int]:
  """Parses "1000,10k,1M" into [1000, 10000, 1000000]."""
  out = []
  for part in text.split(","):
    part = part.strip().lower()
    scale = 1
    if part.endswith("k"):
      scale, part = 1_000, part[:-1]
    elif part.endswith("m"):
      scale, part = 1_000_000, part[:-1]
    out.append(int(float(part) * scale))
  return out


def count(text: str) -> int:
  """Parses one number such as "100k"."""
  return int_list(text)[0]


def str_list(text: str) -> list[str]:
  return [p.strip() for p in text.split(",") if p.strip()]


def human(n: int) -> str:
  """1000 -> "1k", 1000000 -> "1M"."""
  if n >= 1_000_000 and n % 1_000_000 == 0:
    return f"{n // 1_000_000}M"
  if n >= 1_000 and n % 1_000 == 0:
    return f"{n // 1_000}k"
  return str(n)


def machine_info() -> dict[str, Any]:
  """The machine, the JAX backend and its devices, as plain JSON values."""
  devices = jax.devices()
  info = {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in devices],
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
  }
  try:
    import jaxlib

    info["jaxlib"] = jaxlib.__version__
  except (ImportError, AttributeError):
    pass
  try:
    import flax

    info["flax"] = flax.__version__
  except ImportError:
    pass
  return info


def start_report(tool: str, args: argparse.Namespace) -> dict[str, Any]:
  """The report's common header: tool, command line (`portable_argv`), settings, machine, jax
  version."""
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  from dsi_jax.results import portable_argv

  argv = portable_argv(list(sys.argv))
  return {
    "tool": tool,
    "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *argv]),
    "argv": argv,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "machine": machine_info(),
    "settings": {k: v for k, v in vars(args).items() if k != "out"},
  }


def time_call(
  fn: Callable[..., Any],
  *args,
  repeats: int,
  min_time: float = 0.0,
  warmup: int = 1,
) -> dict[str, Any]:
  """Median wall time of one call of `fn(*args)`, blocking on its result.

  `warmup` calls (compilation included) come first and are not timed. Each of `repeats`
  measurements times enough back-to-back calls (each waited for with
  `jax.block_until_ready`, so the time is latency, not pipelined throughput) to last at
  least `min_time` seconds, and divides by their number.
  """
  t0 = time.perf_counter()
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  # Calls per measurement, from one timed call.
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t0
  inner = max(1, int(min_time / max(one, 1e-9)))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) / inner)
  return {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "times_s": times,
    "calls_per_repeat": inner,
    "warmup_s": first,
  }


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
  """A Markdown table of `rows`; `columns` are (header, key) pairs; floats get 4 digits."""

  def cell(v):
    if v is None:
      return "–"
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  lines = [
    "| " + " | ".join(h for h, _ in columns) + " |",
    "|" + "|".join("---" for _ in columns) + "|",
  ]
  for r in rows:
    lines.append("| " + " | ".join(cell(r.get(k)) for _, k in columns) + " |")
  return "\n".join(lines)


def write_report(out: str, tool: str, report: dict[str, Any]) -> str:
  """Writes `out/<tool>.json` and returns its path."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f"{tool}.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1, default=_json_default)
    f.write("\n")
  return path


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
