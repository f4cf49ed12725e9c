"""T5 v1.1 encoder and docid decoder in Flax Linen, with t5x's parameter layout.

The text-DSI network trained from scratch: a T5.1.1 encoder reads the document or question
tokens, a T5.1.1 decoder over the docid vocabulary emits the id. Both follow the T5.1.1
architecture as t5x's `examples/t5` network computes it: pre-norm blocks with RMS layer norm
(no bias, no mean subtraction, eps 1e-6), bias-free projections, no `1/sqrt(head_dim)` in the
attention logits (folded into the query initialiser), a gated-GELU MLP, bucketed relative
position biases shared by the layers of a stack, dropout broadcast along the length axis, and
no position embeddings.

Parameter tree (t5x's names and 2-D kernel shapes; `D` width, `H*K` heads x head_dim):
  encoder/token_embedder/embedding                       [input_vocab, D]
  encoder/relpos_bias/rel_embedding                      [H, buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale      [D]
  encoder/layers_{i}/attention/{query,key,value}/kernel  [D, H*K]
  encoder/layers_{i}/attention/out/kernel                [H*K, D]
  encoder/layers_{i}/pre_mlp_layer_norm/scale            [D]
  encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel              [D, mlp]   (wi_0 through GELU)
  encoder/layers_{i}/mlp/wo/kernel                       [mlp, D]
  encoder/encoder_norm/scale                             [D]
  decoder/token_embedder/embedding                       [docid_vocab, D]
  decoder/relpos_bias/rel_embedding                      [H, buckets]   (causal buckets)
  decoder/layers_{i}/pre_self_attention_layer_norm/scale, self_attention/...,
  decoder/layers_{i}/pre_cross_attention_layer_norm/scale, encoder_decoder_attention/...,
  decoder/layers_{i}/pre_mlp_layer_norm/scale, mlp/...
  decoder/decoder_norm/scale                             [D]
  decoder/logits_dense/kernel                            [D, docid_vocab]
Everything under `encoder/` is t5x's own path and shape. The one difference: t5x shares one
`token_embedder` between its encoder and decoder at the top of the tree; here the decoder reads
a separate, small docid vocabulary, so each stack owns its embedder (t5x's top-level
`token_embedder` is this tree's `encoder/token_embedder`). The decoder's layers have t5x's
layout; its embedder and `logits_dense` are sized for docids.

Contracts (`dsi_jax.models.dsi.DSINetwork`): `T5Encoder(tokens, train=...)` returns
`(encoded [batch, length, D], aux)` and masks padded keys itself (`tokens != pad_id`);
`T5Decoder(encoded, tokens, encoder_mask=..., train=..., decode=...)` takes `[batch, length]`
or `[batch, candidates, length]` id tokens (every candidate cross-attends to its query's
encoding, which is not copied) and runs one token at a time with flax's `decode=True` and a
"cache" collection, whose arrays lead with `batch * candidates` so that beam search reorders
them.

`dsi_jax.partitioning.PARAM_AXES` names the logical axes of these parameters (t5x's names:
`joined_kv` for the joined heads x head_dim axis, `relpos_buckets`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1.0e10  # t5x's attention-mask bias
LAYER_NORM_EPS = 1e-6

# Logical axes of the hidden states (`dsi_jax.partitioning` maps them to the mesh).
ENCODER_AXES = ("batch", "length", "embed")
DECODER_AXES = ("batch", "candidates", "length", "embed")

# t5x's initialisers (T5.1.1): embeddings N(0, 1); attention kernels fan-in normal, the query's
# divided by sqrt(head_dim); MLP and logits kernels fan-in truncated normal.
_embed_init = nn.initializers.normal(stddev=1.0)
_attention_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
_dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def relative_position_bucket(
  relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
  """T5's bucket of each `key_position - query_position` (int array, any shape).

  The buckets of one direction (all of them when causal, where every later key falls in
  bucket 0; half of them when bidirectional, the upper half holding keys after the query) are
  split in two: the first half holds exact distances 0, 1, 2, ...; the second half covers
  longer distances in logarithmically growing steps up to `max_distance`, beyond which all
  distances share the last bucket.
  """
  distance = -relative_position  # > 0: the key is before the query
  offset = jnp.zeros_like(distance)
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(distance < 0, num_buckets, 0)
    distance = jnp.abs(distance)
  else:
    distance = jnp.maximum(distance, 0)
  exact = num_buckets // 2
  scaled = jnp.log(distance.astype(jnp.float32) / exact + np.finfo(np.float32).eps)
  scaled = scaled / np.log(max_distance / exact) * (num_buckets - exact)
  far = jnp.minimum(exact + scaled.astype(distance.dtype), num_buckets - 1)
  return offset + jnp.where(distance < exact, distance, far)


class RMSNorm(nn.Module):
  """T5's layer norm: scale by the root mean square, no centring, no bias (param `scale`)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + LAYER_NORM_EPS)
    return (y * scale).astype(self.dtype)


class RelativePositionBias(nn.Module):
  """Attention logit biases `[1, heads, q, k]` from bucketed relative positions."""

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True

  @nn.compact
  def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    # query_positions: [q], key_positions: [k] int32 (traced in one-token decoding)
    buckets = relative_position_bucket(
      key_positions[None, :] - query_positions[:, None],
      bidirectional=self.bidirectional,
      num_buckets=self.num_buckets,
      max_distance=self.max_distance,
    )  # [q, k]
    table = self.param(
      "rel_embedding", _relpos_init, (self.num_heads, self.num_buckets), jnp.float32
    )
    return jnp.take(table, buckets, axis=1)[None]  # [1, heads, q, k]


class Attention(nn.Module):
  """T5 multi-head attention: bias-free `query`, `key`, `value`, `out` kernels, unscaled logits.

  With `decode=True` the keys and values of the self-attention are cached
  (`cached_key`, `cached_value`: `[batch, cache_length, heads, head_dim]`): the first call
  creates the cache, later calls write one position at `decode_position` and attend to the
  whole cache (the caller's `mask` hides the positions not yet written).
  """

  num_heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    inputs_q: jax.Array,
    inputs_kv: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    deterministic: bool = True,
    decode: bool = False,
    cache_length: int | None = None,
    decode_position: jax.Array | None = None,
  ) -> jax.Array:
    # inputs_q: [batch, q, width]; inputs_kv: [batch, k, width_kv];
    # mask: bool, broadcastable to [batch, heads, q, k]; bias: [1 | batch, heads, q, k].
    heads, head_dim = self.num_heads, self.head_dim
    dense = functools.partial(
      nn.Dense, heads * head_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32
    )

    def query_init(key, shape, dtype=jnp.float32):
      return _attention_init(key, shape, dtype) / np.sqrt(head_dim).astype(np.float32)

    def split(x):  # [batch, len, heads * head_dim] -> [batch, len, heads, head_dim]
      return x.reshape(*x.shape[:-1], heads, head_dim)

    q = split(dense(kernel_init=query_init, name="query")(inputs_q))
    k = split(dense(kernel_init=_attention_init, name="key")(inputs_kv))
    v = split(dense(kernel_init=_attention_init, name="value")(inputs_kv))
    if decode:
      stepping = self.has_variable("cache", "cached_key")
      shape = (k.shape[0], cache_length or k.shape[1], heads, head_dim)
      cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
      if stepping:
        if decode_position is None:
          raise ValueError("cached attention needs the decode_position of the new token")
        update = functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=1)
        cached_key.value = update(cached_key.value, k, decode_position)
        cached_value.value = update(cached_value.value, v, decode_position)
        k, v = cached_key.value, cached_value.value
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, NEG_INF)
    weights = jax.nn.softmax(logits).astype(self.dtype)
    # t5x drops attention weights with one mask for every query position.
    weights = nn.Dropout(self.dropout, broadcast_dims=(-2,))(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(self.dtype))
    out = out.reshape(*out.shape[:-2], heads * head_dim)
    return nn.Dense(
      inputs_q.shape[-1],
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_attention_init,
      name="out",
    )(out)


class GatedMlp(nn.Module):
  """T5.1.1's feed-forward block: `wo(gelu(wi_0 x) * wi_1 x)`, dropout on the hidden units."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    dense = functools.partial(
      nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init
    )
    h = nn.gelu(dense(self.mlp_dim, name="wi_0")(x)) * dense(self.mlp_dim, name="wi_1")(x)
    h = nn.Dropout(self.dropout, broadcast_dims=(-2,))(h, deterministic=deterministic)
    return dense(x.shape[-1], name="wo")(h)


class EncoderLayer(nn.Module):
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask, bias, deterministic: bool):
    # x: [batch, length, width]; mask: [batch, 1, 1, length]; bias: [1, heads, length, length]
    drop = nn.Dropout(self.dropout, broadcast_dims=(-2,))
    y = RMSNorm(self.dtype, name="pre_attention_layer_norm")(x)
    y = Attention(self.num_heads, self.head_dim, self.dropout, self.dtype, name="attention")(
      y, y, mask=mask, bias=bias, deterministic=deterministic
    )
    x = x + drop(y, deterministic=deterministic)
    y = RMSNorm(self.dtype, name="pre_mlp_layer_norm")(x)
    y = GatedMlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(y, deterministic=deterministic)
    return x + drop(y, deterministic=deterministic)


class T5Encoder(nn.Module):
  """Tokens `[batch, length]` -> `(encoded [batch, length, width], aux)`.

  Padded positions (`tokens == pad_id`) are masked out of every self-attention as keys, so the
  encoding of the other positions does not depend on how much padding follows. aux holds
  "stem" (the embeddings), "block{i:02d}" (each layer's output) and "encoded".
  """

  vocab_size: int
  width: int = 512
  depth: int = 8
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  dropout: float = 0.1
  num_buckets: int = 32
  max_distance: int = 128
  pad_id: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False):
    deterministic = not train
    length = tokens.shape[-1]
    mask = (tokens != self.pad_id)[:, None, None, :]  # [batch, 1, 1, length]: keys
    x = nn.Embed(
      self.vocab_size,
      self.width,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      embedding_init=_embed_init,
      name="token_embedder",
    )(tokens.astype(jnp.int32))
    aux = {"stem": x}
    x = nn.Dropout(self.dropout, broadcast_dims=(-2,))(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x.astype(self.dtype), ENCODER_AXES)
    positions = jnp.arange(length)
    bias = RelativePositionBias(
      self.num_heads, self.num_buckets, self.max_distance, bidirectional=True, name="relpos_bias"
    )(positions, positions)
    for i in range(self.depth):
      x = EncoderLayer(
        self.num_heads, self.head_dim, self.mlp_dim, self.dropout, self.dtype, name=f"layers_{i}"
      )(x, mask=mask, bias=bias, deterministic=deterministic)
      x = nn.with_logical_constraint(x, ENCODER_AXES)
      aux[f"block{i:02d}"] = x
    x = RMSNorm(self.dtype, name="encoder_norm")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    aux["encoded"] = x
    return x, aux


class DecoderLayer(nn.Module):
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x,
    encoded,
    *,
    self_mask,
    self_bias,
    cross_mask,
    deterministic: bool,
    decode: bool,
    cache_length: int,
    decode_position,
  ):
    # x: [batch, candidates, length, width]; encoded: [batch, enc_length, enc_width]
    b, c, length, width = x.shape
    drop = nn.Dropout(self.dropout, broadcast_dims=(-2,))
    attention = functools.partial(
      Attention, self.num_heads, self.head_dim, self.dropout, self.dtype
    )
    y = RMSNorm(self.dtype, name="pre_self_attention_layer_norm")(x).reshape(b * c, length, width)
    y = attention(name="self_attention")(
      y,
      y,
      mask=self_mask,
      bias=self_bias,
      deterministic=deterministic,
      decode=decode,
      cache_length=cache_length,
      decode_position=decode_position,
    )
    x = x + drop(y.reshape(x.shape), deterministic=deterministic)
    # Every position of every candidate attends to the same encoding: the candidates ride along
    # the query axis, so keys and values are projected once per query.
    y = RMSNorm(self.dtype, name="pre_cross_attention_layer_norm")(x).reshape(b, c * length, width)
    y = attention(name="encoder_decoder_attention")(
      y, encoded, mask=cross_mask, deterministic=deterministic
    )
    x = x + drop(y.reshape(x.shape), deterministic=deterministic)
    y = RMSNorm(self.dtype, name="pre_mlp_layer_norm")(x)
    y = GatedMlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(y, deterministic=deterministic)
    return x + drop(y, deterministic=deterministic)


class T5Decoder(nn.Module):
  """Docid tokens + the query's encoding -> next-token logits (a T5.1.1 decoder stack).

  decoder_input_tokens: `[batch, length]`, or `[batch, candidates, length]` to run several ids
  (beams, or every id of the corpus) against each query's encoding `[batch, enc_length, d]`
  without copying it. Returns float32 logits `[..., length, vocab]` of the same leading shape.
  encoder_mask: `[batch, enc_length]` bool, False at the encoder's padding.

  decode=True: the first call (any length up to `max_length`) creates the cache; each later
  call takes one token per candidate, `[batch, candidates, 1]`, at the position the cache
  counts. Self-attention sees the tokens so far with the causal relative position biases.
  """

  vocab_size: int
  max_length: int
  width: int = 512
  depth: int = 8
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  dropout: float = 0.1
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Any = jnp.float32

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
    deterministic = not train
    squeeze = decoder_input_tokens.ndim == 2
    tokens = decoder_input_tokens[:, None] if squeeze else decoder_input_tokens
    b, c, length = tokens.shape
    if length > self.max_length:
      raise ValueError(f"{length} decoder tokens, but max_length is {self.max_length}")
    x = nn.Embed(
      self.vocab_size,
      self.width,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      embedding_init=_embed_init,
      name="token_embedder",
    )(tokens.astype(jnp.int32))
    x = nn.Dropout(self.dropout, broadcast_dims=(-2,))(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x.astype(self.dtype), DECODER_AXES)
    relpos = RelativePositionBias(
      self.num_heads, self.num_buckets, self.max_distance, bidirectional=False, name="relpos_bias"
    )
    stepping = decode and self.has_variable("cache", "position")
    decode_position = None
    if decode:
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
    if stepping:
      if length != 1:
        raise ValueError(f"one token per decoding step, got {length}")
      decode_position = position.value
      keys = jnp.arange(self.max_length)
      self_bias = relpos(decode_position[None], keys)  # [1, heads, 1, max_length]
      self_mask = (keys <= decode_position)[None, None, None, :]
      position.value = decode_position + 1
    else:
      pos = jnp.arange(length)
      self_bias = relpos(pos, pos)  # [1, heads, length, length]
      self_mask = (pos[None, :] <= pos[:, None])[None, None]  # causal [1, 1, length, length]
    cross_mask = None
    if encoder_mask is not None:
      cross_mask = encoder_mask[:, None, None, :]  # [batch, 1, 1, enc_length]
    for i in range(self.depth):
      x = DecoderLayer(
        self.num_heads, self.head_dim, self.mlp_dim, self.dropout, self.dtype, name=f"layers_{i}"
      )(
        x,
        encoded,
        self_mask=self_mask,
        self_bias=self_bias,
        cross_mask=cross_mask,
        deterministic=deterministic,
        decode=decode,
        cache_length=self.max_length,
        decode_position=decode_position,
      )
      x = nn.with_logical_constraint(x, DECODER_AXES)
    x = RMSNorm(self.dtype, name="decoder_norm")(x)
    x = nn.Dropout(self.dropout, broadcast_dims=(-2,))(x, deterministic=deterministic)
    logits = nn.Dense(
      self.vocab_size,
      use_bias=False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=_dense_init,
      name="logits_dense",
    )(x)
    logits = nn.with_logical_constraint(logits, ("batch", "candidates", "length", "vocab"))
    return logits[:, 0] if squeeze else logits
