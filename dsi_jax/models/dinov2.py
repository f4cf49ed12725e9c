"""DINOv2 ViT (Oquab et al., 2023) in Flax: layer scale, optional register tokens, CLS + patch
tokens, position embeddings resized to any image size as the reference resizes them.

Parameter tree (big_vision names where the layers are the same, so `partitioning.PARAM_AXES`
covers it; `dsi_jax.importers.dinov2` fills it from Hugging Face or ONNX checkpoints):
  embedding/{kernel,bias}                       patch projection (a strided conv)
  cls_token [1, 1, width], pos_embedding [1, 1 + grid * grid, width]
  register_tokens [1, registers, width]         only with registers
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                               LayerScale_0/scale, LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1},
                               LayerScale_1/scale
  Transformer/encoder_norm

Inputs are the project's images: `[batch, h, w, 1 or 3]` in [-1, 1] (grayscale is repeated to
RGB); the tower maps them to [0, 1] and normalises with ImageNet's mean and std, as DINOv2 was
trained. `h` and `w` must be multiples of the patch size (14 for the released models).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a`."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """`[out_size, in_size]` weights of 1-D bicubic resampling, as PyTorch's `interpolate(...,
  size=..., mode="bicubic", align_corners=False)` computes them (half-pixel centres, edge
  samples repeated) and ONNX `Resize` (cubic, half_pixel, a = -0.75) does.

  antialias=False: Keys' kernel with a = -0.75 at the 4 nearest samples.
  antialias=True: PyTorch's `antialias=True` (PIL's filter, a = -0.5, stretched by the scale
  when shrinking, weights normalised), used by DINOv2 with registers.
  """
  scale = in_size / out_size
  centres = (np.arange(out_size) + 0.5) * scale
  weights = np.zeros((out_size, in_size), np.float64)
  if not antialias:
    src = centres - 0.5
    base = np.floor(src).astype(int)
    frac = src - base
    for offset in (-1, 0, 1, 2):
      index = np.clip(base + offset, 0, in_size - 1)
      np.add.at(weights, (np.arange(out_size), index), _cubic(frac - offset, -0.75))
    return weights
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  for i, centre in enumerate(centres):
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), in_size)
    taps = _cubic((np.arange(lo, hi) - centre + 0.5) * inv, -0.5)
    weights[i, lo:hi] = taps / taps.sum()
  return weights


def resize_grid(grid: jnp.ndarray, height: int, width: int, antialias: bool = False):
  """Bicubically resizes `[h, w, channels]` to `[height, width, channels]` (see
  `bicubic_matrix`); in float32, as the reference does."""
  rows = bicubic_matrix(grid.shape[0], height, antialias).astype(np.float32)
  cols = bicubic_matrix(grid.shape[1], width, antialias).astype(np.float32)
  grid = grid.astype(jnp.float32)
  return jnp.einsum("ph,qw,hwc->pqc", rows, cols, grid, precision="highest")


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(width, dtype=self.dtype)(x)


class LayerScale(nn.Module):
  init_value: float = 1.0

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * scale.astype(x.dtype)


class Block(nn.Module):
  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  layerscale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
    y = norm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
    x = x + LayerScale(self.layerscale)(y)
    y = MlpBlock(self.mlp_dim, self.dtype)(norm()(x))
    return x + LayerScale(self.layerscale)(y)


class DINOv2(nn.Module):
  """Images `[batch, h, w, c]` in [-1, 1] -> tokens `[batch, 1 + registers + patches, width]`
  (CLS first, then registers, then patches in row order) and an aux dict.

  aux: "stem" (embeddings with positions), "block{i:02d}" (each block's output), "cls" and
  "patch_mean" (of the returned tokens). output_block: stop after this many blocks (the later
  blocks are not built); final_norm: apply the final LayerNorm to the returned tokens.
  """

  patch_size: int = 14
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  grid: int = 37  # the position embeddings' side (518 px / 14 for the released models)
  num_registers: int = 0
  layer_norm_eps: float = 1e-6
  layerscale: float = 1.0
  antialias_posemb: bool = False  # True for DINOv2 with registers (as the reference resizes)
  output_block: int | None = None
  final_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # no dropout or stochastic depth at inference; the tower is used frozen
    p = self.patch_size
    n, h, w, c = images.shape
    if h % p or w % p:
      raise ValueError(f"image size {(h, w)} is not a multiple of patch size {p}")
    if c == 1:
      images = jnp.repeat(images, 3, axis=-1)
    elif c != 3:
      raise ValueError(f"images must have 1 or 3 channels, got {c}")
    mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
    std = jnp.asarray(IMAGENET_STD, images.dtype)
    x = ((images + 1.0) / 2.0 - mean) / std
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    gh, gw = h // p, w // p
    x = x.reshape(n, gh * gw, self.width).astype(self.dtype)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", init, (1, 1, self.width))
    pos = self.param("pos_embedding", init, (1, 1 + self.grid * self.grid, self.width))
    patch_pos = resize_grid(
      pos[0, 1:].reshape(self.grid, self.grid, self.width), gh, gw, self.antialias_posemb
    ).reshape(1, gh * gw, self.width)
    x = jnp.concatenate([jnp.broadcast_to(cls + pos[:, :1], (n, 1, self.width)), x + patch_pos], 1)
    if self.num_registers:
      registers = self.param("register_tokens", init, (1, self.num_registers, self.width))
      registers = jnp.broadcast_to(registers, (n, self.num_registers, self.width))
      x = jnp.concatenate([x[:, :1], registers.astype(x.dtype), x[:, 1:]], 1)
    aux = {"stem": x}
    depth = self.depth if self.output_block is None else self.output_block
    if not 1 <= depth <= self.depth:
      raise ValueError(f"output_block must be in 1..{self.depth}, got {self.output_block}")
    x = Transformer(
      depth,
      int(self.width * self.mlp_ratio),
      self.num_heads,
      self.layer_norm_eps,
      self.layerscale,
      self.final_norm,
      self.dtype,
      name="Transformer",
    )(x, aux)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    aux["encoded"] = x
    aux["cls"] = x[:, 0]
    aux["patch_mean"] = x[:, 1 + self.num_registers :].mean(axis=1)
    return x, aux


class Transformer(nn.Module):
  """Blocks `start` .. `depth - 1` (named by their index in the whole tower), then the final
  LayerNorm if `final_norm`."""

  depth: int
  mlp_dim: int
  num_heads: int
  layer_norm_eps: float
  layerscale: float
  final_norm: bool
  dtype: Any = jnp.float32
  start: int = 0

  @nn.compact
  def __call__(self, x, aux):
    for i in range(self.start, self.depth):
      x = Block(
        self.mlp_dim,
        self.num_heads,
        self.layer_norm_eps,
        self.layerscale,
        self.dtype,
        name=f"encoderblock_{i}",
      )(x)
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
      aux[f"block{i:02d}"] = x
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="encoder_norm", dtype=self.dtype)(x)
    return x


class DINOv2Tail(nn.Module):
  """The last blocks of a DINOv2, `start` .. `depth - 1` (and the final LayerNorm if
  `final_norm`), on the tokens after block `start` of the same tower: the trainable part of a
  partly frozen tower whose first `start` blocks ran once (`DINOv2(output_block=start,
  final_norm=False)`). Parameters under `Transformer/`, named as in the whole tower."""

  start: int
  depth: int
  width: int = 384
  num_heads: int = 6
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  layerscale: float = 1.0
  final_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    del train
    aux: dict = {}
    x = Transformer(
      self.depth,
      int(self.width * self.mlp_ratio),
      self.num_heads,
      self.layer_norm_eps,
      self.layerscale,
      self.final_norm,
      self.dtype,
      self.start,
      name="Transformer",
    )(tokens.astype(self.dtype), aux)
    return x, aux
