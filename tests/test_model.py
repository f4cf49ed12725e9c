"""The DSI model on tiny random configs: decoding agrees with exact scoring."""

import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax import docids as docids_lib
from dsi_jax.models import dsi


def make_test_model(num_ids=30, **overrides):
  dm = docids_lib.random_ids([f"k{i}" for i in range(num_ids)], num_codes=4, seed=0)
  kwargs = dict(
    patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, dropout=0.0, decoder_depth=2
  )
  kwargs.update(overrides)
  model = dsi.DSIModel(dsi.make_vit_dsi(dm, **kwargs), dm)
  params = model.init(jax.random.PRNGKey(0), (1, 8, 8, 1))
  # Random init gives near-uniform logits; sharpen them so rankings are not near-ties.
  params = jax.tree_util.tree_map(lambda x: x * 3.0, params)
  return model, params


def test_beam_search_matches_exact_scoring_on_a_real_network():
  model, params = make_test_model()
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 1))
  n = len(model.docids)
  exact_items, exact_scores = model.rank(params, images, n, method="exact")
  beam_items, beam_scores = model.rank(params, images, n, method="beam", num_beams=n)
  np.testing.assert_allclose(beam_scores, exact_scores, atol=1e-4)
  np.testing.assert_array_equal(beam_items, exact_items)
  # score_batch agrees with score_all on the top id.
  top_targets = jnp.asarray(model.docids.targets([model.docids.keys[i] for i in exact_items[:, 0]]))
  np.testing.assert_allclose(
    model.score_batch(params, {"inputs": images, "targets": top_targets}),
    exact_scores[:, 0],
    atol=1e-4,
  )


def test_fewer_beams_return_valid_distinct_ids():
  model, params = make_test_model()
  images = jax.random.uniform(jax.random.PRNGKey(2), (4, 8, 8, 1))
  items, scores = model.rank(params, images, 5, method="beam")
  assert items.shape == (4, 5)
  for row in items:
    assert len(set(row.tolist())) == 5 and row.min() >= 0
  assert np.all(np.isfinite(scores))


def test_k_larger_than_corpus_pads_with_minus_one():
  model, params = make_test_model(num_ids=6)
  images = jnp.zeros((2, 8, 8, 1))
  for method in ("exact", "beam"):
    items, scores = model.rank(params, images, 10, method=method)
    assert items.shape == (2, 10)
    assert sorted(items[0, :6].tolist()) == list(range(6))
    assert np.all(items[:, 6:] == -1) and np.all(np.isneginf(scores[:, 6:]))


def test_removed_items_are_never_ranked_again():
  model, params = make_test_model(num_ids=30)
  images = jax.random.uniform(jax.random.PRNGKey(4), (3, 8, 8, 1))
  n = len(model.docids)
  before, _ = model.rank(params, images, n, method="exact")
  gone = {model.docids.keys[i] for i in before[:, 0]} | {"k3", "k7"}
  model.remove(sorted(gone))
  removed = {model.docids.index(k) for k in gone}
  for method, beams in (("exact", None), ("beam", 5), ("beam", n)):
    items, scores = model.rank(params, images, n, method=method, num_beams=beams)
    found = [[i for i in row if i >= 0] for row in items.tolist()]
    assert not any(set(row) & removed for row in found)
    if beams != 5:  # every live item, in the old order, then -1
      for row, old in zip(found, before.tolist()):
        assert row == [i for i in old if i not in removed]
      assert np.all(np.isneginf(scores[:, n - len(removed) :]))
  try:
    model.remove(["nope"])
  except ValueError as e:
    assert "nope" in str(e)
  else:
    raise AssertionError("an unknown key must be refused")


def test_exact_ranking_of_atomic_ids_scores_few_ids_whole_and_equals_scoring_every_id():
  """Atomic ids: the first-token pass, the best m scored whole and the certificate give the
  same ranking and scores as teacher-forcing every id, with removed items too; queries whose
  certificate fails (eos unlikely) fall back to scoring every id."""
  keys = [f"k{i}" for i in range(120)]
  dm = docids_lib.atomic_ids(keys)
  net = dsi.make_vit_dsi(
    dm, patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, dropout=0.0, decoder_depth=2
  )
  model = dsi.DSIModel(net, dm)
  params = model.init(jax.random.PRNGKey(0), (1, 8, 8, 1))
  params = jax.tree_util.tree_map(lambda x: x * 3.0, params)
  # as after training: eos likely after an id (its log-probability near 0)
  trained = jax.tree_util.tree_map(lambda x: x, params)
  bias = trained["decoder"]["logits"]["bias"]
  trained["decoder"]["logits"]["bias"] = bias.at[docids_lib.EOS].add(100.0)
  images = jax.random.uniform(jax.random.PRNGKey(3), (5, 8, 8, 1))
  model.remove(keys[::7])
  for p, expect_certified in ((params, False), (trained, True)):
    for k in (1, 10, 40):
      totals, rows, bound = model._score_top(
        params=p, inputs=images, live=jnp.asarray(model.live), m=max(2 * k, 32)
      )
      live = np.where(model.live[np.asarray(rows)], np.asarray(totals), -np.inf)
      kth = -np.sort(-live, axis=1)[:, k - 1]
      assert np.all(kth >= np.asarray(bound)) == expect_certified, (k, kth, bound)
      fast_items, fast_scores = model.rank(p, images, k, method="exact")
      items, scores = model._rank_every_id(p, images, k)
      np.testing.assert_array_equal(fast_items, items)
      np.testing.assert_allclose(fast_scores, scores, atol=1e-5)
      assert not set(fast_items.ravel()) & set(range(0, 120, 7))
