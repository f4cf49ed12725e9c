"""The retriever interface every method answers, and DSI behind it.

`Retriever.search(queries, k) -> (keys, scores)`: BoVW, pixel kNN, BM25, the dual encoder and a
trained DSI model (`DSIRetriever`) all answer it, so one harness (`dsi_jax.evaluation`) measures
them on the same queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from dsi_jax import partitioning


class Retriever(Protocol):
  """Ranks the indexed items for each query.

  `search` returns `(keys, scores)`: `keys[q]` is the list of at most `k` item keys,
  best first, without repeats; `scores[q]` the matching scores (higher is better).
  """

  def search(self, queries: Any, k: int) -> tuple[list[list[str]], list[np.ndarray]]: ...


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


def rows_to_keys(
  items: np.ndarray, scores: np.ndarray, keys: Sequence[str]
) -> tuple[list[list[str]], list[np.ndarray]]:
  """`[num, k]` item rows (-1 where fewer ids exist) and their scores as ranked key lists."""
  ranked = [[keys[i] for i in row if i >= 0] for row in items]
  top = [np.asarray(s[: len(r)], np.float32) for s, r in zip(scores, ranked)]
  return ranked, top


def padded_size(n: int, batch_size: int) -> int:
  """The rows a batch of `n` queries is padded to: the next power of two, at most
  `batch_size` (few shapes to compile, little wasted work on short batches)."""
  return n if n >= batch_size else min(batch_size, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass
class DSIRetriever:
  """A trained DSI model behind the Retriever protocol.

  model: a `dsi_jax.models.dsi.DSIModel` (its DocidMap and trie); params: its parameters.
  method: "beam" (trie-constrained beam search with `num_beams` >= k), "exact" (every id scored,
    teacher-forced) or "auto" (exact up to the model's `exact_max_ids` ids).
  batch_size: queries per device call. A shorter batch (the last one, or a single query from
    the CLI or the web page) is padded to the next power of two only: at most
    log2(batch_size) + 1 compilations, and one query never pays for `batch_size`.
  encode_inputs: applied to each batch of model inputs first (a frozen encoder's
    `model.input_encoder`, when queries arrive as tokens).
  Queries are model inputs (pixels in [-1, 1], token ids, or whatever the network reads);
  `dsi_jax.runs` turns raw images and texts into them the way the corpus was prepared.
  """

  model: Any
  params: Any
  method: str = "auto"
  num_beams: int | None = None
  batch_size: int = 64
  encode_inputs: Callable[[np.ndarray], np.ndarray] | None = None

  @property
  def keys(self) -> list[str]:
    """The indexed items, in id order."""
    return list(self.model.docids.keys)

  def with_search(self, method: str, num_beams: int | None = None) -> DSIRetriever:
    """The same model and params, ranked another way."""
    return dataclasses.replace(self, method=method, num_beams=num_beams)

  def rank(self, inputs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranked item rows `[num, k]` (-1 where fewer ids exist) and log-likelihoods."""
    items, scores = [], []
    n = len(inputs)
    mesh = partitioning.array_mesh(self.params)
    for start in range(0, n, self.batch_size):
      chunk = np.asarray(inputs[start : start + self.batch_size])
      pad = padded_size(len(chunk), self.batch_size) - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      if self.encode_inputs is not None:
        chunk = self.encode_inputs(chunk)
      # On several processes, each computes its share of the batch's rows; all get the ranking.
      chunk = partitioning.shared_rows(np.asarray(chunk), mesh)
      it, sc = self.model.rank(self.params, chunk, k, method=self.method, num_beams=self.num_beams)
      items.append(it[: len(it) - pad])
      scores.append(sc[: len(sc) - pad])
    if not items:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(items), np.concatenate(scores)

  def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """The top-`k` item keys (distinct, real ids) and their log-likelihoods per query."""
    items, scores = self.rank(queries, k)
    return rows_to_keys(items, scores, self.model.docids.keys)


@dataclasses.dataclass
class Prepared:
  """A retriever that reads its queries through `prepare` first (e.g. a DSI run's
  `prepare_texts`, so it takes the same raw texts as BM25 or a cross-encoder)."""

  retriever: Retriever
  prepare: Callable[[Any], Any]

  @property
  def keys(self) -> list[str]:
    return list(self.retriever.keys)

  def search(self, queries: Any, k: int) -> tuple[list[list[str]], list[np.ndarray]]:
    return self.retriever.search(self.prepare(queries), k)
