"""The prefix trie of valid ids, held as device arrays.

Nodes are numbered level by level (root = 0, then every prefix of length 1, then of
length 2, ...), so the table is the per-level transition tables stacked: rows
`level_start[l] : level_start[l + 1]` are the nodes at depth `l`. Following eos from the
node of a complete id leads to that id's *terminal* node, which names the item.

  transitions[node, token] -> child node, or -1 where `token` is not allowed.   [nodes, vocab]
  node_item[node]          -> item index for terminal nodes, -1 elsewhere.      [nodes]

Eos is allowed exactly where an id is complete, so ids of different lengths (and ids that
are prefixes of other ids) are all represented. Padding is never a valid transition.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax import docids as docids_lib


@flax.struct.dataclass
class Trie:
  transitions: jax.Array  # [num_nodes, vocab_size] int32
  node_item: jax.Array  # [num_nodes] int32
  level_start: np.ndarray = flax.struct.field(pytree_node=False)  # [max_length + 2]
  num_items: int = flax.struct.field(pytree_node=False)
  max_length: int = flax.struct.field(pytree_node=False)  # longest id, eos included

  @property
  def num_nodes(self) -> int:
    return int(self.transitions.shape[0])

  @property
  def vocab_size(self) -> int:
    return int(self.transitions.shape[1])

  @property
  def nbytes(self) -> int:
    return int(self.transitions.nbytes + self.node_item.nbytes)


def build_tables(targets: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Builds the trie tables of `targets` with numpy (vectorised level by level).

  Args:
    targets: `[num_items, max_length]` int tokens, each row an id followed by eos and pad.
    vocab_size: size of the id vocabulary.

  Returns:
    transitions `[num_nodes, vocab_size]`, node_item `[num_nodes]`, level_start.
  """
  targets = np.asarray(targets, dtype=np.int64)
  num_items, max_length = targets.shape
  eos_pos = np.argmax(targets == docids_lib.EOS, axis=1)
  if not np.all(targets[np.arange(num_items), eos_pos] == docids_lib.EOS):
    raise ValueError("every target row must contain eos")
  node = np.zeros(num_items, dtype=np.int64)  # current node of each item; root = 0
  next_free = 1
  level_start = [0, 1]
  edges = []  # (parent array, token array, child array) per level
  for t in range(max_length):
    live = eos_pos >= t  # items whose id is not finished before position t
    parent, token = node[live], targets[live, t]
    edge_key = parent * vocab_size + token
    uniq, inverse = np.unique(edge_key, return_inverse=True)
    child_ids = next_free + np.arange(len(uniq))
    node[live] = child_ids[inverse]
    edges.append((uniq // vocab_size, uniq % vocab_size, child_ids))
    next_free += len(uniq)
    level_start.append(next_free)
  transitions = np.full((next_free, vocab_size), -1, dtype=np.int32)
  for parents, tokens, childs in edges:
    transitions[parents, tokens] = childs
  node_item = np.full(next_free, -1, dtype=np.int32)
  node_item[node] = np.arange(num_items)  # every item ends on its own terminal node
  if len(np.unique(node)) != num_items:
    raise ValueError("two items share an id")
  return transitions, node_item, np.asarray(level_start)


def build_trie(docids: docids_lib.DocidMap) -> Trie:
  """The trie of every id in `docids`, on the default device."""
  transitions, node_item, level_start = build_tables(docids.targets(), docids.vocab_size)
  return Trie(
    transitions=jnp.asarray(transitions),
    node_item=jnp.asarray(node_item),
    level_start=level_start,
    num_items=len(docids),
    max_length=docids.max_length,
  )
