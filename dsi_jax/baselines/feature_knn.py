"""Nearest neighbours on the features of a frozen pretrained image tower (DINOv2): the honest
index-then-retrieve reference once a pretrained tower exists.

`TowerFeatures` runs the tower once over a batch of images and returns pooled features of
any of its blocks (the CLS token or the mean of the patch tokens); `FeatureKNN` ranks indexed
images by the cosine similarity of those features to the query's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dsi_jax.baselines.pixel_knn import PixelKNN
from dsi_jax.data import inputs as inputs_lib
from dsi_jax.data.images import resize_square

POOLS = ("cls", "mean")


class TowerFeatures:
  """Pooled features of a frozen DINOv2 tower.

  Args:
    kwargs, params: the tower (`dsi_jax.importers.dinov2.load_onnx` / `load_hf`).
    size: images are resized to this side (a multiple of the patch size) before the tower.
    batch_size: images per jitted call.
  """

  def __init__(self, kwargs: dict, params: Any, *, size: int = 224, batch_size: int = 32):
    from dsi_jax.models import dinov2

    if size % kwargs.get("patch_size", 14):
      raise ValueError(f"size {size} is not a multiple of the patch size {kwargs['patch_size']}")
    self.net = dinov2.DINOv2(**kwargs)
    self.params = params
    self.size = size
    self.batch_size = batch_size
    self.depth = kwargs.get("output_block") or kwargs["depth"]
    self.registers = kwargs.get("num_registers", 0)

    def pooled(params, images):
      _, aux = self.net.apply({"params": params}, images)
      first = 1 + self.registers
      layers = {f"block{i + 1}": aux[f"block{i:02d}"] for i in range(self.depth)}
      layers["final"] = aux["encoded"]
      return {
        name: {"cls": x[:, 0], "mean": x[:, first:].mean(axis=1)} for name, x in layers.items()
      }

    self._pooled = jax.jit(pooled)

  def prepare(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[n, h, w]` or `[n, h, w, 1 | 3]` -> float32 `[n, size, size, 3]` in [-1, 1]."""
    images = resize_square(images, self.size)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    return inputs_lib.image_inputs(images)

  def __call__(self, images: np.ndarray, *, show_progress: bool = False) -> dict:
    """`{layer: {"cls" | "mean": float32 [n, width]}}` for layers "block1".."blockN", "final"."""
    out: dict = {}
    starts = range(0, len(images), self.batch_size)
    for start in tqdm(starts, desc="tower features", disable=not show_progress, leave=False):
      batch = self.prepare(images[start : start + self.batch_size])
      pad = self.batch_size - len(batch)  # one shape: one compilation
      batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
      pooled = jax.device_get(self._pooled(self.params, jnp.asarray(batch)))
      for layer, pools in pooled.items():
        for pool, x in pools.items():
          rows = np.asarray(x, np.float32)[: self.batch_size - pad]
          out.setdefault(layer, {}).setdefault(pool, []).append(rows)
    return {
      layer: {pool: np.concatenate(xs) for pool, xs in pools.items()}
      for layer, pools in out.items()
    }


class FeatureKNN:
  """Ranks indexed images by the cosine similarity of one layer's pooled tower features.

  Args:
    features: a `TowerFeatures`.
    index_images: the images to retrieve (uint8, any size).
    keys: their keys, in the same order.
    layer: "block1".."blockN" or "final"; pool: "cls" or "mean".
  """

  def __init__(
    self,
    features: TowerFeatures,
    index_images: np.ndarray,
    keys: Sequence[str],
    *,
    layer: str = "final",
    pool: str = "cls",
  ):
    if pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    self.features, self.layer, self.pool = features, layer, pool
    self.keys = list(keys)
    self.knn = PixelKNN(self._encode(index_images), keys)

  def _encode(self, images: np.ndarray) -> np.ndarray:
    layers = self.features(images)
    if self.layer not in layers:
      raise ValueError(f"unknown layer {self.layer!r}; known: {', '.join(layers)}")
    return layers[self.layer][self.pool]

  def search(self, queries: np.ndarray, k: int):
    """Top-`k` keys and cosine scores for each query image."""
    return self.knn.search(self._encode(queries), k)
