"""Nearest neighbours on raw pixels: the simplest image retrieval baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dsi_jax.retrieval import topk_keys

_EPS = 1e-8


def _normalised_pixels(images: np.ndarray) -> np.ndarray:
  """Flattens `[num, ...]` images to float32 `[num, dim]` rows of unit L2 norm (zeros stay 0)."""
  flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
  norms = np.linalg.norm(flat, axis=1, keepdims=True)
  return flat / np.maximum(norms, _EPS)


class PixelKNN:
  """Ranks indexed images by the cosine similarity of their pixels to the query's.

  Args:
    index_images: The images to retrieve, `[num_items, height, width]` or
      `[num_items, height, width, channels]`.
    keys: The `num_items` item keys, in the same order.
  """

  def __init__(self, index_images: np.ndarray, keys: Sequence[str]):
    if len(index_images) != len(keys):
      raise ValueError(f"{len(index_images)} index images but {len(keys)} keys")
    self.keys = list(keys)
    self.shape = tuple(np.shape(index_images)[1:])
    self.index = _normalised_pixels(index_images)  # [num_items, dim]

  def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """Top-`k` keys and cosine scores for each query image `[num_queries, ...]` (shape as index)."""
    if tuple(np.shape(queries)[1:]) != self.shape:
      raise ValueError(f"query images must be [num, {self.shape}], got {np.shape(queries)}")
    scores = _normalised_pixels(queries) @ self.index.T  # [num_queries, num_items]
    return topk_keys(scores, self.keys, k)
