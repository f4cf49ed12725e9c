"""The `results.json` contract: rows of metrics, the config and package versions.

`{"rows": [{"model", "setting", "dataset", "db_size", "ids", "num_queries", "ia@1", "ia@5",
"map@10", "recall@100", ...}], "config": {...}, "versions": {...}}`; a metric that does not
apply is null. Every table the project prints is made from such rows.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("ia@1", "ia@5", "map@10", "recall@100")  # the seed's Table 1
TEXT_METRICS = ("hits@1", "hits@10", "mrr@10")  # the DSI paper's question answering table
CAPTION_METRICS = ("recall@1", "recall@5", "recall@10")  # text -> image retrieval (CLIP-DSI)
_HEADERS = {
  "ia@1": "IA@1",
  "ia@5": "IA@5",
  "map@10": "MAP@10",
  "recall@100": "R@100",
  "hits@1": "Hits@1",
  "hits@10": "Hits@10",
  "mrr@10": "MRR@10",
  "recall@1": "R@1",
  "recall@5": "R@5",
  "recall@10": "R@10",
}
GROUP_KEYS = ("model", "setting", "ids", "dataset", "db_size")


def aggregate(rows: Sequence[dict]) -> list[dict]:
  """Groups per-seed rows by method and reports mean and (population) std over seeds.

  With one seed the rows come back unchanged but for `num_seeds`; with several, each
  metric holds the mean and `<metric>_std` its standard deviation.
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
  out = []
  for group in groups.values():
    row = {k: group[0].get(k) for k in GROUP_KEYS}
    row["num_queries"] = group[0].get("num_queries")
    row["num_seeds"] = len(group)
    for m in METRICS + TEXT_METRICS:
      if all(m not in g for g in group):
        continue
      values = [g.get(m) for g in group]
      if any(v is None for v in values):
        row[m] = None
        continue
      row[m] = float(np.mean(values))
      if len(group) > 1:
        row[f"{m}_std"] = float(np.std(values))
    for extra in ("steps", "seconds"):
      if all(extra in g for g in group):
        row[extra] = float(np.mean([g[extra] for g in group]))
    out.append(row)
  return out


def _cell(row: dict, metric: str) -> str:
  v = row.get(metric)
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  std = row.get(f"{metric}_std")
  return f"{v:.3f} ± {std:.3f}" if std is not None else f"{v:.3f}"


def markdown_table(rows: Sequence[dict]) -> str:
  """One line per method: the seed's Table-1 layout (IA@1 IA@5 MAP@10 R@100) for image rows,
  Hits@1 Hits@10 MRR@10 for question answering rows, R@1 R@5 R@10 for caption -> image rows
  (the metric groups the rows carry)."""
  metrics = [m for m in METRICS if any(m in r for r in rows)]
  metrics += [m for m in TEXT_METRICS if any(r.get(m) is not None for r in rows)]
  metrics += [m for m in CAPTION_METRICS if any(r.get(m) is not None for r in rows)]
  header = "| model | ids | setting | db size | queries | "
  header += " | ".join(_HEADERS[m] for m in metrics) + " |"
  lines = [header, "|" + "---|" * (5 + len(metrics))]
  for r in rows:
    seeds = f" ×{r['num_seeds']} seeds" if r.get("num_seeds", 1) > 1 else ""
    lines.append(
      f"| {r['model']} | {r.get('ids') or '–'} | {r.get('setting') or '–'} | {r['db_size']} "
      f"| {r['num_queries']}{seeds} | " + " | ".join(_cell(r, m) for m in metrics) + " |"
    )
  return "\n".join(lines)


def versions() -> dict[str, str]:
  out = {}
  for pkg in (
    "dsi_jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "scikit-learn",
    "opencv-python-headless",
  ):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def write_json(obj: Any, path: str) -> None:
  """Writes JSON atomically (temp file in the same folder, then rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def load(path: str) -> dict:
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
    raise ValueError(f"{path}: not a results file (expected an object with a 'rows' list)")
  return data
