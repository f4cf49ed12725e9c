"""Ranking metrics for retrieval: Recall@k, MAP@k, Hits@k, MRR@k and indexing accuracy.

Every metric takes `ranked` (per query, the item keys best first, without repeats) and
`relevant` (per query, the collection of relevant keys). Ranked lists shorter than `k`
are fine: the missing positions count as non-relevant. Each aggregate metric is the
plain mean over queries and is returned as a Python float.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np


def _check_k(k: int) -> None:
  """Raises ValueError unless `k` is an integer >= 1."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _check_inputs(
  ranked: Sequence[Sequence[str]], relevant: Sequence[Collection[str]], k: int
) -> list[set[str]]:
  """Validates the inputs shared by all aggregate metrics.

  Args:
    ranked: Per query, item keys best first.
    relevant: Per query, the relevant keys.
    k: Cutoff rank.

  Returns:
    The relevant collections as sets.

  Raises:
    ValueError: If `k` < 1, the lengths differ, there are no queries, or a query has
      no relevant keys.
  """
  _check_k(k)
  if len(ranked) != len(relevant):
    raise ValueError(
      f"ranked and relevant must have the same length, got len(ranked)={len(ranked)} "
      f"and len(relevant)={len(relevant)}"
    )
  if len(ranked) == 0:
    raise ValueError("no queries: ranked and relevant are empty")
  rel_sets = []
  for q, rel in enumerate(relevant):
    rel_set = set(rel)
    if not rel_set:
      raise ValueError(f"query {q} has an empty relevant set")
    rel_sets.append(rel_set)
  return rel_sets


def _hit_vector(ranked_one: Sequence[str], relevant_one: set[str], k: int) -> np.ndarray:
  """Returns rel(i) for i = 1..min(len(ranked_one), k) as a float array of 0s and 1s."""
  return np.array([key in relevant_one for key in ranked_one[:k]], dtype=np.float64)


def recall_at_k(
  ranked: Sequence[Sequence[str]], relevant: Sequence[Collection[str]], k: int
) -> float:
  """Mean over queries of |relevant ∩ top k| / |relevant|.

  Args:
    ranked: Per query, item keys best first, without repeats.
    relevant: Per query, the relevant keys (non-empty).
    k: Cutoff rank, >= 1.

  Returns:
    Recall@k averaged over queries.
  """
  rel_sets = _check_inputs(ranked, relevant, k)
  per_query = [len(rel & set(r[:k])) / len(rel) for r, rel in zip(ranked, rel_sets)]
  return float(np.mean(per_query))


def average_precision_at_k(
  ranked_one: Sequence[str], relevant_one: Collection[str], k: int
) -> float:
  """AP@k of a single query.

  AP@k = (1 / min(|relevant|, k)) * sum_{i <= k} P@i * rel(i), where P@i is the
  fraction of relevant items among the top i and rel(i) is 1 if item i is relevant.

  Args:
    ranked_one: Item keys best first, without repeats.
    relevant_one: The relevant keys (non-empty).
    k: Cutoff rank, >= 1.

  Returns:
    The average precision at k.

  Raises:
    ValueError: If `k` < 1 or `relevant_one` is empty.
  """
  _check_k(k)
  rel = set(relevant_one)
  if not rel:
    raise ValueError("relevant set is empty")
  hits = _hit_vector(ranked_one, rel, k)
  if hits.size == 0:
    return 0.0
  precision_at_i = np.cumsum(hits) / np.arange(1, hits.size + 1)
  return float(np.sum(precision_at_i * hits) / min(len(rel), k))


def map_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[Collection[str]], k: int) -> float:
  """Mean over queries of `average_precision_at_k`.

  Args:
    ranked: Per query, item keys best first, without repeats.
    relevant: Per query, the relevant keys (non-empty).
    k: Cutoff rank, >= 1.

  Returns:
    MAP@k.
  """
  rel_sets = _check_inputs(ranked, relevant, k)
  return float(np.mean([average_precision_at_k(r, rel, k) for r, rel in zip(ranked, rel_sets)]))


def hits_at_k(
  ranked: Sequence[Sequence[str]], relevant: Sequence[Collection[str]], k: int
) -> float:
  """Fraction of queries with at least one relevant item in the top k.

  Args:
    ranked: Per query, item keys best first, without repeats.
    relevant: Per query, the relevant keys (non-empty).
    k: Cutoff rank, >= 1.

  Returns:
    Hits@k.
  """
  rel_sets = _check_inputs(ranked, relevant, k)
  return float(np.mean([_hit_vector(r, rel, k).any() for r, rel in zip(ranked, rel_sets)]))


def mrr_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[Collection[str]], k: int) -> float:
  """Mean over queries of 1 / rank of the first relevant item in the top k (0 if none).

  Args:
    ranked: Per query, item keys best first, without repeats.
    relevant: Per query, the relevant keys (non-empty).
    k: Cutoff rank, >= 1.

  Returns:
    MRR@k.
  """
  rel_sets = _check_inputs(ranked, relevant, k)
  per_query = []
  for r, rel in zip(ranked, rel_sets):
    hits = _hit_vector(r, rel, k)
    per_query.append(1.0 / (int(np.argmax(hits)) + 1) if hits.any() else 0.0)
  return float(np.mean(per_query))


def indexing_accuracy(ranked: Sequence[Sequence[str]], own_keys: Sequence[str], k: int) -> float:
  """IA@k: fraction of indexed items whose own key is in the top k when used as the query.

  Args:
    ranked: Per indexed item (as query), item keys best first, without repeats.
    own_keys: Per query, the key of the item itself (the only relevant key).
    k: Cutoff rank, >= 1.

  Returns:
    Indexing accuracy at k.
  """
  if len(ranked) != len(own_keys):
    raise ValueError(
      f"ranked and own_keys must have the same length, got len(ranked)={len(ranked)} "
      f"and len(own_keys)={len(own_keys)}"
    )
  return hits_at_k(ranked, [{key} for key in own_keys], k)


def _own_keys(relevant: Sequence[Collection[str]]) -> list[str]:
  """Reads each query's own key from `relevant`: a plain string or a one-element collection."""
  keys = []
  for q, rel in enumerate(relevant):
    if isinstance(rel, str):
      keys.append(rel)
      continue
    rel_set = set(rel)
    if len(rel_set) != 1:
      raise ValueError(
        f"ia@k needs exactly one relevant (own) key per query; query {q} has {len(rel_set)}"
      )
    keys.append(next(iter(rel_set)))
  return keys


_METRICS: dict[str, Callable[[Sequence[Sequence[str]], Sequence[Collection[str]], int], float]] = {
  "recall": recall_at_k,
  "map": map_at_k,
  "hits": hits_at_k,
  "mrr": mrr_at_k,
  "ia": lambda ranked, relevant, k: indexing_accuracy(ranked, _own_keys(relevant), k),
}


def _parse_name(name: str) -> tuple[str, int]:
  """Splits a metric name like "map@10" into ("map", 10); raises ValueError if malformed."""
  prefix, sep, k_str = name.strip().lower().partition("@")
  if prefix not in _METRICS:
    raise ValueError(
      f"unknown metric {name!r}; known prefixes: {', '.join(sorted(_METRICS))} (as 'prefix@k')"
    )
  if not sep or not k_str.isdigit() or int(k_str) < 1:
    raise ValueError(f"metric {name!r} must look like '{prefix}@k' with an integer k >= 1")
  return prefix, int(k_str)


def compute_metrics(
  ranked: Sequence[Sequence[str]], relevant: Sequence[Collection[str]], names: Sequence[str]
) -> dict[str, float]:
  """Computes several metrics given by name, e.g. "map@10", "recall@100", "hits@1", "mrr@10".

  "ia@k" (indexing accuracy) reads each query's relevant collection as the singleton
  of its own key.

  Args:
    ranked: Per query, item keys best first, without repeats.
    relevant: Per query, the relevant keys (non-empty).
    names: Metric names of the form "prefix@k".

  Returns:
    `{name: value}` for every name, in the given order.

  Raises:
    ValueError: On an unknown or malformed name, or invalid inputs.
  """
  parsed = [(name, *_parse_name(name)) for name in names]
  return {name: _METRICS[prefix](ranked, relevant, k) for name, prefix, k in parsed}
