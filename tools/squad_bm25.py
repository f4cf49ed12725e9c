"""BM25 on the SQuAD v1.1 dev corpus of `dsi_jax_squad_random`: Hits@1, Hits@10, MRR@10.

The same corpus and test questions the text-DSI experiments use (2,067 paragraphs; each
paragraph's questions split 0.8 / 0.1 / 0.1). Writes `results.json` and prints the table.

  DSI_JAX_SQUAD_FILE=path/to/dev-v1.1.json python tools/squad_bm25.py --out runs/squad_bm25
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsi_jax import results as results_lib  # noqa: E402
from dsi_jax.experiments import squad  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output folder (results.json)")
  parser.add_argument("--split", default="test", choices=["validation", "test"])
  args = parser.parse_args(argv)

  from dsi_jax import evaluation, tasks
  from dsi_jax.baselines.bm25 import BM25

  data = tasks.corpus_data("dsi_jax_squad_random")
  corpus = data.corpus
  queries = corpus.split(args.split)
  t0 = time.time()
  bm25 = BM25([data.texts[k] for k in corpus.indexed], list(corpus.indexed))
  values = evaluation.evaluate(
    bm25, [q.text for q in queries], corpus.query_relevance(args.split), squad.METRICS
  )
  row = results_lib.make_row(
    model="bm25",
    setting="-",
    dataset="squad_v1.1_dev",
    db_size=len(corpus.indexed),
    num_queries=len(queries),
    metrics=values,
    seconds=round(time.time() - t0, 2),
  )
  os.makedirs(args.out, exist_ok=True)
  command = results_lib.invocation("python tools/squad_bm25.py", argv)
  results_lib.write_report(args.out, [row], {"split": args.split}, command=command)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
