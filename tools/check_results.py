"""Checks a demo `results.json` against the contract (used by CI after `dsi-jax demo --quick`).

python tools/check_results.py DIR/results.json
"""

import math
import sys

from dsi_jax import results

REQUIRED = [("vit_dsi", s, i) for s in ("zero_shot", "fine_tuned") for i in ("random", "clustered")]
REQUIRED += [("bovw", None, None), ("pixel_knn", None, None)]


def main(path: str) -> int:
  rows = results.load(path)["rows"]
  problems = []
  for model, setting, ids in REQUIRED:
    match = [
      r
      for r in rows
      if r["model"] == model and (setting is None or (r["setting"], r["ids"]) == (setting, ids))
    ]
    if not match:
      problems.append(f"no row for {model} {setting or ''} {ids or ''}")
      continue
    needed = ["map@10", "recall@100"] + (["ia@1", "ia@5"] if model == "vit_dsi" else [])
    for m in needed:
      v = match[0].get(m)
      if not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= v <= 1.0:
        problems.append(f"{model} {setting or ''} {ids or ''}: {m} = {v!r}")
  for p in problems:
    print(f"{path}: {p}", file=sys.stderr)
  if not problems:
    print(f"{path}: all {len(REQUIRED)} required rows present with numbers")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
