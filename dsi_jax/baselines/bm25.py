"""BM25 over documents (bm25s, Lucene's variant), behind the retriever interface.

Text is lower-cased and split into word tokens with English stop words removed (bm25s'
tokenizer); k1 = 1.5, b = 0.75 by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BM25:
  """`BM25(texts, keys).search(queries, k)` -> ranked keys and scores per query."""

  def __init__(
    self, texts: Sequence[str], keys: Sequence[str], *, k1: float = 1.5, b: float = 0.75
  ):
    import bm25s

    if len(texts) != len(keys):
      raise ValueError(f"{len(texts)} documents but {len(keys)} keys")
    if not texts:
      raise ValueError("BM25 needs at least one document")
    self.keys = list(keys)
    self._bm25s = bm25s
    self._index = bm25s.BM25(k1=k1, b=b)
    self._index.index(bm25s.tokenize(list(texts), show_progress=False), show_progress=False)

  def search(self, queries: Sequence[str], k: int) -> tuple[list[list[str]], list[np.ndarray]]:
    k = min(k, len(self.keys))
    tokens = self._bm25s.tokenize(list(queries), show_progress=False)
    rows, scores = self._index.retrieve(tokens, k=k, show_progress=False)
    ranked = []
    for row, score in zip(rows, scores):
      # Documents sharing no word with the query score 0: they are not retrieved.
      ranked.append([self.keys[int(j)] for j, s in zip(row, score) if s > 0])
    return ranked, [s[: len(r)] for s, r in zip(scores, ranked)]
