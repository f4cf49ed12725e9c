"""Retrieve fast, rerank smart: a first-stage retriever's top K re-ordered by a cross-encoder.

`Reranked(retriever, scorer, k=20)` is itself a `Retriever`: it asks the first stage for its
ranking, has the scorer (a cross-encoder behind `CrossEncoderScorer`) score the top `k`
(query, item) pairs, re-orders those `k` by that score (optionally fused with the first-stage
score) and keeps the rest of the first-stage list, in its order, below them. Every item the
first stage returned is returned once; nothing else is. Any retriever of the harness works as
the first stage: BM25, the dual encoder, DSI, BoVW, pixel kNN, caption prototypes.

Both stages read the same queries (texts for a text or caption-image cross-encoder); wrap a
first stage that reads another form in `retrieval.Prepared` (DSI reads token ids).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from dsi_jax.retrieval import Retriever


class PairScorer(Protocol):
  """Scores (query, item) pairs: `score(queries, candidates)[q][j]` is the relevance of item
  `candidates[q][j]` to query `q` (higher is more relevant)."""

  def score(self, queries: Any, candidates: Sequence[Sequence[str]]) -> list[np.ndarray]: ...


def fuse(rerank: np.ndarray, first: np.ndarray, weight: float) -> np.ndarray:
  """`(1 - weight) * z(rerank) + weight * z(first)`, z the standard score over the candidates
  of one query (the two scales differ: logits, BM25 scores, log-likelihoods, cosines).
  `weight=0` is the cross-encoder's order alone."""
  if weight == 0.0:
    return np.asarray(rerank, np.float64)

  def z(x):
    x = np.asarray(x, np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)

  return (1.0 - weight) * z(rerank) + weight * z(first)


@dataclasses.dataclass
class Reranked:
  """A first-stage retriever whose top `k` are re-ranked by a cross-encoder.

  retriever: the first stage (anything with `search(queries, k)`).
  scorer: scores (query, item) pairs (`CrossEncoderScorer`).
  k: how many first-stage candidates are re-scored (the paper's K; 20).
  fusion_weight: in [0, 1]: weight of the first-stage score in the new order (`fuse`).

  `search` returns the re-ranked top `k` with their (fused) scores, then the first stage's
  remaining items with score NaN (not re-scored), up to the number asked. `timings` adds up
  the seconds spent in each stage, `num_queries` and `num_pairs` the queries searched and the
  pairs cross-encoded, for latency tables.
  """

  retriever: Retriever
  scorer: PairScorer
  k: int = 20
  fusion_weight: float = 0.0
  timings: dict[str, float] = dataclasses.field(
    default_factory=lambda: {"first_stage": 0.0, "rerank": 0.0}
  )
  num_queries: int = 0
  num_pairs: int = 0

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"k must be >= 1 (candidates to re-rank), got {self.k}")
    if not 0.0 <= self.fusion_weight <= 1.0:
      raise ValueError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")

  @property
  def keys(self) -> list[str]:
    return list(self.retriever.keys)

  def search(self, queries: Any, k: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """The top `k` keys per query: the first `self.k` re-ranked, the rest as the first stage."""
    t0 = time.perf_counter()
    ranked, first = self.retriever.search(queries, max(k, self.k))
    t1 = time.perf_counter()
    heads = [list(r[: self.k]) for r in ranked]
    scores = self.scorer.score(queries, heads)
    t2 = time.perf_counter()
    self.timings["first_stage"] += t1 - t0
    self.timings["rerank"] += t2 - t1
    self.num_queries += len(ranked)
    self.num_pairs += sum(len(h) for h in heads)
    out_keys, out_scores = [], []
    for row, row_first, head, head_scores in zip(ranked, first, heads, scores):
      head_scores = np.asarray(head_scores)
      if head_scores.shape != (len(head),):
        raise ValueError(f"the scorer gave {head_scores.shape} scores for {len(head)} items")
      fused = fuse(head_scores, np.asarray(row_first)[: len(head)], self.fusion_weight)
      order = np.argsort(-fused, kind="stable")  # ties keep the first stage's order
      keys = [head[i] for i in order] + list(row[self.k :])
      tail = np.full(len(row) - len(head), np.nan)
      out_keys.append(keys[:k])
      out_scores.append(np.concatenate([fused[order], tail])[:k].astype(np.float32))
    return out_keys, out_scores

  def latency_ms(self) -> dict[str, float]:
    """Mean milliseconds per query of each stage (and their sum) over the searches so far."""
    n = max(1, self.num_queries)
    out = {f"{name}_ms": 1000 * s / n for name, s in self.timings.items()}
    out["total_ms"] = sum(out.values())
    return out

  def full_index_ms(self, num_items: int) -> float:
    """Milliseconds per query to cross-encode all `num_items` items instead, at the pair rate
    measured by the searches so far: the cost that re-ranking only the top `k` avoids."""
    if not self.num_pairs:
      raise ValueError("no pairs scored yet: search first")
    return 1000 * self.timings["rerank"] / self.num_pairs * num_items


# ----------------------------------------------------------------------------- the scorer


@dataclasses.dataclass
class CrossEncoderScorer:
  """A `models.cross_encoder.CrossEncoder` behind `PairScorer`.

  model, params: the network and its parameters.
  tokenizer: the word-piece tokenizer (`models.text.load_minilm`'s).
  item_texts: key -> the item's text (a paragraph; or the text read beside an image).
  item_features: key -> the item's image features `[P, image_dim]` (an image cross-encoder).
  max_length: word pieces per pair (longer pairs are cut, the longer side first).
  query_batch: queries per device call; their `k` pairs each go through in one jitted call,
    padded to `query_batch * k` pairs and to a multiple of 32 word pieces (few compilations).
  show_progress: a tqdm bar over the batches of a `score` call.
  """

  model: Any
  params: Any
  tokenizer: Any
  item_texts: Mapping[str, str] | None = None
  item_features: Mapping[str, np.ndarray] | None = None
  max_length: int = 256
  query_batch: int = 8
  show_progress: bool = False

  def __post_init__(self):
    if self.item_texts is None and self.item_features is None:
      raise ValueError("CrossEncoderScorer needs item_texts, item_features or both")

  def score(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """The pairs of all queries, flattened and cut into device calls of `query_batch` x the
    longest list pairs (one shape, full calls): a call costs its real pairs, also where most
    lists are short (e.g. the pairs a `CachedScorer` still lacks)."""
    if len(queries) != len(candidates):
      raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
    width = max((len(c) for c in candidates), default=0)
    pairs = [(q, key) for q, c in zip(queries, candidates) for key in c]
    chunk = self.query_batch * max(width, 1)
    starts = range(0, len(pairs), chunk)
    many = self.show_progress and len(starts) > 1
    logits = [np.zeros(0, np.float32)]
    for start in tqdm(starts, desc="cross-encoding", leave=False, disable=not many):
      part = pairs[start : start + chunk]
      num_real = len(part)
      part += [part[0]] * (chunk - num_real)  # one shape per batch size
      logits.append(self.score_pairs(part)[:num_real])
    flat = np.concatenate(logits)
    offsets = np.cumsum([0] + [len(c) for c in candidates])
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

  def pair_inputs(self, pairs: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
    """The network's inputs for (query text, item key) pairs."""
    return pair_inputs(
      self.tokenizer,
      [q for q, _ in pairs],
      [self.item_texts[key] for _, key in pairs] if self.item_texts is not None else None,
      np.stack([self.item_features[key] for _, key in pairs])
      if self.item_features is not None
      else None,
      max_length=self.max_length,
    )

  def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """Relevance logits `[len(pairs)]` of (query text, item key) pairs, in one jitted call."""
    inputs = self.pair_inputs(pairs)
    return np.asarray(_score(self.model, self.params, inputs), np.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _score(model, params, inputs: dict) -> jax.Array:
  return model.apply({"params": params}, **inputs)


def pair_inputs(
  tokenizer,
  queries: Sequence[str],
  item_texts: Sequence[str] | None = None,
  image_features: np.ndarray | None = None,
  *,
  max_length: int = 256,
  multiple: int = 32,
) -> dict[str, np.ndarray]:
  """Word pieces of `[CLS] query [SEP] item text [SEP]` (or `[CLS] query [SEP]` without item
  texts), token types 0 / 1, padded to a multiple of `multiple`; plus the image features.
  Pairs longer than `max_length` are cut, the longer side first."""
  from dsi_jax.models import text

  if item_texts is not None and len(item_texts) != len(queries):
    raise ValueError(f"{len(queries)} queries but {len(item_texts)} item texts")
  text.tokenize(tokenizer, [], max_length, multiple)  # sets truncation and padding
  if item_texts is None:
    encodings = tokenizer.encode_batch(list(queries))
  else:
    encodings = tokenizer.encode_batch(list(zip(queries, item_texts)))
  inputs = {
    "input_ids": np.asarray([e.ids for e in encodings], np.int32),
    "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
    "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32),
  }
  if image_features is not None:
    inputs["image_features"] = np.asarray(image_features, np.float32)
  return inputs


@dataclasses.dataclass
class CachedScorer:
  """A scorer that remembers every (query, key) score, so several first stages (and fusion
  weights) re-ranked on the same queries cross-encode each distinct pair once. Queries must
  be hashable (texts)."""

  scorer: PairScorer
  cache: dict = dataclasses.field(default_factory=dict)

  def score(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
    todo_q, todo_c = [], []
    for q, c in zip(queries, candidates):
      missing = [key for key in dict.fromkeys(c) if (q, key) not in self.cache]
      if missing:
        todo_q.append(q)
        todo_c.append(missing)
    for q, c, s in zip(todo_q, todo_c, self.scorer.score(todo_q, todo_c) if todo_q else []):
      self.cache.update({(q, key): float(v) for key, v in zip(c, s)})
    return [
      np.asarray([self.cache[(q, key)] for key in c], np.float32)
      for q, c in zip(queries, candidates)
    ]
