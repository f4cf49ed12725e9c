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


def test_trie_tables_small():
  dm = docids_lib.from_mapping({"a": [0, 1], "b": [0], "c": [1, 1]}, num_codes=2)
  trie = trie_lib.build_trie(dm)
  t = np.asarray(trie.transitions)
  root_children = t[0]
  assert root_children[docids_lib.PAD] == -1 and root_children[docids_lib.EOS] == -1
  n0 = root_children[2]  # prefix "0"
  assert n0 > 0 and root_children[3] > 0
  # "0" is a complete id (b) and a prefix of "0 1" (a): eos and code 1 both allowed.
  assert t[n0, docids_lib.EOS] >= 0 and t[n0, 3] >= 0 and t[n0, 2] == -1
  assert np.asarray(trie.node_item)[t[n0, docids_lib.EOS]] == dm.index("b")
  assert trie.max_length == 3 and trie.num_items == 3


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
