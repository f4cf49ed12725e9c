"""Bag of Visual Words: SIFT descriptors quantised by k-means, compared as word histograms."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import cv2
import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from tqdm.auto import tqdm

from dsi_jax.retrieval import topk_keys

_EPS = 1e-12
_DESCRIPTOR_DIM = 128
# Above this many descriptors, MiniBatchKMeans replaces full KMeans.
MINIBATCH_THRESHOLD = 50_000
# Progress bars are shown from this many images on (unless `progress` says otherwise).
PROGRESS_MIN_IMAGES = 100


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
  """Converts one image to a 2-D uint8 grayscale array `[height, width]`.

  Args:
    image: `[height, width]`, `[height, width, 1]`, RGB `[height, width, 3]` or RGBA
      `[height, width, 4]`. uint8 is used as is; float images are taken to be in [0, 1];
      other integer types are clipped to 0..255.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    if np.issubdtype(image.dtype, np.floating):
      image = np.clip(np.rint(image * 255.0), 0, 255)
    else:
      image = np.clip(image, 0, 255)
    image = image.astype(np.uint8)
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[:, :, 0]
  elif image.ndim == 3 and image.shape[2] == 3:
    image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
  elif image.ndim == 3 and image.shape[2] == 4:
    image = cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
  elif image.ndim != 2:
    raise ValueError(f"expected a [h, w] or [h, w, 1|3|4] image, got shape {image.shape}")
  return np.ascontiguousarray(image)


def upscale(image: np.ndarray, min_size: int) -> np.ndarray:
  """Bicubically upscales a `[height, width]` image so its short side is at least `min_size`."""
  height, width = image.shape[:2]
  short = min(height, width)
  if short >= min_size:
    return image
  scale = min_size / short
  size = (max(min_size, round(width * scale)), max(min_size, round(height * scale)))  # (w, h)
  return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)


class BoVW:
  """Bag-of-Visual-Words retriever.

  `fit` learns a vocabulary of `num_words` visual words by k-means over the SIFT descriptors
  of the indexed images and describes each image by its L2-normalised word-count histogram
  (optionally idf weighted); `search` ranks the indexed images by cosine similarity.

  An image in which SIFT finds no keypoint gets an all-zero histogram: its similarity to
  everything is 0 (never NaN). Such images are counted in `num_empty` and reported with a
  warning.

  Args:
    num_words: Vocabulary size (fewer if there are fewer descriptors than words).
    min_size: Images whose short side is smaller are upscaled (bicubic) to it first.
    seed: Seed of the k-means initialisation.
    idf: Whether to weight word counts by smoothed inverse document frequency.
    max_keypoints: Keep at most this many (strongest) keypoints per image; 0 keeps all.
    progress: Show tqdm bars over images; `None` shows them from 100 images on.

  Attributes:
    num_empty: Number of images (index and queries) in which no keypoint was found.
    num_empty_index: Of those, how many were indexed images.
    vocabulary: float32 `[num_words_used, 128]` cluster centres, after `fit`.
  """

  def __init__(
    self,
    num_words: int = 200,
    min_size: int = 64,
    seed: int = 0,
    *,
    idf: bool = False,
    max_keypoints: int = 0,
    progress: bool | None = None,
  ):
    if num_words < 1:
      raise ValueError(f"num_words must be positive, got {num_words}")
    self.num_words = num_words
    self.min_size = min_size
    self.seed = seed
    self.use_idf = idf
    self.max_keypoints = max_keypoints
    self.progress = progress
    self._sift = cv2.SIFT_create(nfeatures=max_keypoints)
    self.num_empty = 0
    self.num_empty_index = 0
    self.kmeans: KMeans | MiniBatchKMeans | None = None
    self.vocabulary: np.ndarray | None = None
    self.idf: np.ndarray | None = None
    self.keys: list[str] = []
    self.index_histograms: np.ndarray | None = None

  def descriptors(self, image: np.ndarray) -> np.ndarray:
    """SIFT descriptors float32 `[num_keypoints, 128]` of one image (`[0, 128]` if none)."""
    gray = upscale(to_gray_uint8(image), self.min_size)
    _, desc = self._sift.detectAndCompute(gray, None)
    if desc is None:
      return np.zeros((0, _DESCRIPTOR_DIM), dtype=np.float32)
    return desc.astype(np.float32, copy=False)

  def _extract(self, images: np.ndarray, what: str) -> list[np.ndarray]:
    """Descriptors of each image; counts and warns about images without keypoints."""
    disable = (len(images) < PROGRESS_MIN_IMAGES) if self.progress is None else not self.progress
    bar = tqdm(images, desc=f"SIFT ({what})", leave=False, disable=disable)
    result = [self.descriptors(image) for image in bar]
    empty = sum(len(d) == 0 for d in result)
    if empty:
      self.num_empty += empty
      warnings.warn(
        f"BoVW: SIFT found no keypoints in {empty} of {len(images)} {what} images; their "
        "histograms are all zero (similarity 0 to everything)",
        RuntimeWarning,
        stacklevel=3,
      )
    return result

  def _histograms(self, descriptors: list[np.ndarray]) -> np.ndarray:
    """Weighted, L2-normalised word histograms float32 `[num_images, num_words_used]`."""
    assert self.kmeans is not None and self.vocabulary is not None
    num_words = len(self.vocabulary)
    counts = np.zeros((len(descriptors), num_words), dtype=np.float32)
    lengths = np.array([len(d) for d in descriptors], dtype=np.int64)
    if lengths.sum():
      words = self.kmeans.predict(np.concatenate(descriptors))
      owner = np.repeat(np.arange(len(descriptors)), lengths)
      np.add.at(counts, (owner, words), 1.0)
    if self.idf is not None:
      counts *= self.idf
    norms = np.linalg.norm(counts, axis=1, keepdims=True)
    return counts / np.maximum(norms, _EPS)

  def fit(self, index_images: np.ndarray, keys: Sequence[str]) -> BoVW:
    """Learns the vocabulary from the indexed images and indexes them.

    Args:
      index_images: `[num_items, height, width]` or `[num_items, height, width, channels]`.
      keys: The `num_items` item keys, in the same order.

    Returns:
      self.

    Raises:
      ValueError: If lengths differ or no index image has any keypoint.
    """
    if len(index_images) != len(keys):
      raise ValueError(f"{len(index_images)} index images but {len(keys)} keys")
    before = self.num_empty
    descriptors = self._extract(index_images, "index")
    self.num_empty_index = self.num_empty - before
    stacked = np.concatenate(descriptors) if descriptors else np.zeros((0, _DESCRIPTOR_DIM))
    if len(stacked) == 0:
      raise ValueError("SIFT found no keypoints in any index image; cannot build a vocabulary")
    num_clusters = min(self.num_words, len(stacked))
    if len(stacked) > MINIBATCH_THRESHOLD:
      self.kmeans = MiniBatchKMeans(
        n_clusters=num_clusters, n_init=3, batch_size=4096, random_state=self.seed
      )
    else:
      self.kmeans = KMeans(n_clusters=num_clusters, n_init=1, random_state=self.seed)
    with warnings.catch_warnings():
      # Fewer distinct descriptors than clusters only happens on toy inputs.
      warnings.filterwarnings("ignore", message="Number of distinct clusters")
      self.kmeans.fit(stacked)
    self.vocabulary = self.kmeans.cluster_centers_.astype(np.float32)
    self.idf = None  # So `_histograms` below gives unweighted histograms.
    if self.use_idf:
      present = self._histograms(descriptors) > 0
      df = present.sum(axis=0)
      n = len(descriptors)
      self.idf = (np.log((n + 1) / (df + 1)) + 1.0).astype(np.float32)
    self.keys = list(keys)
    self.index_histograms = self._histograms(descriptors)
    return self

  def encode(self, images: np.ndarray) -> np.ndarray:
    """Histograms float32 `[num_images, num_words_used]` of images (after `fit`)."""
    if self.kmeans is None:
      raise RuntimeError("BoVW.fit must be called before encode/search")
    return self._histograms(self._extract(images, "query"))

  def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """Top-`k` indexed keys and cosine scores for each query image `[num_queries, ...]`."""
    histograms = self.encode(queries)
    scores = histograms @ self.index_histograms.T  # [num_queries, num_items]
    return topk_keys(scores, self.keys, k)

  @property
  def num_words_used(self) -> int:
    """The vocabulary size actually learnt (0 before `fit`)."""
    return 0 if self.vocabulary is None else len(self.vocabulary)
