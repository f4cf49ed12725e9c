"""Vision Transformer encoder in the Scenic / big_vision parameter layout.

Parameter tree (so their `.npz` checkpoints map onto it name for name):
  embedding/{kernel,bias}                        patch projection (a strided conv)
  pos_embedding                                  only with posemb="learn"
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                               LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
  Transformer/encoder_norm

The seed recipe's defaults: fixed sinusoidal positions, width 128, MLP 256, depth 6,
4 heads, dropout 0.1. `load_vit_npz` reads big_vision / Scenic `.npz` checkpoints into that tree.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsi_jax.models.text import _one_line

log = logging.getLogger(__name__)

# Top-level entries of big_vision ViT checkpoints that this encoder has no place for: the
# classifier head, the [cls] token, the MAP pooling head and the pre-logits layer.
CHECKPOINT_HEADS = ("head", "cls", "MAPHead_0", "pre_logits")


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


def load_vit_npz(path: str | os.PathLike, template_params: Mapping[str, Any]) -> dict:
  """Reads a big_vision / Scenic ViT `.npz` checkpoint into this encoder's parameter tree.

  Args:
    path: the `.npz` file, flat '/'-joined keys as big_vision writes them, with or without a
      leading "params/" (when present, only the "params/" entries are read).
    template_params: the encoder's parameters, `model.init(...)["params"]` or its
      `jax.eval_shape`, boxed with partitioning metadata or not; only their names, shapes and
      dtypes are used.

  Returns:
    The checkpoint's parameters as a nested dict of numpy arrays, in the template's structure
    and dtypes. Heads the encoder lacks (`CHECKPOINT_HEADS`) are left out and logged.

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is not a readable `.npz` (no pickles are loaded), or a parameter is
      missing, unknown to the encoder, not floating point, or of another shape (a `pos_embedding`
      for another number of patches must be resampled first); the message names the file and
      the key.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  flat = _read_npz(path)
  if any(k.startswith("params/") for k in flat):
    flat = {k.removeprefix("params/"): v for k, v in flat.items() if k.startswith("params/")}

  expected = traverse_util.flatten_dict(nn.unbox(template_params), sep="/")
  params = {}
  for key, want in expected.items():
    if key not in flat:
      raise ValueError(f"{path}: missing parameter {key!r} (model shape {tuple(want.shape)})")
    got = flat[key]
    if key == "pos_embedding" and got.shape[::2] == want.shape[::2] and got.shape != want.shape:
      raise ValueError(
        f"{path}: 'pos_embedding' has {got.shape[1]} positions in the checkpoint, "
        f"{want.shape[1]} in the model (shapes {got.shape} vs {tuple(want.shape)}): another "
        "image or patch size; resample it or init the model at the checkpoint's size"
      )
    if got.shape != tuple(want.shape):
      raise ValueError(
        f"{path}: {key!r} has shape {got.shape} in the checkpoint, {tuple(want.shape)} in the model"
      )
    if got.dtype.kind != "f":
      raise ValueError(f"{path}: {key!r} has dtype {got.dtype}, expected floating point")
    params[key] = got.astype(want.dtype)

  unused = sorted(set(flat) - set(expected))
  heads = [k for k in unused if k.split("/")[0] in CHECKPOINT_HEADS]
  extra = [k for k in unused if k not in heads]
  if extra:
    raise ValueError(
      f"{path}: parameter {extra[0]!r} is not in the model ({len(extra)} such parameters; "
      "a deeper or different architecture?)"
    )
  if heads:
    log.info("%s: not loading %d head parameters: %s", path, len(heads), ", ".join(heads))
  return traverse_util.unflatten_dict(params, sep="/")


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` file by key, or a one-line ValueError naming the file."""
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError("a single .npy array, not an archive")
    with data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz checkpoint ({_one_line(e)})") from None
