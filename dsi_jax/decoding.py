"""Trie-constrained beam search, model-free.

The search knows nothing of the model: it calls `tokens_to_logits(tokens, cache)` with the
last token of every beam and gets next-token logits back. The trie (device arrays) masks
every step on device, so the mask never leaves it and only valid, distinct ids come out.

Step `t` expands the beams' nodes at trie level `t` (every live beam is at depth `t`), so the
loop is unrolled over the levels and each step has the static shapes of its level: the
candidates of a beam are its node's children (a dense level: one per vocabulary token; a CSR
level: its `branching` children) plus one "stop" column (eos where an id ends, or the pad
that a finished beam continues with), and one top-k per query runs over beams x candidates.
Steps after every beam has ended are skipped (`lax.cond`).
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
  # [batch, beams] int32: a live beam's trie node (at level `step`), or -(item + 2) for a
  # beam whose id has ended (so one gather reorders both).
  nodes: jax.Array
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
  state = BeamState(
    step=jnp.array(0, jnp.int32),
    tokens=jnp.full((b, k, max_length), docids_lib.PAD, jnp.int32),
    nodes=jnp.zeros((b, k), jnp.int32),
    # Only beam 0 is alive at the start, so the same id is never found twice.
    scores=jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1)),
    cache=cache,
  )

  def step_fn(level: int, state: BeamState) -> BeamState:
    # The decoder starts from pad (targets shifted right), then reads its last token.
    last = docids_lib.PAD if level == 0 else state.tokens[:, :, level - 1]
    last = jnp.broadcast_to(jnp.asarray(last, jnp.int32), (b, k))
    logits, cache = tokens_to_logits(last.reshape(b * k, 1), state.cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, vocab)
    finished = state.nodes < 0  # [b, k]
    nodes = jnp.maximum(state.nodes, 0)
    lvl = trie.levels[level]
    if lvl.kind == "dense":
      # One column per token. The eos column holds -(item + 2) where an id ends, so the table
      # gives the next state directly; a finished beam continues with pad, at no cost.
      child = lvl.dense[nodes]  # [b, k, vocab]
      is_pad = jnp.arange(vocab) == docids_lib.PAD
      cand = jnp.where(
        finished[..., None],
        jnp.where(is_pad, 0.0, NEG_INF),
        jnp.where(child != -1, log_probs, NEG_INF),
      )
    else:
      # A beam's children (`branching` of them at a CSR level, none at a leaf level), then one
      # stop column: eos where its id ends, or the pad a finished beam continues with.
      ends = lvl.item[nodes]
      stop_score = jnp.where(
        finished, 0.0, jnp.where(ends >= 0, log_probs[..., docids_lib.EOS], NEG_INF)
      )
      child_tokens, _ = trie.children(level, nodes)  # [b, k, branching]
      gathered = jnp.take_along_axis(log_probs, jnp.maximum(child_tokens, 0), axis=-1)
      gathered = jnp.where((child_tokens >= 0) & ~finished[..., None], gathered, NEG_INF)
      cand = jnp.concatenate([gathered, stop_score[..., None]], -1)
    width = cand.shape[-1]
    total = jnp.maximum(state.scores[..., None] + cand, NEG_INF)  # dead stay finite
    scores, flat = jax.lax.top_k(total.reshape(b, k * width), k)  # [b, k]
    beam, column = flat // width, flat % width
    parent = jnp.take_along_axis(state.nodes, beam, 1)
    parent_finished = parent < 0
    if lvl.kind == "dense":
      token = column
      node = lvl.dense[jnp.maximum(parent, 0), column]
    else:
      stop = column == width - 1
      if lvl.kind == "csr":
        edge = lvl.offsets[jnp.maximum(parent, 0)] + jnp.minimum(column, width - 2)
        code = lvl.tokens[jnp.minimum(edge, lvl.tokens.shape[0] - 1)].astype(jnp.int32)
      else:
        edge = code = jnp.zeros_like(column)
      token = jnp.where(stop, jnp.where(parent_finished, docids_lib.PAD, docids_lib.EOS), code)
      node = jnp.where(stop, -lvl.item[jnp.maximum(parent, 0)] - 2, edge)
    dead = scores <= NEG_INF / 2
    node = jnp.where(dead, 0, jnp.where(parent_finished, parent, node))
    tokens = jnp.take_along_axis(state.tokens, beam[..., None], 1)
    tokens = tokens.at[:, :, level].set(jnp.where(dead, docids_lib.PAD, token))
    return BeamState(
      step=state.step + 1,
      tokens=tokens,
      nodes=node,
      scores=scores,
      cache=_gather_beams(cache, beam, b, k),
    )

  for level in range(max_length):
    if level < trie.min_length:  # no beam can have ended yet: the step always runs
      state = step_fn(level, state)
      continue
    running = jnp.any((state.nodes >= 0) & (state.scores > NEG_INF / 2))
    state = jax.lax.cond(running, lambda s, lv=level: step_fn(lv, s), lambda s: s, state)
  alive = state.scores > NEG_INF / 2
  items = jnp.where(alive & (state.nodes < 0), -state.nodes - 2, -1)
  return BeamResult(tokens=state.tokens, scores=state.scores, items=items, steps=state.step)
