"""The `results.json` contract: rows of metrics, the config and package versions.

`{"rows": [{"model", "setting", "dataset", "db_size", "ids", "num_queries", "ia@1", "ia@5",
"map@10", "recall@100", ...}], "config": {...}, "versions": {...}}`; a metric that does not
apply is null. Every table the project prints is made from such rows.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dsi_jax import errors

METRICS = ("ia@1", "ia@5", "map@10", "recall@100")  # the seed's Table 1
TEXT_METRICS = ("hits@1", "hits@10", "mrr@10")  # the DSI paper's question answering table
CAPTION_METRICS = ("recall@1", "recall@5", "recall@10")  # text -> image retrieval (CLIP-DSI)
# A changed index (`dsi_jax.index`): IA@1 of the items added, and of the items it held before.
CHANGE_METRICS = ("ia_new@1", "ia_old@1")
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
  "ia_new@1": "IA@1 new",
  "ia_old@1": "IA@1 old",
}
# Cost columns a table shows when its rows carry them (the re-ranking pipelines' latency).
COST_COLUMNS = {
  "first_stage_ms": "1st stage ms/q",
  "rerank_ms": "rerank ms/q",
  "full_index_ms": "all-items CE ms/q",
  "speedup": "speed-up",
  "wall_seconds": "wall s",
  "search_ms": "search ms/q",
  "search_batch_ms": "batched ms/q",
}
GROUP_KEYS = ("model", "setting", "ids", "dataset", "db_size", "tower")
# Fields of a row that are neither metrics nor the group: kept from the first seed's row.
_NOT_METRICS = {"num_queries", "num_indexed", "num_seeds", "seed", "device"}


def aggregate(rows: Sequence[dict]) -> list[dict]:
  """Groups per-seed rows by method and reports mean and (population) std over seeds.

  Every metric a row carries (IA@k, MAP@k, R@k, Hits@k, MRR@k, whatever k) is kept: with several
  seeds it holds the mean and `<metric>_std` the standard deviation; a metric that is null in
  any seed stays null. Other numbers (steps, seconds) are averaged; other fields that agree
  across seeds are kept.
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
  out = []
  for group in groups.values():
    row = {k: group[0].get(k) for k in GROUP_KEYS if k in group[0] or k != "tower"}
    row["num_queries"] = group[0].get("num_queries")
    row["num_seeds"] = len(group)
    names = [k for k in group[0] if k not in GROUP_KEYS and k not in _NOT_METRICS]
    for m in names:
      values = [g.get(m) for g in group]
      numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
      if m.endswith("_std") or not numbers:
        if all(v == values[0] for v in values) and not m.endswith("_std"):
          row[m] = values[0]  # the same for every seed (e.g. a setting's description)
        elif any(v is None for v in values) and is_metric(m):
          row[m] = None
        continue
      row[m] = float(np.mean(values))
      if len(group) > 1 and is_metric(m):
        row[f"{m}_std"] = float(np.std(values))
    out.append(row)
  return out


def is_metric(name: str) -> bool:
  """Whether a row field is a ranking metric ("map@10", "recall@1", "ia@5", ...)."""
  prefix, sep, k = name.partition("@")
  prefixes = ("ia", "map", "recall", "hits", "mrr", "ia_new", "ia_old")
  return bool(sep) and k.isdigit() and prefix in prefixes


def _cell(row: dict, metric: str) -> str:
  v = row.get(metric)
  if metric in COST_COLUMNS:
    if v is None:
      return "–"
    return f"{v:,.0f}×" if metric == "speedup" else f"{v:,.2f}" if v < 10 else f"{v:,.0f}"
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  std = row.get(f"{metric}_std")
  return f"{v:.3f} ± {std:.3f}" if std is not None else f"{v:.3f}"


def markdown_table(rows: Sequence[dict]) -> str:
  """One line per method: the seed's Table-1 layout (IA@1 IA@5 MAP@10 R@100) for image rows,
  Hits@1 Hits@10 MRR@10 for question answering rows, R@1 R@5 R@10 for caption -> image rows
  (the metric groups the rows carry), then the cost columns (`COST_COLUMNS`) rows carry."""
  metrics = [m for m in METRICS if any(m in r for r in rows)]
  metrics += [m for m in TEXT_METRICS if any(r.get(m) is not None for r in rows)]
  metrics += [m for m in CAPTION_METRICS if any(r.get(m) is not None for r in rows)]
  metrics += [m for m in CHANGE_METRICS if any(r.get(m) is not None for r in rows)]
  metrics += [m for m in COST_COLUMNS if any(r.get(m) is not None for r in rows)]
  header = "| model | ids | setting | db size | queries | "
  header += " | ".join(_HEADERS.get(m) or COST_COLUMNS[m] for m in metrics) + " |"
  lines = [header, "|" + "---|" * (5 + len(metrics))]
  for r in rows:
    seeds = f" ×{r['num_seeds']} seeds" if r.get("num_seeds", 1) > 1 else ""
    lines.append(
      f"| {r['model']} | {r.get('ids') or '–'} | {r.get('setting') or '–'} | {r['db_size']} "
      f"| {r['num_queries']}{seeds} | " + " | ".join(_cell(r, m) for m in metrics) + " |"
    )
  return "\n".join(lines)


def make_row(
  *,
  model: str,
  setting: str | None,
  dataset: str,
  db_size: int,
  num_queries: int,
  metrics: Mapping[str, float | None],
  ids: str | None = None,
  **extra: Any,
) -> dict[str, Any]:
  """One results row: the method (`model`, `setting`, `ids`), the data (`dataset`, `db_size`,
  `num_queries`), its metric values (None where a metric does not apply), then `extra`
  fields (`steps`, `seconds`, `seed`, `tower`, ...)."""
  for name in metrics:
    if not is_metric(name):
      raise ValueError(f"{name!r} is not a metric name (like 'map@10')")
  return {
    "model": model,
    "setting": setting,
    "dataset": dataset,
    "db_size": db_size,
    "ids": ids,
    "num_queries": num_queries,
    **dict(metrics),
    **extra,
  }


def phase_rows(
  train_result: Mapping[str, Any], query_metrics: Sequence[str], **fields: Any
) -> list[dict[str, Any]]:
  """One row per phase that `train.train_dsi` ran ("zero_shot", "fine_tuned"): IA@1, IA@5 and
  the test `query_metrics`, with the phase's steps and seconds; `fields` as in `make_row`."""
  rows = []
  for setting in ("zero_shot", "fine_tuned"):
    if setting not in train_result:
      continue
    phase = train_result[setting]
    test = phase["test"]
    metrics = {"ia@1": test["ia@1"], "ia@5": test["ia@5"]}
    metrics.update({m: test[f"test/{m}"] for m in query_metrics})
    rows.append(
      make_row(
        setting=setting,
        metrics=metrics,
        steps=phase["steps"],
        seconds=round(phase["seconds"], 1),
        **fields,
      )
    )
  return rows


def machine() -> str:
  """The machine a result came from, in words: processor, cores and JAX's first device."""
  import jax

  device = jax.devices()[0]
  return f"{platform.machine()}, {os.cpu_count()} cores, {device.platform} ({device.device_kind})"


def portable_argv(argv: Sequence[str]) -> list[str]:
  """`argv` with absolute paths (alone or as `--flag=PATH`) cut to their last component: a
  report names the folders it read and wrote, never a path of the machine it ran on."""
  import os

  def cut(arg: str) -> str:
    flag, eq, value = arg.partition("=")
    if eq and os.path.isabs(value):
      return f"{flag}={os.path.basename(os.path.normpath(value))}"
    return os.path.basename(os.path.normpath(arg)) if os.path.isabs(arg) else arg

  return [cut(a) for a in argv]


def invocation(program: str = "dsi-jax", argv: Sequence[str] | None = None) -> str:
  """The command line of this process (or `argv`), as `program` and its arguments (for
  `command`), with paths cut to their last component (`portable_argv`)."""
  import shlex
  import sys

  given = sys.argv[1:] if argv is None else argv
  return " ".join([program, *(shlex.quote(a) for a in portable_argv(given))])


def write_report(
  out_dir: str,
  rows: Sequence[dict],
  config: Mapping[str, Any],
  *,
  command: str,
  runs: Sequence[dict] | None = None,
  quiet: bool = False,
) -> dict[str, Any]:
  """The one `results.json` writer: `rows` (aggregated over seeds where `runs` holds the
  per-seed rows), `config`, `versions`, `command`, `machine` and `date`, written atomically
  into `out_dir`, with the same table as `results.md`. Prints the table unless `quiet`."""
  report: dict[str, Any] = {"rows": list(rows)}
  if runs is not None:
    report["runs"] = list(runs)
  report.update(
    config=dict(config),
    versions=versions(),
    command=command,
    machine=machine(),
    date=datetime.date.today().isoformat(),
  )
  write_json(report, os.path.join(out_dir, "results.json"))
  table = markdown_table(report["rows"])
  from dsi_jax import partitioning

  if not partitioning.is_writer():  # process 0 writes and prints the report
    return report
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(table + "\n")
  if not quiet:
    print(table)
  return report


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
  """Writes JSON atomically (temp file in the same folder, then rename); on a run of several
  processes, process 0 alone writes."""
  from dsi_jax import partitioning

  if not partitioning.is_writer():
    return
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
  """A `results.json` (rows, config, ...), checked; errors are one line naming the file."""
  if os.path.isdir(path):
    raise errors.UserError(f"{path}: a folder, not a results.json")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise errors.UserError(f"{path}: no such file") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.UserError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
    raise errors.UserError(f"{path}: not a results file (expected an object with a 'rows' list)")
  for i, row in enumerate(data["rows"]):
    if not isinstance(row, dict):
      raise errors.UserError(f"{path}: row {i} is not an object")
    missing = [k for k in ("model", "db_size", "num_queries") if k not in row]
    if missing:
      raise errors.UserError(f"{path}: row {i} has no {', '.join(missing)}")
  if not data["rows"]:
    raise errors.UserError(f"{path}: no rows")
  return data
