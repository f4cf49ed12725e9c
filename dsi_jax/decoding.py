"""Trie-constrained beam search, model-free.

The search knows nothing of the model: it calls `tokens_to_logits(tokens, cache)` with the
last token of every beam and gets next-token logits back. The trie (device arrays) masks
every step inside one jitted `lax.while_loop`, so the mask never leaves the device and only
valid, distinct ids come out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from dsi_jax import docids as docids_lib
from dsi_jax.trie import Trie

NEG_INF = -1.0e30

# (tokens [batch * beams, 1], cache) -> (logits [batch * beams, vocab], new cache)
TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


@flax.struct.dataclass
class BeamState:
  step: jax.Array  # [] int32: number of tokens decoded so far
  tokens: jax.Array  # [batch, beams, max_length] int32
  nodes: jax.Array  # [batch, beams] int32: trie node of each beam
  scores: jax.Array  # [batch, beams] float32: log-probability of each beam
  cache: Any  # model cache, arrays with leading dim batch * beams


@flax.struct.dataclass
class BeamResult:
  tokens: jax.Array  # [batch, beams, max_length] id tokens, eos, then pad
  scores: jax.Array  # [batch, beams] log-probabilities, best first
  items: jax.Array  # [batch, beams] item index, -1 where fewer ids than beams exist
  steps: jax.Array  # [] int32: decode steps run (the loop stops once every beam has ended)


def _gather_beams(tree: Any, beam_index: jax.Array, batch: int, beams: int) -> Any:
  """Reorders every `[batch * beams, ...]` array of `tree` by `beam_index` [batch, beams]."""
  flat = (beam_index + jnp.arange(batch)[:, None] * beams).reshape(-1)

  def gather(x):
    if hasattr(x, "ndim") and x.ndim > 0 and x.shape[0] == batch * beams:
      return x[flat]
    return x  # scalars such as the cache position are shared by all beams

  return jax.tree_util.tree_map(gather, tree)


def beam_search(
  tokens_to_logits: TokensToLogits,
  cache: Any,
  trie: Trie,
  *,
  batch_size: int,
  num_beams: int,
) -> BeamResult:
  """Returns the `num_beams` best distinct valid ids of each query, best first.

  Scores are sums of log-softmax over the full vocabulary at each position, so they equal
  teacher-forced scores of the same ids; with `num_beams` >= the number of ids nothing is
  pruned and the ranking is exact.

  Args:
    tokens_to_logits: the model's one-step function (see `TokensToLogits`).
    cache: its initial cache, arrays with leading dim `batch_size * num_beams`.
    trie: the valid ids.
    batch_size: number of queries.
    num_beams: beams kept per query (= results returned per query).
  """
  vocab = trie.vocab_size
  max_length = trie.max_length
  b, k = batch_size, num_beams
  init = BeamState(
    step=jnp.array(0, jnp.int32),
    tokens=jnp.full((b, k, max_length), docids_lib.PAD, jnp.int32),
    nodes=jnp.zeros((b, k), jnp.int32),
    # Only beam 0 is alive at the start, so the same id is never found twice.
    scores=jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1)),
    cache=cache,
  )

  def not_done(state: BeamState) -> jax.Array:
    finished = trie.node_item[state.nodes] >= 0
    return (state.step < max_length) & ~jnp.all(finished | (state.scores <= NEG_INF / 2))

  def body(state: BeamState) -> BeamState:
    # The decoder starts from pad (targets shifted right), then reads its last token.
    last = jnp.where(state.step == 0, docids_lib.PAD, state.tokens[:, :, state.step - 1])  # [b, k]
    logits, cache = tokens_to_logits(last.reshape(b * k, 1), state.cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, vocab)
    children = trie.transitions[state.nodes]  # [b, k, vocab]
    finished = (trie.node_item[state.nodes] >= 0)[..., None]  # [b, k, 1]
    is_pad = (jnp.arange(vocab) == docids_lib.PAD)[None, None, :]
    # A finished beam continues only with pad, at no cost; a live beam only along the trie.
    step_scores = jnp.where(
      finished,
      jnp.where(is_pad, 0.0, NEG_INF),
      jnp.where(children >= 0, log_probs, NEG_INF),
    )
    candidates = (state.scores[..., None] + step_scores).reshape(b, k * vocab)
    candidates = jnp.maximum(candidates, NEG_INF)  # keep dead candidates finite
    scores, flat = jax.lax.top_k(candidates, k)  # [b, k]
    beam, token = flat // vocab, flat % vocab
    parent_nodes = jnp.take_along_axis(state.nodes, beam, 1)
    parent_finished = trie.node_item[parent_nodes] >= 0
    child = trie.transitions[parent_nodes, token]
    nodes = jnp.where(parent_finished, parent_nodes, child)
    dead = scores <= NEG_INF / 2
    nodes = jnp.where(dead | (nodes < 0), 0, nodes)
    tokens = jnp.take_along_axis(state.tokens, beam[..., None], 1)
    tokens = tokens.at[:, :, state.step].set(jnp.where(dead, docids_lib.PAD, token))
    cache = _gather_beams(cache, beam, b, k)
    return BeamState(state.step + 1, tokens, nodes, scores, cache)

  final = jax.lax.while_loop(not_done, body, init)
  alive = final.scores > NEG_INF / 2
  items = jnp.where(alive, trie.node_item[final.nodes], -1)
  return BeamResult(tokens=final.tokens, scores=final.scores, items=items, steps=final.step)
