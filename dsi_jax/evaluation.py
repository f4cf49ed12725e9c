"""The one evaluation harness: any `Retriever` on any queries, one results row.

`evaluate(retriever, queries, relevant, metrics)` ranks every query (never a sample), to the
largest k the metrics need, and computes the named metrics (`dsi_jax.metrics`). Metrics named
"ia@k" (indexing accuracy) need `index=`: the indexed items themselves as queries, each
relevant to its own key only; they may be ranked by another retriever (`index_retriever`, e.g.
DSI's constrained beam search where the queries are scored exactly). Every experiment, the
trainer's validation and every baseline go through here. `evaluate_splits` is the trainer's
view: the splits of a `batches.RetrievalData`, with a loss from the relevant ids' scores.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from dsi_jax import metrics as metrics_lib
from dsi_jax.retrieval import Retriever


def _k(names: Sequence[str]) -> int:
  return max(int(name.split("@")[1]) for name in names)


def evaluate(
  retriever: Retriever,
  queries: Any,
  relevant: Sequence[Collection[str]],
  metrics: Sequence[str],
  *,
  index: Any = None,
  index_keys: Sequence[str] | None = None,
  index_retriever: Retriever | None = None,
  with_ranking: bool = False,
):
  """Metric values `{name: float}` of `retriever` on `queries`.

  Args:
    retriever: anything with `search(queries, k) -> (keys, scores)`.
    queries: what `retriever.search` reads (arrays, a list of strings, ...).
    relevant: per query, the relevant item keys (non-empty).
    metrics: names like "map@10", "recall@100", "hits@1", "mrr@10", "ia@1".
    index: for "ia@k" metrics, the indexed items as queries (the retriever's input format).
    index_keys: their own keys (default: `retriever.keys`, the items in index order).
    index_retriever: ranks `index` (default: `retriever`).
    with_ranking: also return the query rankings: `(values, ranked_keys, scores)`.

  Raises:
    ValueError: an "ia@k" metric without `index`, or `queries` and `relevant` disagree.
  """
  query_names = [m for m in metrics if not m.startswith("ia@")]
  index_names = [m for m in metrics if m.startswith("ia@")]
  values: dict[str, float] = {}
  ranked: list[list[str]] = []
  scores: list[np.ndarray] = []
  if query_names:
    if len(queries) != len(relevant):
      raise ValueError(f"{len(queries)} queries but {len(relevant)} relevance sets")
    ranked, scores = retriever.search(queries, _k(query_names))
    values.update(metrics_lib.compute_metrics(ranked, [set(r) for r in relevant], query_names))
  if index_names:
    if index is None:
      raise ValueError(f"{', '.join(index_names)} need the indexed items (index=)")
    own = list(index_keys if index_keys is not None else retriever.keys)
    own_ranked, _ = (index_retriever or retriever).search(index, _k(index_names))
    for name in index_names:
      values[name] = metrics_lib.indexing_accuracy(own_ranked, own, int(name.split("@")[1]))
  values = {m: values[m] for m in metrics}  # in the order asked
  if with_ranking:
    return values, ranked, scores
  return values


def evaluate_splits(
  retriever: Retriever,
  data: Any,
  metrics: Sequence[str],
  *,
  splits: Sequence[str] = ("val",),
  index_retriever: Retriever | None = None,
) -> dict[str, float]:
  """IA@1 / IA@5 of `index_retriever` on the indexed items (when given) and `metrics` plus a
  loss on each split of `data` (a `batches.RetrievalData`; keys `"<split>/<metric>"`).

  The loss is -log of the probability mass on the relevant ids within the top k: the
  retrieval loss a generative retriever's validation can track.
  """
  out: dict[str, float] = {}
  if index_retriever is not None:
    out.update(evaluate(index_retriever, None, [], ("ia@1", "ia@5"), index=data.index_inputs))
  keys = retriever.keys
  for split in splits:
    relevant = [{keys[i] for i in r} for r in getattr(data, f"{split}_relevant")]
    values, ranked, scores = evaluate(
      retriever, getattr(data, f"{split}_inputs"), relevant, metrics, with_ranking=True
    )
    out.update({f"{split}/{name}": value for name, value in values.items()})
    mass = [
      np.logaddexp.reduce([s for key, s in zip(row, sc) if key in rel] or [-np.inf])
      for row, sc, rel in zip(ranked, scores, relevant)
    ]
    finite = [m for m in mass if np.isfinite(m)]
    out[f"{split}/loss"] = float(-np.mean(finite)) if finite else float("nan")
  return out
