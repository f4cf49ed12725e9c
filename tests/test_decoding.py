"""Trie and constrained beam search, tested with hand-written logits functions (no model)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsi_jax import decoding
from dsi_jax import docids as docids_lib
from dsi_jax import trie as trie_lib

MAX_LEN = 8


def toy_model(num_queries: int, vocab: int, seed: int):
  """A prefix-dependent logits table: logits = table[query, hash(prefix)].

  Returns `(make_cache, tokens_to_logits, score)`, where `score(q, targets)` is the
  teacher-forced log-likelihood of one id computed independently of the beam search.
  """
  buckets = 97
  table = jax.random.normal(jax.random.PRNGKey(seed), (num_queries, buckets, vocab)) * 3.0

  def bucket(h):
    return h % buckets

  def make_cache(num_beams):
    return {
      "query": jnp.repeat(jnp.arange(num_queries), num_beams),  # [b * k]
      "hash": jnp.zeros(num_queries * num_beams, jnp.int32),  # [b * k]
    }

  def tokens_to_logits(tokens, cache):
    h = (cache["hash"] * 31 + tokens[:, 0] + 1) % 1000003
    logits = table[cache["query"], bucket(h)]
    return logits, {"query": cache["query"], "hash": h}

  def score(q, target_row):
    h, total = 0, 0.0
    prev = docids_lib.PAD
    for tok in target_row:
      h = (h * 31 + prev + 1) % 1000003
      total += float(jax.nn.log_softmax(table[q, bucket(h)])[tok])
      if tok == docids_lib.EOS:
        break
      prev = int(tok)
    return total

  return make_cache, tokens_to_logits, score


def run_search(tokens_to_logits, cache, trie, batch, beams):
  fn = jax.jit(
    functools.partial(decoding.beam_search, batch_size=batch, num_beams=beams),
    static_argnums=(0,),
  )
  return jax.device_get(fn(tokens_to_logits, cache, trie))


def random_docids(rng, n, num_codes, min_len, max_len):
  ids = set()
  while len(ids) < n:
    length = rng.integers(min_len, max_len + 1)
    ids.add(tuple(int(x) for x in rng.integers(0, num_codes, size=length)))
  return docids_lib.from_mapping(
    {f"d{i}": c for i, c in enumerate(sorted(ids))}, num_codes=num_codes
  )


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_trie_levels_small(layout):
  dm = docids_lib.from_mapping({"a": [0, 1], "b": [0], "c": [1, 1]}, num_codes=2)
  trie = trie_lib.build_trie(dm, layout=layout)
  assert trie.max_length == 3 and trie.num_items == 3 and trie.num_nodes == 1 + 2 + 2
  assert trie.layout == ((layout if layout == "dense" else "csr"),) * 2 + ("leaf",)
  allowed = lambda level, node: np.flatnonzero(np.asarray(trie.allowed(level, jnp.array(node))))  # noqa: E731
  code = lambda c: c + docids_lib.NUM_SPECIAL  # noqa: E731
  # The root allows codes 0 and 1; neither pad nor eos.
  assert allowed(0, 0).tolist() == [code(0), code(1)]
  n0 = int(trie.child(0, jnp.array(0), jnp.array(code(0))))
  n1 = int(trie.child(0, jnp.array(0), jnp.array(code(1))))
  assert (n0, n1) == (0, 1)  # level 1 is numbered in token order
  # "0" is a complete id (b) and a prefix of "0 1" (a): eos and code 1 both allowed.
  assert allowed(1, n0).tolist() == [docids_lib.EOS, code(1)]
  assert int(trie.levels[1].item[n0]) == dm.index("b")
  assert allowed(1, n1).tolist() == [code(1)]  # "1" alone is not an id
  assert int(trie.child(1, jnp.array(n0), jnp.array(code(0)))) == -1
  # Every id's tokens look up to its item; anything else to -1.
  np.testing.assert_array_equal(trie.lookup(dm.targets()), np.arange(3))
  bad = np.array(
    [
      [code(1), docids_lib.EOS, 0],
      [code(0), code(0), docids_lib.EOS],
      [code(0), docids_lib.EOS, code(1)],
      [docids_lib.PAD, 0, 0],
    ]
  )
  np.testing.assert_array_equal(trie.lookup(bad), [-1, -1, -1, -1])


def test_trie_rejects_bad_targets():
  eos, pad = docids_lib.EOS, docids_lib.PAD
  with pytest.raises(ValueError, match="share an id"):
    trie_lib.from_targets(np.array([[2, eos], [2, eos]]), 4)
  with pytest.raises(ValueError, match="row 1 .*codes, eos, then padding"):
    trie_lib.from_targets(np.array([[2, eos, pad], [2, pad, eos]]), 4)
  with pytest.raises(ValueError, match="row 0 has none"):
    trie_lib.from_targets(np.array([[2, 3]]), 4)
  with pytest.raises(ValueError, match="layout"):
    trie_lib.from_targets(np.array([[2, eos]]), 4, layout="csr")


def test_atomic_ids_need_no_table_beyond_o_n():
  n = 5000
  trie = trie_lib.build_trie(docids_lib.atomic_ids([f"d{i}" for i in range(n)]))
  # One row over the output layer (the live items) and one item per node: O(N), not O(N^2).
  assert trie.layout == ("dense", "leaf")
  assert trie.nbytes <= 3 * 4 * (n + 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_with_all_beams_equals_exhaustive_scoring(seed):
  rng = np.random.default_rng(seed)
  dm = random_docids(rng, n=24, num_codes=4, min_len=1, max_len=3)
  trie = trie_lib.build_trie(dm)
  num_queries, beams = 3, len(dm) + 2
  make_cache, tokens_to_logits, score = toy_model(num_queries, dm.vocab_size, seed)
  result = run_search(tokens_to_logits, make_cache(beams), trie, num_queries, beams)
  targets = dm.targets()
  for q in range(num_queries):
    exhaustive = np.array([score(q, row) for row in targets])
    order = np.argsort(-exhaustive, kind="stable")
    items = result.items[q]
    assert sorted(items[: len(dm)].tolist()) == list(range(len(dm)))
    assert np.all(items[len(dm) :] == -1)
    np.testing.assert_allclose(result.scores[q, : len(dm)], exhaustive[order], atol=1e-4)
    # Same ranking (ties between exactly equal scores are not expected with random logits).
    np.testing.assert_array_equal(items[: len(dm)], order)


@pytest.mark.parametrize("seed", range(4))
def test_random_tries_return_valid_distinct_ids(seed):
  rng = np.random.default_rng(100 + seed)
  n = int(rng.integers(5, 60))
  dm = random_docids(rng, n=n, num_codes=int(rng.integers(2, 6)), min_len=1, max_len=4)
  trie = trie_lib.build_trie(dm)
  beams = int(rng.integers(1, 12))
  batch = 4
  vocab = dm.vocab_size

  def random_logits(tokens, cache):
    key = jax.random.fold_in(cache["key"], cache["step"])
    return jax.random.normal(key, (tokens.shape[0], vocab)) * 5.0, {
      "key": cache["key"],
      "step": cache["step"] + 1,
    }

  cache = {"key": jax.random.PRNGKey(seed), "step": jnp.array(0)}
  result = run_search(random_logits, cache, trie, batch, beams)
  valid = {tuple(row) for row in dm.targets().tolist()}
  for q in range(batch):
    found = [i for i in result.items[q].tolist() if i >= 0]
    assert len(found) == min(beams, n)
    assert len(set(found)) == len(found)
    for r, item in enumerate(result.items[q].tolist()):
      if item < 0:
        continue
      row = tuple(result.tokens[q, r].tolist())
      assert row in valid, row
      assert dm.targets([dm.keys[item]])[0].tolist() == list(row)
    assert np.all(np.diff(result.scores[q][: len(found)]) <= 1e-6)


def test_ids_of_different_lengths_decode():
  dm = docids_lib.from_mapping(
    {"short": [2], "mid": [2, 0], "long": [2, 0, 1], "other": [1]}, num_codes=3
  )
  trie = trie_lib.build_trie(dm)
  vocab = dm.vocab_size
  # Logits that prefer, in order: the eos, then code 2, then code 0 -- at every step.
  base = jnp.array([-9.0, 3.0, 0.0, 1.0, 2.0])[:vocab]

  def fixed(tokens, cache):
    return jnp.tile(base, (tokens.shape[0], 1)), cache

  result = run_search(fixed, {}, trie, 1, 4)
  keys = [dm.keys[i] for i in result.items[0]]
  lp = np.asarray(jax.nn.log_softmax(base))
  expected = {
    "short": lp[4] + lp[1],
    "mid": lp[4] + lp[2] + lp[1],
    "long": lp[4] + lp[2] + lp[3] + lp[1],
    "other": lp[3] + lp[1],
  }
  assert keys == sorted(expected, key=lambda k: -expected[k])
  np.testing.assert_allclose(result.scores[0], sorted(expected.values(), reverse=True), rtol=1e-5)
  # The tokens of each result are its id then eos then pad.
  for r, key in enumerate(keys):
    np.testing.assert_array_equal(result.tokens[0, r], dm.targets([key])[0])
  assert int(result.steps) == 4  # the longest id (3 codes) and its eos
  # With one beam the search stops as soon as that beam has ended: "short" + eos.
  assert int(run_search(fixed, {}, trie, 1, 1).steps) == 2


def test_atomic_ids_decode_to_the_top_k_distinct_items():
  n, batch, beams = 30, 3, 7
  dm = docids_lib.atomic_ids([f"doc{i}" for i in range(n)])
  trie = trie_lib.build_trie(dm)
  table = jax.random.normal(jax.random.PRNGKey(3), (batch, dm.vocab_size)) * 4.0

  def first_step_logits(tokens, cache):
    # Query q's logits over items at the first step; eos is then forced by the trie.
    return table[cache["query"]], cache

  cache = {"query": jnp.repeat(jnp.arange(batch), beams)}
  result = run_search(first_step_logits, cache, trie, batch, beams)
  for q in range(batch):
    items = result.items[q].tolist()
    assert len(set(items)) == beams and min(items) >= 0
    expected = np.argsort(-np.asarray(table[q, docids_lib.NUM_SPECIAL :]), kind="stable")[:beams]
    assert items == expected.tolist()


def random_mixed_docids(rng, n):
  """Random ids of mixed lengths over a random number of codes, some ids prefixes of others."""
  num_codes = int(rng.integers(2, 7))
  possible = sum(num_codes**length for length in range(1, 5))
  return random_docids(rng, n=min(n, possible // 2), num_codes=num_codes, min_len=1, max_len=4)


@pytest.mark.parametrize("seed", range(6))
def test_sparse_and_dense_layouts_give_identical_ids_and_scores(seed):
  rng = np.random.default_rng(500 + seed)
  dm = random_mixed_docids(rng, int(rng.integers(3, 80)))
  batch, beams = 3, int(rng.integers(1, 16))
  make_cache, tokens_to_logits, _ = toy_model(batch, dm.vocab_size, seed)
  results = {}
  for layout in ("dense", "sparse", "auto"):
    trie = trie_lib.build_trie(dm, layout=layout)
    results[layout] = run_search(tokens_to_logits, make_cache(beams), trie, batch, beams)
  assert "csr" in trie_lib.build_trie(dm, layout="sparse").layout
  for layout in ("sparse", "auto"):
    np.testing.assert_array_equal(results[layout].items, results["dense"].items)
    np.testing.assert_array_equal(results[layout].tokens, results["dense"].tokens)
    np.testing.assert_array_equal(results[layout].scores, results["dense"].scores)
    assert int(results[layout].steps) == int(results["dense"].steps)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_lookup_finds_every_id_on_both_layouts(layout):
  rng = np.random.default_rng(7)
  dm = random_mixed_docids(rng, 200)
  trie = trie_lib.build_trie(dm, layout=layout)
  targets = dm.targets()
  np.testing.assert_array_equal(trie.lookup(targets), np.arange(len(dm)))
  # Truncated ids (eos moved earlier) are found only where that prefix is itself an id.
  valid = {tuple(r) for r in targets.tolist()}
  cut = targets.copy()
  for row in cut:
    end = int(np.argmax(row == docids_lib.EOS))
    if end > 1:
      row[end - 1], row[end] = docids_lib.EOS, docids_lib.PAD
  found = np.asarray(trie.lookup(cut))
  for row, item in zip(cut.tolist(), found.tolist()):
    assert (item >= 0) == (tuple(row) in valid)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_removed_items_never_come_back(layout):
  rng = np.random.default_rng(11)
  dm = random_mixed_docids(rng, 60)
  n, batch = len(dm), 4
  trie = trie_lib.build_trie(dm, layout=layout)
  make_cache, tokens_to_logits, score = toy_model(batch, dm.vocab_size, 3)
  before = run_search(tokens_to_logits, make_cache(n), trie, batch, n)
  # Remove every query's best item and a random third of the rest.
  removed = set(before.items[:, 0].tolist()) | set(rng.choice(n, n // 3, replace=False).tolist())
  pruned = trie.remove(sorted(removed))
  kept = [i for i in range(n) if i not in removed]
  for beams in (1, 5, n):
    after = run_search(tokens_to_logits, make_cache(beams), pruned, batch, beams)
    for q in range(batch):
      found = [i for i in after.items[q].tolist() if i >= 0]
      assert not set(found) & removed
      assert len(found) == min(beams, len(kept))
  # With every beam, the ranking is the old one with the removed items taken out.
  after = run_search(tokens_to_logits, make_cache(n), pruned, batch, n)
  for q in range(batch):
    expected = [i for i in before.items[q].tolist() if i not in removed]
    assert after.items[q, : len(kept)].tolist() == expected
    np.testing.assert_array_equal(after.items[q, len(kept) :], -1)
  np.testing.assert_array_equal(
    np.asarray(pruned.lookup(dm.targets())), [i if i not in removed else -1 for i in range(n)]
  )
  # Removing everything leaves nothing to find; a bad index is an error.
  empty = trie.remove(range(n))
  assert np.all(run_search(tokens_to_logits, make_cache(3), empty, batch, 3).items == -1)
  with pytest.raises(ValueError, match="remove"):
    trie.remove([n])
