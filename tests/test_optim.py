"""The optimizer: freezing parameter subtrees for the first steps, as an optax transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsi_jax import optim, partitioning


def _params():
  return {
    "encoder": {"kernel": jnp.ones((3, 2)), "bias": jnp.full((2,), 0.5)},
    "encoder_norm": {"scale": jnp.ones(2)},  # not under "encoder": trains
    "decoder": {"kernel": jnp.full((2, 4), -1.0)},
  }


def _grads(step):
  return jax.tree_util.tree_map(
    lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32) + step).reshape(x.shape) * 3.0,
    _params(),
  )


def _leaves(tree, frozen: bool):
  """The leaves of `tree` (params or optimizer state) under "encoder", or all the others."""
  match = optim.path_matcher(["encoder"])
  return [
    np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if (match(partitioning.path_string(p)) is not None) == frozen and np.ndim(x) > 0
  ]


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_frozen_subtree_keeps_params_and_moments_then_trains():
  tx = optim.make_optimizer(1e-2, warmup_steps=1, freeze=("encoder",), freeze_steps=3)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = [(params, state)]
  for step in range(5):
    updates, state = update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  p0, s0 = history[0]
  assert len(_leaves(s0, frozen=True)) == 4  # Adam's mu and nu of the two encoder arrays

  def moved(a, b):
    return all(not np.array_equal(x, y) for x, y in zip(a, b))

  for step in range(1, 6):
    (p, s), (prev_p, prev_s) = history[step], history[step - 1]
    if step <= 3:  # three frozen updates: the encoder's params and moments stay as they were
      assert _same(_leaves(p, True), _leaves(p0, True)), step
      assert _same(_leaves(s, True), _leaves(s0, True)), step
    else:  # then it trains
      assert moved(_leaves(p, True), _leaves(prev_p, True)), step
      assert moved(_leaves(s, True), _leaves(prev_s, True)), step
    # The rest trains from the first update (whose rate is 0: the warmup starts at 0).
    assert moved(_leaves(s, False), _leaves(prev_s, False)), step
    if step >= 2:
      assert moved(_leaves(p, False), _leaves(prev_p, False)), step


def test_frozen_gradients_are_left_out_of_the_clipping_norm():
  params = _params()
  grads = _grads(0)
  frozen = optim.make_optimizer(1e-2, warmup_steps=1, freeze=("encoder",), freeze_steps=1)
  plain = optim.make_optimizer(1e-2, warmup_steps=1)
  u_frozen, _ = frozen.update(grads, frozen.init(params), params)
  # The same as the plain chain on gradients whose frozen part is zero (the clip sees the rest).
  zeroed = {**grads, "encoder": jax.tree_util.tree_map(jnp.zeros_like, grads["encoder"])}
  u_plain, _ = plain.update(zeroed, plain.init(params), params)
  for name in ("encoder_norm", "decoder"):
    for a, b in zip(
      jax.tree_util.tree_leaves(u_frozen[name]), jax.tree_util.tree_leaves(u_plain[name])
    ):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  assert all(not np.any(u) for u in jax.tree_util.tree_leaves(u_frozen["encoder"]))
  assert optax.global_norm(grads) > 1.0  # the clip is active, so the norm matters


def test_without_freezing_the_chain_is_unchanged():
  params = _params()
  plain = optim.make_optimizer(1e-2, warmup_steps=1)
  for tx in (
    optim.make_optimizer(1e-2, warmup_steps=1, freeze=("encoder",), freeze_steps=0),
    optim.make_optimizer(1e-2, warmup_steps=1, freeze=(), freeze_steps=5),
  ):
    state = tx.init(params)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(plain.init(params))
    u, _ = tx.update(_grads(0), state, params)
    u0, _ = plain.update(_grads(0), plain.init(params), params)
    assert jax.tree.all(jax.tree.map(np.array_equal, u, u0))
