"""The retriever interface every method (DSI, BoVW, kNN, ...) answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Retriever(Protocol):
  """Ranks the indexed items for each query.

  `search` returns `(keys, scores)`: `keys[q]` is the list of at most `k` item keys,
  best first, without repeats; `scores[q]` the matching scores (higher is better).
  """

  def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], list[np.ndarray]]: ...


def topk_keys(
  scores: np.ndarray, keys: Sequence[str], k: int
) -> tuple[list[list[str]], list[np.ndarray]]:
  """Turns a dense `[num_queries, num_items]` score matrix into ranked key lists.

  Ties are broken by item order (stable sort), so results are deterministic.
  """
  if scores.ndim != 2 or scores.shape[1] != len(keys):
    raise ValueError(f"scores must be [num_queries, {len(keys)}], got {scores.shape}")
  k = min(k, len(keys))
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  ranked = [[keys[j] for j in row] for row in order]
  top_scores = [scores[q, row] for q, row in enumerate(order)]
  return ranked, top_scores
