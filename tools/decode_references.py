"""Reference decoders that `tools/bench_decode.py` times beside `dsi_jax.decoding.beam_search`.

* `legacy_dense_search`: the project's previous trie and search, kept verbatim in spirit as the
  "before" of the sparse trie: one dense table `transitions[num_nodes, vocab]` (terminal nodes
  included, so nodes x vocabulary int32) and a `lax.while_loop` whose every step reads a
  full-vocabulary row per beam and runs one top-k over beams x vocabulary.
* `plain_beam_search`: unconstrained beam search of the same shape (no trie at all).
* `HostTrieSearch`: a nested-dict trie walked on the host per beam per step (how most published
  DSI code constrains decoding, with a `prefix_allowed_tokens_fn`).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax import decoding
from dsi_jax import docids as docids_lib

NEG_INF = decoding.NEG_INF

# --------------------------------------------------------------------------------------------
# The previous dense layout.
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class DenseTrie:
  transitions: jax.Array  # [num_nodes, vocab] int32 child node or -1 (eos leads to a terminal)
  node_item: jax.Array  # [num_nodes] int32 item of terminal nodes, else -1
  max_length: int = flax.struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return int(self.transitions.nbytes + self.node_item.nbytes)


def dense_bytes(num_nodes: int, num_items: int, vocab: int) -> int:
  """Bytes of the dense layout for a trie of `num_nodes` (terminal nodes not counted)."""
  return (num_nodes + num_items) * (vocab + 1) * 4


def build_dense(targets: np.ndarray, vocab: int) -> DenseTrie:
  """The previous builder: one `np.unique` of (parent, token) per level, then the table."""
  targets = np.asarray(targets, dtype=np.int64)
  num_items, max_length = targets.shape
  eos_pos = np.argmax(targets == docids_lib.EOS, axis=1)
  node = np.zeros(num_items, dtype=np.int64)
  next_free = 1
  edges = []
  for t in range(max_length):
    live = eos_pos >= t
    parent, token = node[live], targets[live, t]
    uniq, inverse = np.unique(parent * vocab + token, return_inverse=True)
    child_ids = next_free + np.arange(len(uniq))
    node[live] = child_ids[inverse]
    edges.append((uniq // vocab, uniq % vocab, child_ids))
    next_free += len(uniq)
  transitions = np.full((next_free, vocab), -1, dtype=np.int32)
  for parents, tokens, childs in edges:
    transitions[parents, tokens] = childs
  node_item = np.full(next_free, -1, dtype=np.int32)
  node_item[node] = np.arange(num_items)
  return DenseTrie(jnp.asarray(transitions), jnp.asarray(node_item), int(max_length))


def legacy_dense_search(
  tokens_to_logits, cache, trie: DenseTrie, *, batch_size: int, num_beams: int
):
  """The previous `beam_search`; returns `(items [b, k], scores [b, k], steps)`."""
  vocab = trie.transitions.shape[1]
  b, k = batch_size, num_beams

  def not_done(state):
    step, _, nodes, scores, _ = state
    finished = trie.node_item[nodes] >= 0
    return (step < trie.max_length) & ~jnp.all(finished | (scores <= NEG_INF / 2))

  def body(state):
    step, tokens, nodes, scores, cache = state
    last = jnp.where(step == 0, docids_lib.PAD, tokens[:, :, jnp.maximum(step - 1, 0)])
    logits, cache = tokens_to_logits(last.reshape(b * k, 1), cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, vocab)
    children = trie.transitions[nodes]
    finished = (trie.node_item[nodes] >= 0)[..., None]
    is_pad = (jnp.arange(vocab) == docids_lib.PAD)[None, None, :]
    step_scores = jnp.where(
      finished, jnp.where(is_pad, 0.0, NEG_INF), jnp.where(children >= 0, log_probs, NEG_INF)
    )
    candidates = jnp.maximum((scores[..., None] + step_scores).reshape(b, k * vocab), NEG_INF)
    scores, flat = jax.lax.top_k(candidates, k)
    beam, token = flat // vocab, flat % vocab
    parent_nodes = jnp.take_along_axis(nodes, beam, 1)
    parent_finished = trie.node_item[parent_nodes] >= 0
    child = trie.transitions[parent_nodes, token]
    nodes = jnp.where(parent_finished, parent_nodes, child)
    dead = scores <= NEG_INF / 2
    nodes = jnp.where(dead | (nodes < 0), 0, nodes)
    tokens = jnp.take_along_axis(tokens, beam[..., None], 1)
    tokens = tokens.at[:, :, step].set(jnp.where(dead, docids_lib.PAD, token))
    return step + 1, tokens, nodes, scores, _reorder(cache, beam, b, k)

  init = (
    jnp.array(0, jnp.int32),
    jnp.full((b, k, trie.max_length), docids_lib.PAD, jnp.int32),
    jnp.zeros((b, k), jnp.int32),
    jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1)),
    cache,
  )
  step, _, nodes, scores, _ = jax.lax.while_loop(not_done, body, init)
  items = jnp.where(scores > NEG_INF / 2, trie.node_item[nodes], -1)
  return items, scores, step


# --------------------------------------------------------------------------------------------
# No trie, and a host dict trie.
# --------------------------------------------------------------------------------------------


def _reorder(tree, beam: jax.Array, batch: int, beams: int):
  flat = (beam + jnp.arange(batch)[:, None] * beams).reshape(-1)
  return jax.tree_util.tree_map(
    lambda x: x[flat] if x.ndim > 0 and x.shape[0] == batch * beams else x, tree
  )


def plain_beam_search(tokens_to_logits, cache, *, batch_size: int, num_beams: int, steps: int):
  """Unconstrained beam search, the same loop as `decoding.beam_search` minus the trie.

  Returns `(tokens [batch, beams, steps], scores [batch, beams])`.
  """
  b, k = batch_size, num_beams

  def body(state):
    step, tokens, scores, cache = state
    last = jnp.where(step == 0, docids_lib.PAD, tokens[:, :, jnp.maximum(step - 1, 0)])
    logits, cache = tokens_to_logits(last.reshape(b * k, 1), cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, -1)
    vocab = log_probs.shape[-1]
    candidates = (scores[..., None] + log_probs).reshape(b, k * vocab)
    scores, flat = jax.lax.top_k(jnp.maximum(candidates, NEG_INF), k)
    beam, token = flat // vocab, flat % vocab
    tokens = jnp.take_along_axis(tokens, beam[..., None], 1).at[:, :, step].set(token)
    return step + 1, tokens, scores, _reorder(cache, beam, b, k)

  init = (
    jnp.array(0, jnp.int32),
    jnp.full((b, k, steps), docids_lib.PAD, jnp.int32),
    jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1)),
    cache,
  )
  _, tokens, scores, _ = jax.lax.while_loop(lambda s: s[0] < steps, body, init)
  return tokens, scores


def dict_trie(targets: np.ndarray) -> dict:
  """Nested dicts token -> child; at eos the value is the item index (an int)."""
  root: dict = {}
  for item, row in enumerate(targets.tolist()):
    node = root
    for tok in row:
      if tok == docids_lib.EOS:
        node[tok] = item
        break
      node = node.setdefault(tok, {})
  return root


def dict_trie_size(root: dict) -> tuple[int, int]:
  """(number of dicts, their shallow `sys.getsizeof` bytes)."""
  count, size, stack = 0, 0, [root]
  while stack:
    node = stack.pop()
    count += 1
    size += sys.getsizeof(node)
    stack.extend(v for v in node.values() if isinstance(v, dict))
  return count, size


class HostTrieSearch:
  """Beam search masked by a Python dict trie on the host (the reference)."""

  def __init__(self, tokens_to_logits, root: dict, vocab: int, max_length: int):
    self.root, self.vocab, self.max_length = root, vocab, max_length

    @functools.partial(jax.jit, static_argnames=("batch", "beams"))
    def step(last, cache, scores, mask, finished, *, batch, beams):
      logits, cache = tokens_to_logits(last[:, None], cache)
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
      is_pad = jnp.arange(vocab) == docids_lib.PAD
      step_scores = jnp.where(
        finished[:, None], jnp.where(is_pad, 0.0, NEG_INF)[None], log_probs + mask
      )
      candidates = (scores[..., None] + step_scores.reshape(batch, beams, vocab)).reshape(
        batch, beams * vocab
      )
      scores, flat = jax.lax.top_k(jnp.maximum(candidates, NEG_INF), beams)
      beam, token = flat // vocab, flat % vocab
      return scores, beam, token, _reorder(cache, beam, batch, beams)

    self._step = step

  def __call__(self, cache, batch: int, beams: int):
    """Returns `(items [batch, beams], scores [batch, beams])` as numpy."""
    vocab, rows = self.vocab, batch * beams
    nodes: list[Any] = [self.root] * rows
    scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1), jnp.float32), (batch, 1))
    last = np.zeros(rows, np.int32)
    host_scores = np.asarray(scores)
    for _ in range(self.max_length):
      # Host: the allowed next tokens of every beam, from its dict node.
      mask = np.full((rows, vocab), NEG_INF, np.float32)
      finished = np.zeros(rows, bool)
      for i, node in enumerate(nodes):
        if isinstance(node, dict):
          mask[i, list(node)] = 0.0
        else:
          finished[i] = True
      alive = host_scores.reshape(-1) > NEG_INF / 2
      if np.all(finished | ~alive):
        break
      scores, beam, token, cache = self._step(
        last, cache, scores, mask, finished, batch=batch, beams=beams
      )
      beam, token, host_scores = jax.device_get((beam, token, scores))
      new_nodes = []
      for q in range(batch):
        for j in range(beams):
          parent = nodes[q * beams + beam[q, j]]
          if host_scores[q, j] <= NEG_INF / 2:
            new_nodes.append(self.root)
          elif isinstance(parent, dict):
            new_nodes.append(parent[int(token[q, j])])
          else:
            new_nodes.append(parent)  # finished: stays on its item
      nodes = new_nodes
      last = np.asarray(token, np.int32).reshape(-1)
    items = np.array([n if not isinstance(n, dict) else -1 for n in nodes], np.int64).reshape(
      batch, beams
    )
    items = np.where(host_scores > NEG_INF / 2, items, -1)
    return items, host_scores
