"""The DSI model: an encoder (ViT, text tower, ...) and a docid decoder, plus the t5x-style
model contract around them (`loss_fn`, `predict_batch`, `score_batch`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax import decoding, partitioning
from dsi_jax import docids as docids_lib
from dsi_jax import trie as trie_lib
from dsi_jax.losses import (
  infonce_loss,
  l2_normalize,
  listwise_distillation,
  shift_right,
  token_log_likelihood,
)
from dsi_jax.models.decoder import DocidDecoder, pool
from dsi_jax.models.vit import ViT

Params = Mapping[str, Any]


class DSINetwork(nn.Module):
  """`encode(inputs) -> (encoded, aux)`; `decode(encoded, tokens) -> logits`.

  For token inputs (`pad_id` set), `encoded` is `{"encoded": [b, len, d], "mask": [b, len]}` so
  that the decoder never attends to padding; for images it is the `[b, patches, d]` array. An
  encoder whose aux holds a "mask" (CLIP-DSI's two towers) sets that mask itself.
  """

  encoder: nn.Module
  decoder: DocidDecoder
  pad_id: int | None = None  # token inputs: the padding id of the input vocabulary

  def encode(self, inputs, *, train: bool = False):
    encoded, aux = self.encoder(inputs, train=train)
    encoded = nn.with_logical_constraint(encoded, ("batch", "length", "embed"))
    if "mask" in aux:  # an encoder of several kinds of input gives its own mask
      encoded = {"encoded": encoded, "mask": aux["mask"]}
    elif self.pad_id is not None:
      encoded = {"encoded": encoded, "mask": inputs != self.pad_id}
    return encoded, aux

  def decode(self, encoded, decoder_input_tokens, *, train: bool = False, decode: bool = False):
    mask = None
    if isinstance(encoded, Mapping):
      encoded, mask = encoded["encoded"], encoded["mask"]
    return self.decoder(
      encoded, decoder_input_tokens, encoder_mask=mask, train=train, decode=decode
    )

  def __call__(self, inputs, decoder_input_tokens, *, train: bool = False):
    encoded, _ = self.encode(inputs, train=train)
    return self.decode(encoded, decoder_input_tokens, train=train)

  def embed(self, inputs):
    """`[b, d]`: the mean of the encoding over its unmasked tokens, the query embedding that
    a decoder with `embedding_ids` compares with its id rows."""
    encoded, _ = self.encode(inputs)
    if isinstance(encoded, Mapping):
      return pool(encoded["encoded"], encoded["mask"])
    return pool(encoded)


VIT_DSI_DEFAULTS = dict(
  patch_size=4, width=128, depth=6, mlp_dim=256, num_heads=4, dropout=0.1, decoder_depth=3
)


def make_vit_dsi(
  docids: docids_lib.DocidMap,
  *,
  patch_size: int = 4,
  width: int = 128,
  depth: int = 6,
  mlp_dim: int = 256,
  num_heads: int = 4,
  dropout: float = 0.1,
  decoder_depth: int = 3,
  dtype: Any = jnp.float32,
  embedding_ids: bool = False,
) -> DSINetwork:
  """The seed's ViT-DSI network; defaults are the seed recipe (width 128, depth 6, ...).
  embedding_ids: atomic ids that start from embeddings (`DocidDecoder.embedding_ids`)."""
  encoder = ViT(
    patch_size=patch_size,
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=num_heads,
    dropout=dropout,
    dtype=dtype,
  )
  decoder = DocidDecoder(
    vocab_size=docids.vocab_size,
    max_length=docids.max_length,
    width=width,
    depth=decoder_depth,
    mlp_dim=mlp_dim,
    num_heads=num_heads,
    dropout=dropout,
    dtype=dtype,
    embedding_ids=embedding_ids,
  )
  return DSINetwork(encoder=encoder, decoder=decoder)


# T5.1.1 small's sizes (t5x `t5_1_1/small.gin`): width 512, 8 + 8 layers, 6 heads of 64, MLP 1024.
T5_DSI_DEFAULTS = dict(
  width=512, depth=8, decoder_depth=8, num_heads=6, head_dim=64, mlp_dim=1024, dropout=0.1
)


def make_t5_dsi(
  docids: docids_lib.DocidMap,
  *,
  vocab_size: int,
  pad_id: int = 0,
  width: int = 512,
  depth: int = 8,
  decoder_depth: int | None = None,
  num_heads: int = 6,
  head_dim: int = 64,
  mlp_dim: int = 1024,
  dropout: float = 0.1,
  num_buckets: int = 32,
  max_distance: int = 128,
  dtype: Any = jnp.float32,
) -> DSINetwork:
  """Text DSI trained from scratch: a T5.1.1 encoder and a T5.1.1 docid decoder.

  Parameters follow t5x's T5 layout (`dsi_jax.models.t5`). Defaults are T5.1.1 small's sizes
  (about 48M parameters with an 8k input vocabulary).

  Args:
    docids: the ids the decoder emits (its vocabulary and maximum length).
    vocab_size: size of the input vocabulary (e.g. the SentencePiece model's).
    pad_id: the input vocabulary's padding id (0 for T5 / seqio SentencePiece vocabularies),
      masked out of every attention over the input.
    width, depth, num_heads, head_dim, mlp_dim: sizes of the encoder and decoder layers.
    decoder_depth: decoder layers (default: `depth`).
    dropout: rate of every dropout (embeddings, attention weights, MLP, residual branches).
    num_buckets, max_distance: relative position buckets.
    dtype: activation dtype (parameters are float32).
  """
  from dsi_jax.models import t5

  sizes = dict(
    width=width,
    num_heads=num_heads,
    head_dim=head_dim,
    mlp_dim=mlp_dim,
    dropout=dropout,
    num_buckets=num_buckets,
    max_distance=max_distance,
    dtype=dtype,
  )
  encoder = t5.T5Encoder(vocab_size=vocab_size, depth=depth, pad_id=pad_id, **sizes)
  decoder = t5.T5Decoder(
    vocab_size=docids.vocab_size,
    max_length=docids.max_length,
    depth=depth if decoder_depth is None else decoder_depth,
    **sizes,
  )
  return DSINetwork(encoder=encoder, decoder=decoder, pad_id=pad_id)


def replace_subtree(params, path: list[str], subtree, shardings=None, name: str | None = None):
  """`params` with the subtree at `path` replaced by pretrained `subtree` (shapes must match),
  placed on `shardings` (a tree like `params`) where given."""
  name = name or "/".join(path)
  if len(path) > 1:
    inner = replace_subtree(
      params[path[0]], path[1:], subtree, shardings and shardings[path[0]], name
    )
    return {**params, path[0]: inner}
  key = path[0]
  if key not in params:
    raise ValueError(f"pretrained {name!r}: the network has no such parameters")
  fresh = jax.tree_util.tree_map(jnp.shape, params[key])
  given = jax.tree_util.tree_map(jnp.shape, subtree)
  if fresh != given:
    raise ValueError(f"pretrained {name!r} parameters do not fit the network's {name}")
  if shardings is None:
    subtree = jax.tree_util.tree_map(jnp.asarray, subtree)
  else:
    subtree = jax.tree_util.tree_map(jax.device_put, subtree, shardings[key])
  return {**params, key: subtree}


class DSIModel:
  """A DSINetwork bound to a DocidMap and its trie.

  Batches are dicts: `inputs` (images `[batch, h, w, c]` or tokens) and, for training and
  scoring, `targets` (`[batch, max_length]` id tokens, from `DocidMap.targets`).
  """

  def __init__(
    self,
    network: DSINetwork,
    docids: docids_lib.DocidMap,
    *,
    exact_max_ids: int = 4096,
    pretrained: Mapping[str, Any] | None = None,
    contrastive_weight: float = 0.0,
    contrastive_temperature: float = 0.05,
  ):
    """Args:
    network: the encoder-decoder.
    docids: the ids it decodes.
    exact_max_ids: up to this many ids, `rank(method="auto")` scores every id exactly.
    pretrained: parameter subtrees that replace freshly initialised ones in `init`, by path,
      e.g. `{"encoder": minilm_params}` or `{"encoder/text_tower": minilm_params}` (shapes must
      match).
    contrastive_weight: CLIP-DSI's optional contrastive loss between the towers, added to the
      id loss with this weight. It applies to batches of two kinds, `inputs = (queries, items)`
      whose first rows are pairs (query i and item i: the trainer's paired batches): an InfoNCE
      loss on the encoder's pooled embeddings (`aux["pooled"]`), pairs with the same id not each
      other's negatives.
    contrastive_temperature: its softmax temperature (on cosine similarities).
    """
    self.network = network
    self.docids = docids
    self.pretrained = dict(pretrained or {})
    self.input_dtype = jnp.int32 if network.pad_id is not None else jnp.float32
    self.trie = trie_lib.build_trie(docids)
    self.live = np.ones(len(docids), bool)  # items not removed (`remove`)
    self.all_targets = jnp.asarray(docids.targets())  # [num_ids, max_length]
    self.exact_max_ids = exact_max_ids
    self.contrastive_weight = float(contrastive_weight)
    # Where the network reads precomputed inputs (a frozen encoder's outputs), the function that
    # turns raw inputs (token ids) into them; set by such factories (`make_minilm_dsi(frozen=)`).
    self.input_encoder: Any = None
    self.contrastive_temperature = float(contrastive_temperature)
    self._score_all = jax.jit(self._score_all_impl, static_argnames=("chunk",))
    self._score_top = jax.jit(self._score_top_impl, static_argnames=("m",))
    self._predict = jax.jit(self._predict_impl, static_argnames=("num_beams",))
    self._score = jax.jit(self._score_impl)

  # -- parameters ------------------------------------------------------------------------
  def init(self, rng: jax.Array, input_shape, input_dtype=None, *, out_shardings=None) -> Params:
    """Fresh parameters (with the `pretrained` subtrees in place).

    input_shape: the shape of a batch of inputs, or example inputs (an array, or a tuple of
      arrays of each kind the encoder takes, e.g. CLIP-DSI's `(images, tokens)`).
    out_shardings: a tree of shardings like the params (`partitioning.shardings`), so that
      parameters are created sharded rather than gathered on one device first.
    """
    if isinstance(input_shape, tuple) and all(isinstance(d, int) for d in input_shape):
      inputs = jnp.zeros((1, *input_shape[1:]), input_dtype or self.input_dtype)
    else:  # example inputs: one row of each
      inputs = jax.tree_util.tree_map(lambda x: jnp.zeros((1, *x.shape[1:]), x.dtype), input_shape)
    rows = sum(x.shape[0] for x in jax.tree_util.tree_leaves(inputs))
    tokens = jnp.zeros((rows, self.docids.max_length), jnp.int32)
    init = jax.jit(
      lambda r: self.network.init(r, inputs, tokens)["params"], out_shardings=out_shardings
    )
    params = init(rng)
    for name, subtree in self.pretrained.items():
      params = replace_subtree(params, name.split("/"), subtree, out_shardings, name)
    return params

  def ids_from_embeddings(
    self, params: Params, inputs, item_of_row=None, *, batch_size: int = 64
  ) -> Params:
    """`params` with each atomic id's row of `decoder/id_embedding` set to its item's
    embedding (`DSINetwork.embed`): of `inputs` row i if `item_of_row` is None (`inputs` are
    the indexed items, `RetrievalData.index_inputs`), else the mean over the rows of each item
    (e.g. its training captions). With the decoder's output layer still at zero, the model
    then ranks items by the cosine of query and item embeddings.

    Raises:
      ValueError: the decoder has no `embedding_ids`, the ids are not atomic, or an item has
        no row.
    """
    if not getattr(self.network.decoder, "embedding_ids", False):
      raise ValueError("ids_from_embeddings needs a decoder built with embedding_ids=True")
    if self.docids.scheme != "atomic":
      raise ValueError(f"ids start from embeddings for atomic ids only, not {self.docids.scheme!r}")
    n = len(self.docids)
    item_of_row = np.arange(n) if item_of_row is None else np.asarray(item_of_row)
    if len(item_of_row) != len(inputs):
      raise ValueError(f"{len(item_of_row)} item indices for inputs of another length")
    missing = np.setdiff1d(np.arange(n), item_of_row)
    if missing.size:
      raise ValueError(f"{missing.size} items (first: {self.docids.keys[missing[0]]}) have no row")
    embed = jax.jit(lambda p, x: self.network.apply({"params": p}, x, method=DSINetwork.embed))
    rows = len(item_of_row)
    parts = [
      np.asarray(embed(params, jnp.asarray(inputs[i : i + batch_size])), np.float64)
      for i in range(0, rows, batch_size)
    ]
    vectors = np.concatenate(parts)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)
    sums = np.zeros((n, vectors.shape[1]))
    np.add.at(sums, item_of_row, vectors)
    table = np.array(params["decoder"]["id_embedding"], np.float32)
    table[np.asarray(self.all_targets[:, 0])] = (
      sums / np.bincount(item_of_row, minlength=n)[:, None]
    )
    decoder = {**params["decoder"], "id_embedding": jnp.asarray(table)}
    return {**params, "decoder": decoder}

  # -- the model contract ------------------------------------------------------------------
  def loss_fn(
    self,
    params: Params,
    batch: Mapping[str, jax.Array],
    dropout_rng: jax.Array | None,
    *,
    rank_weight: float = 0.0,
    rank_temperature: float = 0.05,
  ):
    """Token cross-entropy over id tokens and eos. Returns `(loss, aux metrics)`.

    With `rank_weight` and a batch holding `candidates` (`[batch, C]` item rows, -1 for
    none) and `teacher` (`[batch, C]` a teacher's scores of them), a listwise distillation
    loss (`losses.listwise_distillation`, teacher softmax at `rank_temperature`) of the
    model's id log-likelihoods of the candidates is added with that weight.
    """
    train = dropout_rng is not None
    rngs = {"dropout": dropout_rng} if train else {}
    parts = batch["targets"]
    targets = parts
    if isinstance(parts, tuple | list):  # parts of several kinds of input, in their order
      targets = jnp.concatenate(parts)
    apply = functools.partial(self.network.apply, {"params": params}, train=train, rngs=rngs)
    encoded, enc_aux = apply(batch["inputs"], method=DSINetwork.encode)
    logits = apply(encoded, shift_right(targets), method=DSINetwork.decode)
    ll = token_log_likelihood(logits, targets)
    weights = (targets != docids_lib.PAD).astype(jnp.float32)
    loss = -jnp.sum(ll) / jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(logits, -1) == targets) | (targets == docids_lib.PAD)
    aux = {"id_loss": loss, "sequence_accuracy": jnp.mean(jnp.all(correct, axis=-1))}
    if self.contrastive_weight > 0 and isinstance(parts, tuple | list) and len(parts) == 2:
      contrastive = self._contrastive_loss(enc_aux["pooled"], parts)
      loss = loss + self.contrastive_weight * contrastive
      aux["contrastive_loss"] = contrastive
    if rank_weight > 0 and "candidates" in batch:
      candidates = batch["candidates"]
      student = self._candidate_scores(apply, encoded, logits, candidates)
      rank = listwise_distillation(student, batch["teacher"], candidates >= 0, rank_temperature)
      loss = loss + rank_weight * rank
      aux["rank_loss"] = rank
    aux["loss"] = loss
    return loss, aux

  def _candidate_scores(self, apply, encoded, logits, candidates) -> jax.Array:
    """`[batch, C]` log-likelihood of each candidate's id (rows -1: any finite value).

    Atomic ids (one code, then eos) read the first position's log-softmax, which does not
    depend on the target: one decoder pass scores every candidate, and it is the score the
    trie-constrained search ranks by. Longer ids are teacher-forced once per candidate.
    """
    rows = jnp.maximum(candidates, 0)
    if self.docids.scheme == "atomic":
      codes = self.all_targets[:, 0][rows]  # [batch, C]
      first = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)
      return jnp.take_along_axis(first, codes, axis=-1)
    b, c = candidates.shape
    tokens = self.all_targets[rows].reshape(b * c, -1)
    repeated = jax.tree.map(lambda x: jnp.repeat(x, c, axis=0), encoded)
    ll = token_log_likelihood(
      apply(repeated, shift_right(tokens), method=DSINetwork.decode), tokens
    )
    return ll.sum(axis=-1).reshape(b, c)

  def _contrastive_loss(self, pooled: jax.Array, parts) -> jax.Array:
    """InfoNCE between the first rows of the two parts (query i pairs with item i)."""
    n_q, n_i = parts[0].shape[0], parts[1].shape[0]
    n = min(n_q, n_i)
    rows = parts[1][:n]
    # One integer per id: the first row of the pairs with the same target tokens.
    same = jnp.all(rows[:, None, :] == rows[None, :, :], axis=-1)
    ids = jnp.argmax(same, axis=1)
    queries, items = l2_normalize(pooled[:n]), l2_normalize(pooled[n_q : n_q + n])
    return infonce_loss(queries, items, -jnp.log(self.contrastive_temperature), ids)

  def score_batch(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """`[batch]` log-likelihood of each `targets` row given its `inputs`."""
    return self._score(params, batch["inputs"], batch["targets"])

  def predict_batch(
    self, params: Params, inputs: jax.Array, *, num_beams: int
  ) -> decoding.BeamResult:
    """Trie-constrained beam search: the `num_beams` best distinct valid ids per query."""
    return self._predict(params, inputs, self.trie, num_beams=num_beams)

  def score_all(self, params: Params, inputs: jax.Array) -> jax.Array:
    """`[batch, num_ids]` exact log-likelihood of every id (teacher-forced).

    One forward pass per id scores all of its prefixes; for small corpora this is the
    exact ranking that beam search reaches with beams >= number of ids.
    """
    n = len(self.docids)
    chunks = -(-n // max(1, 8192 // max(1, inputs.shape[0])))
    chunk = -(-n // chunks)  # even chunks: little padding
    return self._score_all(params, inputs, chunk=chunk)

  def remove(self, keys: Sequence[str]) -> None:
    """Takes items out of the index at once, without training: no later `rank` (beam or
    exact) returns them. Their ids are not reused; nothing is recompiled."""
    unknown = [k for k in keys if k not in self.docids._index]
    if unknown:
      raise ValueError(f"cannot remove unknown keys: {', '.join(map(str, unknown[:5]))}")
    items = [self.docids.index(k) for k in keys]
    self.trie = self.trie.remove(items)
    self.live[items] = False

  def rank(
    self,
    params: Params,
    inputs: jax.Array,
    k: int,
    *,
    method: str = "auto",
    num_beams: int | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """The top-`k` item indices `[batch, k]` and their log-likelihoods, best first.

    method: "exact" scores every id, "beam" runs the constrained beam search with
    `num_beams` (default k) beams, "auto" is exact up to `exact_max_ids` ids.
    Where fewer than k ids exist, missing places hold -1 and -inf.
    """
    if method == "auto":
      method = "exact" if len(self.docids) <= self.exact_max_ids else "beam"
    if method == "exact":
      items, top = self._rank_exact(params, inputs, k)
    elif method == "beam":
      beams = max(k, num_beams or k)
      result = jax.tree_util.tree_map(
        partitioning.to_host, self.predict_batch(params, inputs, num_beams=beams)
      )
      items, top = (
        result.items[:, :k],
        np.where(result.items[:, :k] >= 0, result.scores[:, :k], -np.inf),
      )
    else:
      raise ValueError(f"unknown ranking method {method!r}: use 'exact', 'beam' or 'auto'")
    if items.shape[1] < k:
      pad = k - items.shape[1]
      items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
      top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
    return items, top

  def _rank_exact(self, params, inputs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every id's exact score, the top k. Atomic ids (one code, then eos) need not be
    teacher-forced one by one: one decoder pass gives every id's first-token log-probability,
    the best `m` are scored whole, and since eos adds a log-probability <= 0, the ranking is
    exact wherever the k-th whole score is at least the (m+1)-th first-token one (certified
    per query; the others fall back to scoring every id)."""
    n, m = len(self.docids), max(2 * k, 32)
    if self.docids.scheme == "atomic" and m + 1 < n:
      totals, rows, bound = map(
        partitioning.to_host, self._score_top(params, inputs, jnp.asarray(self.live), m=m)
      )
      totals = np.where(self.live[rows], totals, -np.inf)
      order = np.argsort(-totals, axis=1, kind="stable")[:, :k]
      top = np.take_along_axis(totals, order, 1)
      items = np.where(np.isneginf(top), -1, np.take_along_axis(rows, order, 1))
      exact = top[:, k - 1] >= bound
      if exact.all():
        return items, top
      full_items, full_top = self._rank_every_id(params, inputs, k)  # rare
      return np.where(exact[:, None], items, full_items), np.where(exact[:, None], top, full_top)
    return self._rank_every_id(params, inputs, k)

  def _rank_every_id(self, params, inputs, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = partitioning.to_host(self.score_all(params, inputs))
    scores = np.where(self.live[None, :], scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    return np.where(np.isneginf(top), -1, order), top

  # -- jitted implementations ------------------------------------------------------------
  def _encode(self, params, inputs):
    encoded, _ = self.network.apply({"params": params}, inputs, method=DSINetwork.encode)
    return encoded

  def _score_impl(self, params, inputs, targets):
    logits = self.network.apply({"params": params}, inputs, shift_right(targets))
    return jnp.sum(token_log_likelihood(logits, targets), axis=-1)

  def _score_all_impl(self, params, inputs, *, chunk: int):
    encoded = self._encode(params, inputs)  # [b, patches, d] (or a dict with its mask)
    b = inputs.shape[0]
    n = self.all_targets.shape[0]
    padded = -(-n // chunk) * chunk
    targets = jnp.pad(self.all_targets, ((0, padded - n), (0, 0)), constant_values=docids_lib.EOS)
    targets = targets.reshape(padded // chunk, chunk, -1)  # [chunks, chunk, length]

    def score_chunk(_, t):  # t: [chunk, length]
      tt = jnp.broadcast_to(t, (b, *t.shape))  # [b, chunk, length]
      logits = self.network.apply(
        {"params": params}, encoded, shift_right(tt), method=DSINetwork.decode
      )  # [b, chunk, length, vocab]
      return None, jnp.sum(token_log_likelihood(logits, tt), -1)

    _, scores = jax.lax.scan(score_chunk, None, targets)  # [chunks, b, chunk]
    return jnp.moveaxis(scores, 0, 1).reshape(b, padded)[:, :n]

  def _score_top_impl(self, params, inputs, live, *, m: int):
    """Atomic ids: the whole scores of the `m` live ids with the best first token `[b, m]`,
    their rows, and the (m+1)-th best first-token log-probability `[b]` (a bound on the rest)."""
    encoded = self._encode(params, inputs)
    b = inputs.shape[0]
    start = jnp.broadcast_to(self.all_targets[:1], (b, 1, self.all_targets.shape[1]))
    logits = self.network.apply(
      {"params": params}, encoded, shift_right(start), method=DSINetwork.decode
    )
    first = jax.nn.log_softmax(logits[:, 0, 0].astype(jnp.float32), axis=-1)
    first = jnp.where(live[None, :], first[:, self.all_targets[:, 0]], -jnp.inf)
    best, rows = jax.lax.top_k(first, m + 1)
    targets = self.all_targets[rows[:, :m]]  # [b, m, length]
    logits = self.network.apply(
      {"params": params}, encoded, shift_right(targets), method=DSINetwork.decode
    )
    return jnp.sum(token_log_likelihood(logits, targets), -1), rows[:, :m], best[:, m]

  def _predict_impl(self, params, inputs, trie, *, num_beams: int):
    encoded = self._encode(params, inputs)  # [b, patches, d], shared by the beams
    b = inputs.shape[0]
    decode = functools.partial(
      self.network.apply, method=DSINetwork.decode, decode=True, mutable=["cache"]
    )
    dummy = jnp.zeros((b, num_beams, self.docids.max_length), jnp.int32)
    _, init_vars = decode({"params": params}, encoded, dummy)

    def tokens_to_logits(tokens, cache):  # tokens: [b * beams, 1]
      logits, new_vars = decode(
        {"params": params, "cache": cache}, encoded, tokens.reshape(b, num_beams, 1)
      )
      return logits[:, :, -1].reshape(b * num_beams, -1), new_vars["cache"]

    return decoding.beam_search(
      tokens_to_logits, init_vars["cache"], trie, batch_size=b, num_beams=num_beams
    )
