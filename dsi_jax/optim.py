"""The optimizer of every trainer: AdamW with warmup and clipping, per-subtree learning-rate
factors and freezing, all as optax transformations.

Parameter subtrees are named by "/"-separated paths (`partitioning.path_string`), e.g.
"encoder" or "encoder/text_tower"; a path names a whole subtree ("encoder" matches
"encoder/Transformer/..." but not "encoder_norm").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsi_jax import partitioning


def make_optimizer(
  learning_rate: float = 5e-4,
  *,
  warmup_steps: int = 100,
  weight_decay: float = 1e-4,
  clip_norm: float = 1.0,
  decay_matrices_only: bool = False,
  lr_multipliers: Sequence[tuple[str, float]] = (),
  freeze: Sequence[str] = (),
  freeze_steps: int = 0,
) -> optax.GradientTransformation:
  """AdamW with linear warmup then a constant rate, and global-norm clipping.

  decay_matrices_only: weight decay on kernels and embeddings only (not biases, LayerNorm
    scales or scalars such as a temperature), as CLIP trains.
  lr_multipliers: `(path, factor)` pairs: the updates (rate and weight decay) of the parameter
    subtrees under `path` (e.g. "encoder/text_tower") are scaled by `factor`; the first matching
    path wins. Pretrained towers usually want a smaller rate than fresh layers: at 3e-4, the
    borrowed MiniLM tower of CLIP-DSI collapsed to one output for every caption.
  freeze, freeze_steps: the parameter subtrees under the `freeze` paths do not train for the
    optimizer's first `freeze_steps` updates (`freeze_subtrees`). Without either, the chain is
    clip -> adamw (-> scale_by_path) alone.
  """
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, learning_rate, max(1, warmup_steps)),
      optax.constant_schedule(learning_rate),
    ],
    [max(1, warmup_steps)],
  )
  chain = [
    optax.clip_by_global_norm(clip_norm),
    optax.adamw(
      schedule, weight_decay=weight_decay, mask=_matrices if decay_matrices_only else None
    ),
  ]
  if lr_multipliers:
    chain.append(scale_by_path(lr_multipliers))
  tx = optax.chain(*chain)
  if freeze and freeze_steps > 0:
    tx = freeze_subtrees(tx, freeze, freeze_steps)
  return tx


def path_matcher(paths: Sequence[str]):
  """`match(name) -> index of the first of paths that is a subtree of name, or None`; paths are
  "/"-separated (e.g. "encoder" matches "encoder/Transformer/..." but not "encoder_norm")."""
  patterns = [re.compile(rf"(^|/){re.escape(p.strip('/'))}(/|$)") for p in paths]

  def match(name: str) -> int | None:
    return next((i for i, p in enumerate(patterns) if p.search(name)), None)

  return match


def scale_by_path(multipliers: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Scales the updates of the parameters under each `(path, factor)` by factor (stateless)."""
  multipliers = tuple((str(p), float(f)) for p, f in multipliers)
  match = path_matcher([p for p, _ in multipliers])

  def factor(path) -> float:
    i = match(partitioning.path_string(path))
    return 1.0 if i is None else multipliers[i][1]

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class FreezeState(NamedTuple):
  count: jax.Array  # updates so far, int32
  inner_state: optax.OptState


def freeze_subtrees(
  inner: optax.GradientTransformation, paths: Sequence[str], steps: int
) -> optax.GradientTransformation:
  """`inner`, with the parameter subtrees under `paths` frozen for its first `steps` updates.

  While frozen (the count of updates < `steps`) those subtrees' gradients are set to zero before
  `inner` (so they do not count in a global-norm clip, as big_vision freezes), their updates are
  zero, and their part of `inner`'s state (e.g. Adam's moments) keeps its value. Paths match
  the "/"-joined keys of the parameters (`path_matcher`), and of `inner`'s state, whose
  per-parameter entries end in the parameter's path.
  """
  match = path_matcher(paths)

  def frozen(path) -> bool:
    return match(partitioning.path_string(path)) is not None

  def init_fn(params):
    return FreezeState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    active = state.count < steps

    def zero(path, u):
      return jnp.where(active, jnp.zeros_like(u), u) if frozen(path) else u

    def keep(path, new, old):
      return jnp.where(active, old, new) if frozen(path) else new

    updates = jax.tree_util.tree_map_with_path(zero, updates)
    updates, inner_state = inner.update(updates, state.inner_state, params)
    updates = jax.tree_util.tree_map_with_path(zero, updates)
    inner_state = jax.tree_util.tree_map_with_path(keep, inner_state, state.inner_state)
    return updates, FreezeState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def _matrices(params):
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
