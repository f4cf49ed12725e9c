"""The prefix trie of valid ids, held as device arrays, level by level.

Level `l` holds the nodes at depth `l` (the distinct prefixes of `l` codes; level 0 is the
root), numbered in sorted order of their prefixes. Every level stores

  item[node]            the item whose id ends here (eos allowed), else -1.          [n_l]

and, where nodes of the level have children, one of two layouts:

  dense[node, token]    the child (a node of level l + 1), or -1; in the eos column  [n_l, vocab]
                        -(item + 2) where an id ends (so the table is the next
                        beam state), else -1.
  csr                   offsets[node] : offsets[node + 1] are the node's edges,      [n_l + 1]
                        tokens[edge] the child's token, ascending, or -1 for a       [edges]
                        removed subtree. The child node *is* the edge index: the
                        next level is numbered in (parent, token) order, so child
                        node ids are never stored.

`branching` (static) is the largest number of children of a node of the level, so that the
children of a beam's node are one gather of static shape `[branching]`. A level whose nodes
have no children (the last codes of fixed-length ids) stores `item` only.

Memory is O(edges) for CSR levels and O(nodes x vocab) for dense ones; `layout="auto"` makes
a level dense where its table is small (or no larger than twice its CSR arrays), which is
where a full-vocabulary row is as cheap as a gather of the children. Atomic ids are one dense
row over the output layer (the bitmap of live items) and a level of items: O(N).

Eos is allowed exactly where an id is complete, so ids of different lengths (and ids that are
prefixes of other ids) are all represented. Padding is never a valid transition. `remove`
takes items out (their eos and every subtree left empty) without renumbering anything.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax import docids as docids_lib

LAYOUTS = ("auto", "dense", "sparse")
DENSE_MAX_BYTES = 4 << 20


@flax.struct.dataclass
class Level:
  item: jax.Array  # [n] int32
  dense: jax.Array | None = None  # [n, vocab] int32
  offsets: jax.Array | None = None  # [n + 1] int32
  tokens: jax.Array | None = None  # [edges] int16 / int32
  branching: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def kind(self) -> str:
    if self.dense is not None:
      return "dense"
    return "csr" if self.offsets is not None else "leaf"

  @property
  def num_nodes(self) -> int:
    return int(self.item.shape[0])

  @property
  def nbytes(self) -> int:
    return sum(
      int(a.nbytes) for a in (self.item, self.dense, self.offsets, self.tokens) if a is not None
    )


@flax.struct.dataclass
class Trie:
  levels: tuple[Level, ...]  # levels[l]: the nodes at depth l, l = 0 .. longest id
  vocab_size: int = flax.struct.field(pytree_node=False)
  num_items: int = flax.struct.field(pytree_node=False)
  min_length: int = flax.struct.field(pytree_node=False, default=1)  # shortest id, eos included

  @property
  def max_length(self) -> int:
    """Longest id in tokens, eos included (= decode steps at most)."""
    return len(self.levels)

  @property
  def num_nodes(self) -> int:
    return sum(level.num_nodes for level in self.levels)

  @property
  def nbytes(self) -> int:
    return sum(level.nbytes for level in self.levels)

  @property
  def layout(self) -> tuple[str, ...]:
    """Per level: "dense", "csr" or "leaf"."""
    return tuple(level.kind for level in self.levels)

  # -- per-level operations (static level), shared by beam search, t5x and lookups ----------
  def children(self, level: int, node: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The children of `node` (nodes of `level`): `(tokens, child nodes)`, `[..., width]`.

    Dense levels give one column per vocabulary token, CSR levels `branching` columns; a
    column that is not a live child has token -1 and child -1.
    """
    lvl = self.levels[level]
    if lvl.kind == "dense":
      child = lvl.dense[node]
      child = jnp.where(child >= 0, child, -1)  # the eos column is not a child
      token = jnp.where(child >= 0, jnp.arange(self.vocab_size, dtype=jnp.int32), -1)
      return token, child
    if lvl.kind == "csr":
      start = lvl.offsets[node]
      end = lvl.offsets[node + 1]
      edge = start[..., None] + jnp.arange(lvl.branching, dtype=jnp.int32)
      inside = edge < end[..., None]
      token = lvl.tokens[jnp.minimum(edge, lvl.tokens.shape[0] - 1)].astype(jnp.int32)
      valid = inside & (token >= 0)
      return jnp.where(valid, token, -1), jnp.where(valid, edge, -1)
    empty = jnp.full((*node.shape, 0), -1, jnp.int32)
    return empty, empty

  def child(self, level: int, node: jax.Array, token: jax.Array) -> jax.Array:
    """The child of `node` (at `level`) along `token`, -1 where there is none."""
    lvl = self.levels[level]
    if lvl.kind == "dense":
      child = lvl.dense[node, jnp.maximum(token, 0)]
      return jnp.where((token >= 0) & (child >= 0), child, -1)
    if lvl.kind == "leaf":
      return jnp.full(node.shape, -1, jnp.int32)
    tokens, childs = self.children(level, node)
    match = (tokens == token[..., None]) & (childs >= 0)
    return jnp.where(jnp.any(match, -1), jnp.max(jnp.where(match, childs, -1), -1), -1)

  def allowed(self, level: int, node: jax.Array) -> jax.Array:
    """`[..., vocab]` bool: the tokens allowed after `node` (children, and eos where an id ends)."""
    lvl = self.levels[level]
    vocab = jnp.arange(self.vocab_size)
    ends = (lvl.item[node] >= 0)[..., None] & (vocab == docids_lib.EOS)
    if lvl.kind == "dense":
      return lvl.dense[node] != -1
    if lvl.kind == "leaf":
      return ends
    tokens, _ = self.children(level, node)
    hit = (tokens[..., :, None] == vocab) & (tokens[..., :, None] >= 0)  # [..., width, vocab]
    return jnp.any(hit, axis=-2) | ends

  # -- the same with a traced level (t5x's loop index) -----------------------------------------
  def allowed_at(self, level: jax.Array, node: jax.Array) -> jax.Array:
    branches = [lambda n, lv=lv: self.allowed(lv, n) for lv in range(self.max_length)]
    return jax.lax.switch(jnp.clip(level, 0, self.max_length - 1), branches, node)

  def child_at(self, level: jax.Array, node: jax.Array, token: jax.Array) -> jax.Array:
    branches = [lambda n, t, lv=lv: self.child(lv, n, t) for lv in range(self.max_length)]
    return jax.lax.switch(jnp.clip(level, 0, self.max_length - 1), branches, node, token)

  def lookup(self, tokens: jax.Array) -> jax.Array:
    """Item of each row of `tokens` `[..., length]` (id, eos, then pad); -1 if not a live id."""
    tokens = jnp.asarray(tokens, jnp.int32)
    shape = tokens.shape[:-1]
    node = jnp.zeros(shape, jnp.int32)
    item = jnp.full(shape, -1, jnp.int32)
    done = jnp.zeros(shape, bool)
    ok = jnp.ones(shape, bool)
    for t in range(tokens.shape[-1]):
      tok = tokens[..., t]
      ok &= ~done | (tok == docids_lib.PAD)  # after eos only padding
      if t >= self.max_length:
        ok &= done
        continue
      ends = ~done & (tok == docids_lib.EOS)
      ended_item = self.levels[t].item[node]
      ok &= ~ends | (ended_item >= 0)
      item = jnp.where(ends, ended_item, item)
      moves = ~done & ~ends
      nxt = self.child(t, node, tok) if t + 1 < self.max_length else jnp.full(shape, -1)
      ok &= ~moves | (nxt >= 0)
      node = jnp.where(moves, jnp.maximum(nxt, 0), node)
      done |= ends
    return jnp.where(ok & done, item, -1)

  def remove(self, items) -> Trie:
    """A trie without `items` (item indices): their ids end nowhere and every subtree left
    with no item is cut, so no search can reach them. Nothing is renumbered and the static
    shapes are unchanged (no recompilation)."""
    removed = np.zeros(self.num_items, bool)
    items = np.asarray(items, np.int64).reshape(-1)
    if items.size and (items.min() < 0 or items.max() >= self.num_items):
      raise ValueError(f"items to remove must be in [0, {self.num_items}), got {items.tolist()}")
    removed[items] = True
    levels = []
    live_next = None
    for lvl in reversed(self.levels):
      item = np.asarray(lvl.item).copy()
      item[(item >= 0) & removed[np.maximum(item, 0)]] = -1
      has_child = np.zeros(len(item), bool)
      dense = offsets = tokens = None
      if lvl.kind == "dense":
        dense = np.asarray(lvl.dense).copy()
        dense[(dense >= 0) & ~live_next[np.maximum(dense, 0)]] = -1
        dense[:, docids_lib.EOS] = np.where(item >= 0, -item - 2, -1)
        has_child = (dense >= 0).any(axis=1)
      elif lvl.kind == "csr":
        offsets = np.asarray(lvl.offsets)
        tokens = np.asarray(lvl.tokens).copy()
        tokens[~live_next] = -1
        parent = np.repeat(np.arange(len(item)), np.diff(offsets))
        has_child = np.bincount(parent[tokens >= 0], minlength=len(item)) > 0
      live_next = (item >= 0) | has_child
      levels.append(_level(item, dense, offsets, tokens, lvl.branching))
    return Trie(
      levels=tuple(reversed(levels)), vocab_size=self.vocab_size, num_items=self.num_items
    )


def _level(item, dense, offsets, tokens, branching) -> Level:
  as_device = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
  return Level(
    item=jnp.asarray(item),
    dense=as_device(dense),
    offsets=as_device(offsets),
    tokens=as_device(tokens),
    branching=int(branching),
  )


def _id_lengths(targets: np.ndarray, vocab_size: int) -> np.ndarray:
  """Codes per row of `targets`, checking every row is codes, eos, then padding."""
  num_items, length = targets.shape
  has_eos = (targets == docids_lib.EOS).any(axis=1)
  if not has_eos.all():
    raise ValueError(f"every target row must contain eos (row {int(np.argmin(has_eos))} has none)")
  lengths = np.argmax(targets == docids_lib.EOS, axis=1)
  pos = np.arange(length)[None, :]
  code = (targets >= docids_lib.NUM_SPECIAL) & (targets < vocab_size)
  after = np.where(pos == lengths[:, None], True, targets == docids_lib.PAD)
  good = np.where(pos < lengths[:, None], code, after).all(axis=1)
  if not good.all():
    row = int(np.argmin(good))
    raise ValueError(f"target row {row} is not codes, eos, then padding: {targets[row].tolist()}")
  return lengths


def _sort_rows(targets: np.ndarray, vocab_size: int) -> np.ndarray:
  """The lexicographic order of the rows (eos sorts before every code, so prefixes first)."""
  length = targets.shape[1]
  bits = max(1, int(vocab_size - 1).bit_length())
  if bits * length <= 62:  # one int64 key per row
    key = np.zeros(len(targets), np.int64)
    for t in range(length):
      key = (key << bits) | targets[:, t].astype(np.int64)
    return np.argsort(key, kind="stable")
  return np.lexsort(targets.T[::-1])


def from_targets(
  targets: np.ndarray,
  vocab_size: int,
  *,
  layout: str = "auto",
  dense_max_bytes: int = DENSE_MAX_BYTES,
) -> Trie:
  """Builds the trie of `targets` `[num_items, length]` (id tokens, eos, pad) with numpy.

  One sort of the rows, then per level a few vectorised passes: no loop over items.
  layout: "auto" (per level, see the module docstring), "dense" or "sparse" (CSR everywhere).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown trie layout {layout!r}: use one of {', '.join(LAYOUTS)}")
  targets = np.asarray(targets)
  if targets.ndim != 2 or len(targets) == 0:
    raise ValueError(f"targets must be a non-empty [items, length] array, got {targets.shape}")
  lengths = _id_lengths(targets, vocab_size)
  order = _sort_rows(targets, vocab_size)
  rows = targets[order].astype(np.int32)
  lens = lengths[order]
  same = np.all(rows[1:] == rows[:-1], axis=1)
  if same.any():
    i = int(np.argmax(same))
    raise ValueError(f"two items share an id (items {int(order[i])} and {int(order[i + 1])})")
  n = len(rows)
  token_dtype = np.int16 if vocab_size <= np.iinfo(np.int16).max else np.int32
  levels = []
  changed = np.zeros(n, bool)
  changed[0] = True  # row i starts a new prefix of the current length
  node = np.zeros(n, np.int64)  # each row's node at the current level
  num_nodes = 1
  for t in range(int(lens.max()) + 1):
    item = np.full(num_nodes, -1, np.int32)
    ends = lens == t
    item[node[ends]] = order[ends]
    deeper = lens > t
    changed[1:] |= rows[1:, t] != rows[:-1, t]  # (lengths < row length: t is a column)
    first = changed & deeper  # the first row of every node of level t + 1
    parent = node[first]
    child_tokens = rows[first, t]
    num_children = len(parent)
    if num_children == 0:
      levels.append(_level(item, None, None, None, 0))
      break
    counts = np.bincount(parent, minlength=num_nodes)
    branching = int(counts.max())
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    dense_bytes = num_nodes * vocab_size * 4
    csr_bytes = offsets.nbytes + num_children * np.dtype(token_dtype).itemsize
    if layout == "dense" or (
      layout == "auto" and dense_bytes <= max(dense_max_bytes, 2 * csr_bytes)
    ):
      dense = np.full((num_nodes, vocab_size), -1, np.int32)
      dense[parent, child_tokens] = np.arange(num_children, dtype=np.int32)
      dense[:, docids_lib.EOS] = np.where(item >= 0, -item - 2, -1)
      levels.append(_level(item, dense, None, None, branching))
    else:
      levels.append(_level(item, None, offsets, child_tokens.astype(token_dtype), branching))
    next_node = np.cumsum(first) - 1
    node = np.where(deeper, next_node, 0)
    num_nodes = num_children
  return Trie(
    levels=tuple(levels), vocab_size=int(vocab_size), num_items=n, min_length=int(lens.min()) + 1
  )


def build_trie(docids: docids_lib.DocidMap, *, layout: str = "auto") -> Trie:
  """The trie of every id in `docids`, on the default device."""
  return from_targets(docids.targets(), docids.vocab_size, layout=layout)
