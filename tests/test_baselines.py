"""Tests for the classic retrieval baselines: raw-pixel kNN and Bag of Visual Words."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from dsi_jax.baselines.bovw import BoVW, to_gray_uint8, upscale
from dsi_jax.baselines.pixel_knn import PixelKNN
from dsi_jax.retrieval import Retriever

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _shapes(num: int, size: int = 32, seed: int = 0) -> np.ndarray:
  """Synthetic uint8 images `[num, size, size]`, each with a few random shapes and lines."""
  rng = np.random.default_rng(seed)
  images = np.zeros((num, size, size), dtype=np.uint8)
  for image in images:
    for _ in range(3):
      x0, y0, x1, y1 = (int(v) for v in rng.integers(2, size - 2, 4))
      colour = int(rng.integers(100, 256))
      kind = rng.integers(3)
      if kind == 0:
        cv2.rectangle(image, (x0, y0), (x1, y1), colour, -1)
      elif kind == 1:
        cv2.circle(image, (x0, y0), int(rng.integers(3, size // 3)), colour, 2)
      else:
        cv2.line(image, (x0, y0), (x1, y1), colour, 2)
  return images


def _keys(n: int) -> list[str]:
  return [f"item-{i:06d}" for i in range(n)]


# --------------------------------------------------------------------------------------------
# PixelKNN.


def test_pixel_knn_self_first_and_scores():
  images = _shapes(30)
  keys = _keys(30)
  knn: Retriever = PixelKNN(images, keys)
  ranked, scores = knn.search(images, 5)
  assert [r[0] for r in ranked] == keys
  assert all(len(r) == 5 and len(set(r)) == 5 for r in ranked)
  for s in scores:
    assert s[0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(s) <= 1e-7)


def test_pixel_knn_zero_image_and_k_clipped():
  images = _shapes(6)
  images[2] = 0  # A blank indexed image.
  knn = PixelKNN(images, _keys(6))
  queries = np.concatenate([np.zeros((1, 32, 32), np.uint8), images[:1]])
  ranked, scores = knn.search(queries, 100)
  assert [len(r) for r in ranked] == [6, 6]
  assert all(np.all(np.isfinite(s)) for s in scores)
  np.testing.assert_array_equal(scores[0], 0.0)
  assert ranked[1][0] == "item-000000"


def test_pixel_knn_rgb_and_shape_check():
  rgb = np.stack([_shapes(5, seed=1)] * 3, axis=-1)
  knn = PixelKNN(rgb, _keys(5))
  assert [r[0] for r in knn.search(rgb, 1)[0]] == _keys(5)
  with pytest.raises(ValueError):
    knn.search(rgb[..., 0], 1)


# --------------------------------------------------------------------------------------------
# BoVW.


def test_preprocessing():
  gray = _shapes(1, size=28)[0]
  assert upscale(gray, 64).shape == (64, 64)
  assert upscale(np.zeros((28, 56), np.uint8), 64).shape == (64, 128)
  assert upscale(gray, 16) is gray
  rgb = np.stack([gray] * 3, axis=-1)
  np.testing.assert_array_equal(to_gray_uint8(rgb), gray)
  np.testing.assert_array_equal(to_gray_uint8(gray[..., None]), gray)
  np.testing.assert_array_equal(to_gray_uint8(gray / 255.0), gray)


def _check_self_retrieval(images: np.ndarray) -> BoVW:
  keys = _keys(len(images))
  bovw = BoVW(num_words=50, seed=0).fit(images, keys)
  assert bovw.num_words_used == 50
  ranked, scores = bovw.search(images, 3)
  assert all(np.all(np.isfinite(s)) for s in scores)
  self_at_1 = np.mean([r[0] == k for r, k in zip(ranked, keys)])
  assert self_at_1 >= 0.8, self_at_1
  return bovw


def test_bovw_self_retrieval_synthetic():
  _check_self_retrieval(_shapes(40))


def test_bovw_self_retrieval_fashion_mnist():
  if not os.path.isdir(FASHION_DIR):
    pytest.skip(f"{FASHION_DIR} not installed")
  from dsi_jax.data.fashion_mnist import load_fashion_mnist

  images, _ = load_fashion_mnist("test", FASHION_DIR)
  bovw = _check_self_retrieval(images[:40])
  assert bovw.num_empty == 0  # Upscaled to 64 px, every item has keypoints.


def test_bovw_blank_query_and_k_clipped():
  images = _shapes(12)
  bovw = BoVW(num_words=20).fit(images, _keys(12))
  assert bovw.num_empty == 0
  queries = np.concatenate([np.zeros((1, 32, 32), np.uint8), images[:1]])
  with pytest.warns(RuntimeWarning, match="no keypoints"):
    ranked, scores = bovw.search(queries, 50)
  assert bovw.num_empty == 1
  assert [len(r) for r in ranked] == [12, 12]
  assert np.all(np.isfinite(scores[0])) and np.all(scores[0] == 0.0)
  assert ranked[0] == _keys(12)  # All ties: item order.
  assert ranked[1][0] == "item-000000"


def test_bovw_blank_index_image_idf_and_rgb():
  images = _shapes(12, seed=5)
  images[3] = 0
  rgb = np.stack([images] * 3, axis=-1)
  with pytest.warns(RuntimeWarning, match="no keypoints"):
    bovw = BoVW(num_words=20, idf=True).fit(rgb, _keys(12))
  assert bovw.num_empty == 1 and bovw.num_empty_index == 1
  np.testing.assert_array_equal(bovw.index_histograms[3], 0.0)
  ranked, scores = bovw.search(rgb[:2], 12)
  assert all(np.all(np.isfinite(s)) for s in scores)
  assert [r[0] for r in ranked] == _keys(2)


def test_bovw_errors():
  with pytest.raises(RuntimeError):
    BoVW().search(_shapes(1), 1)
  with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no keypoints"):
    BoVW().fit(np.zeros((3, 28, 28), np.uint8), _keys(3))


def test_bovw_few_descriptors_caps_vocabulary():
  images = _shapes(2)
  bovw = BoVW(num_words=10_000).fit(images, _keys(2))
  num_descriptors = sum(len(bovw.descriptors(image)) for image in images)
  assert num_descriptors < 10_000
  assert bovw.num_words_used == num_descriptors
  assert bovw.vocabulary.shape == (bovw.num_words_used, 128)


# --------------------------------------------------------------------------------------------
# BM25 (bm25s).


def test_bm25_ranks_documents_by_shared_rare_words():
  from dsi_jax.baselines.bm25 import BM25

  docs = {
    "cats": "The cat sat on the mat. Cats purr and chase mice.",
    "dogs": "Dogs bark loudly at the mail carrier and chase cars.",
    "jax": "JAX compiles numerical Python programs with XLA for accelerators.",
  }
  bm25 = BM25(list(docs.values()), list(docs))
  ranked, scores = bm25.search(["why do cats purr", "XLA compiles programs", "quantum gravity"], 3)
  assert ranked[0][0] == "cats" and ranked[1][0] == "jax"
  assert ranked[2] == []  # no shared word: nothing retrieved, not a guess
  assert np.all(np.diff(scores[0]) <= 0)
  with pytest.raises(ValueError, match="2 documents but 1 keys"):
    BM25(["a b", "c d"], ["only"])
