"""BM25 on the SQuAD v1.1 dev corpus of `dsi_jax_squad_random`: Hits@1, Hits@10, MRR@10.

The same corpus and test questions the text-DSI experiments use (2,067 paragraphs; each
paragraph's questions split 0.8 / 0.1 / 0.1). Writes `results.json` and prints the table.

  DSI_JAX_SQUAD_FILE=path/to/dev-v1.1.json python tools/squad_bm25.py --out runs/squad_bm25
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from dsi_jax import metrics
from dsi_jax import results as results_lib


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output folder (results.json)")
  parser.add_argument("--split", default="test", choices=["validation", "test"])
  args = parser.parse_args(argv)

  from dsi_jax import tasks
  from dsi_jax.baselines.bm25 import BM25

  data = tasks.corpus_data("dsi_jax_squad_random")
  corpus = data.corpus
  queries = corpus.split(args.split)
  t0 = time.time()
  bm25 = BM25([data.texts[k] for k in corpus.indexed], list(corpus.indexed))
  ranked, _ = bm25.search([q.text for q in queries], 10)
  seconds = time.time() - t0
  m = metrics.compute_metrics(
    ranked, corpus.query_relevance(args.split), ["hits@1", "hits@10", "mrr@10"]
  )
  row = {
    "model": "bm25",
    "setting": "-",
    "dataset": "squad_v1.1_dev",
    "db_size": len(corpus.indexed),
    "ids": None,
    "num_queries": len(queries),
    **m,
    "seconds": round(seconds, 2),
  }
  report = {
    "rows": [row],
    "config": {"split": args.split, "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
    "versions": results_lib.versions(),
  }
  os.makedirs(args.out, exist_ok=True)
  results_lib.write_json(report, os.path.join(args.out, "results.json"))
  print(results_lib.markdown_table(report["rows"]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
