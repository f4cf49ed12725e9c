"""Docid decoder: a small causal transformer that cross-attends to the query's encoding.

Training runs it teacher-forced on whole ids; decoding runs it one token at a time with a
key/value cache (flax's `decode=True` attention, initialised by one call on full-length
input), which `decoding.beam_search` reorders between beams.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsi_jax.models.vit import MlpBlock

# Where `embedding_ids` is set, the first id position's logits start as this many times the
# cosine of query and item embeddings (sentence-transformers' MultipleNegativesRankingLoss
# scale); the scale is learned from there.
ID_SCALE = 20.0

# Logical axes of the decoder's hidden states (`dsi_jax.partitioning` maps them to the mesh).
ACTIVATION_AXES = ("batch", "candidates", "length", "embed")


class DecoderBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, encoded, *, self_mask, encoder_mask, deterministic: bool, decode: bool):
    # x: [batch, candidates, length, width]; encoded: [batch, patches, enc_width]
    b, c, length, width = x.shape
    y = nn.LayerNorm(dtype=self.dtype)(x).reshape(b * c, length, width)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads, dtype=self.dtype, decode=decode, name="SelfAttention"
    )(y, y, mask=self_mask, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout)(y.reshape(x.shape), deterministic=deterministic)
    # Cross-attention: every position of every candidate attends to the same encoding, so
    # the candidates ride along the query axis and keys/values are projected once per query.
    y = nn.LayerNorm(dtype=self.dtype)(x).reshape(b, c * length, width)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads, dtype=self.dtype, name="CrossAttention"
    )(y, encoded, mask=encoder_mask, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout)(y.reshape(x.shape), deterministic=deterministic)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype)(y, deterministic=deterministic)
    return x + nn.Dropout(self.dropout)(y, deterministic=deterministic)


class DocidDecoder(nn.Module):
  """Id tokens + the query's encoding -> next-token logits.

  decoder_input_tokens: `[batch, length]`, or `[batch, candidates, length]` to run several
  ids (beams, or every id of the corpus) against each query's encoding `[batch, patches, d]`
  without copying the encoding. Returns logits `[..., length, vocab]` of the same leading
  shape.

  embedding_ids: atomic ids that start from embeddings (IncDSI's view of an atomic id as an
  output row, here a row of the query encoder's space). The first id position's logits gain
  `scale * cos(pooled query encoding, id_embedding[token])`, `id_embedding` `[vocab, d]` a
  row per id token (`DSIModel.ids_from_embeddings` fills it with the items' embeddings;
  special tokens keep zero rows) and `scale` learned (from `ID_SCALE`). The decoder's own
  output layer then starts at zero, so an untrained model ranks exactly as the embeddings do,
  and training improves on that ranking.
  """

  vocab_size: int
  max_length: int
  width: int = 128
  depth: int = 3
  mlp_dim: int = 256
  num_heads: int = 4
  dropout: float = 0.1
  dtype: Any = jnp.float32
  embedding_ids: bool = False

  @nn.compact
  def __call__(
    self,
    encoded,
    decoder_input_tokens,
    *,
    encoder_mask=None,
    train: bool = False,
    decode: bool = False,
  ):
    squeeze = decoder_input_tokens.ndim == 2
    tokens = decoder_input_tokens[:, None] if squeeze else decoder_input_tokens
    batch, cands, length = tokens.shape
    x = nn.Embed(self.vocab_size, self.width, name="token_embedder")(tokens)
    pos = self.param(
      "pos_embedding", nn.initializers.normal(stddev=0.02), (1, self.max_length, self.width)
    )
    first = jnp.arange(length) == 0  # which positions are an id's first token
    if decode:
      # One token per call: its position is a counter kept in the cache.
      is_init = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      if is_init:
        x = x + jnp.take(pos[0], position.value, axis=0)
        first = (position.value == 0)[None]
        position.value = position.value + 1
      else:
        x = x + pos[:, :length]
      self_mask = None
    else:
      x = x + pos[:, :length]
      self_mask = nn.make_causal_mask(tokens.reshape(batch * cands, length))
    x = nn.with_logical_constraint(x.astype(self.dtype), ACTIVATION_AXES)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    cross_mask = None
    if encoder_mask is not None:  # [batch, patches] bool
      cross_mask = nn.make_attention_mask(jnp.ones((batch, cands * length), bool), encoder_mask)
    for i in range(self.depth):
      x = DecoderBlock(self.mlp_dim, self.num_heads, self.dropout, self.dtype, name=f"block_{i}")(
        x,
        encoded,
        self_mask=self_mask,
        encoder_mask=cross_mask,
        deterministic=not train,
        decode=decode,
      )
      x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    x = nn.LayerNorm(name="decoder_norm", dtype=self.dtype)(x)
    init = nn.initializers.zeros if self.embedding_ids else nn.initializers.lecun_normal()
    logits = nn.Dense(self.vocab_size, name="logits", dtype=jnp.float32, kernel_init=init)(x)
    if self.embedding_ids:
      rows = self.param("id_embedding", nn.initializers.zeros, (self.vocab_size, encoded.shape[-1]))
      log_scale = self.param("id_log_scale", nn.initializers.constant(math.log(ID_SCALE)), ())
      query = unit(pool(encoded, encoder_mask))  # [batch, d]
      sim = jnp.exp(log_scale) * query.astype(jnp.float32) @ unit(rows).T  # [batch, vocab]
      logits = logits + jnp.where(first[:, None], sim[:, None, None, :], 0.0)
    logits = nn.with_logical_constraint(logits, ("batch", "candidates", "length", "vocab"))
    return logits[:, 0] if squeeze else logits


def pool(encoded, mask=None):
  """`[batch, d]`: the mean of an encoding `[batch, tokens, d]` over its unmasked tokens (the
  sentence embedding of a mean-pooling sentence encoder such as all-MiniLM-L6-v2)."""
  if mask is None:
    return encoded.mean(axis=1)
  m = mask.astype(encoded.dtype)[..., None]
  return (encoded * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


def unit(x):
  """Rows scaled to unit length; zero rows stay zero (with a zero gradient, not NaN)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
