"""Vision Transformer encoder in the Scenic / big_vision parameter layout.

Parameter tree (so their `.npz` checkpoints map onto it name for name):
  embedding/{kernel,bias}                        patch projection (a strided conv)
  pos_embedding                                  only with posemb="learn"
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                               LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
  Transformer/encoder_norm

The seed recipe's defaults: fixed sinusoidal positions, width 128, MLP 256, depth 6,
4 heads, dropout 0.1.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embeddings, `[1, h * w, width]` (as in big_vision)."""
  if width % 4:
    raise ValueError(f"width must be a multiple of 4 for sincos2d, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1)
  omega = 1.0 / (temperature**omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):  # [batch, length, width]
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return nn.Dense(width, dtype=self.dtype)(x)


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):  # [batch, length, width]
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(
      y, y, deterministic=deterministic
    )
    x = x + nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype)(y, deterministic=deterministic)
    return x + nn.Dropout(self.dropout)(y, deterministic=deterministic)


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    aux = {}
    for i in range(self.depth):
      x = Encoder1DBlock(
        self.mlp_dim, self.num_heads, self.dropout, self.dtype, name=f"encoderblock_{i}"
      )(x, deterministic=deterministic)
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
      aux[f"block{i:02d}"] = x
    return nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x), aux


class ViT(nn.Module):
  """ViT encoder: images `[batch, h, w, c]` -> tokens `[batch, patches, width]`, aux dict."""

  patch_size: int = 4
  width: int = 128
  depth: int = 6
  mlp_dim: int = 256
  num_heads: int = 4
  dropout: float = 0.1
  posemb: str = "sincos2d"  # or "learn"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of patch size {p}")
    x = nn.Conv(
      self.width, (p, p), strides=(p, p), padding="VALID", name="embedding", dtype=self.dtype
    )(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.posemb == "sincos2d":
      x = x + posemb_sincos_2d(h, w, c).astype(x.dtype)
    elif self.posemb == "learn":
      pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, h * w, c))
      x = x + pe.astype(x.dtype)
    else:
      raise ValueError(f"unknown posemb {self.posemb!r}: use 'sincos2d' or 'learn'")
    aux = {"stem": x}
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x, blocks = Encoder(
      self.depth, self.mlp_dim, self.num_heads, self.dropout, self.dtype, name="Transformer"
    )(x, deterministic=not train)
    aux.update(blocks)
    aux["encoded"] = x
    return x, aux
