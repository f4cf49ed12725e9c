import json

import numpy as np
import pytest

from dsi_jax import docids as docids_lib
from dsi_jax.trie import build_trie


def test_random_ids_are_dense_and_distinct():
  keys = [f"k{i}" for i in range(128)]
  dm = docids_lib.random_ids(keys, num_codes=10, seed=3)
  assert len({c for c in dm.codes}) == 128
  numbers = sorted(int("".join(map(str, c))) for c in dm.codes)
  assert numbers == list(range(128))  # dense: every number 0..N-1 once
  assert dm.max_length == 4  # three digits + eos
  assert dm.codes != docids_lib.random_ids(keys, num_codes=10, seed=4).codes


def test_clustered_ids_are_consecutive_per_class():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, size=60)
  keys = [f"k{i}" for i in range(60)]
  dm = docids_lib.clustered_ids(keys, labels, num_codes=10)
  number = {k: int("".join(map(str, c))) for k, c in zip(dm.keys, dm.codes)}
  for label in range(5):
    nums = sorted(number[k] for k, lab in zip(keys, labels) if lab == label)
    assert nums == list(range(nums[0], nums[0] + len(nums)))
  # Classes come in label order.
  firsts = [min(number[k] for k, lab in zip(keys, labels) if lab == c) for c in range(5)]
  assert firsts == sorted(firsts)


def test_targets_have_eos_and_pad():
  dm = docids_lib.from_mapping({"a": [0, 1], "b": [2]}, num_codes=3)
  np.testing.assert_array_equal(dm.targets(), [[2, 3, 1], [4, 1, 0]])
  assert dm.vocab_size == 5 and dm.id_string("a") == "0-1"


def test_round_trip(tmp_path):
  dm = docids_lib.random_ids([f"k{i}" for i in range(37)], seed=1)
  path = tmp_path / "ids.json"
  dm.save(path)
  assert docids_lib.DocidMap.load(path) == dm
  assert [p.name for p in tmp_path.iterdir()] == ["ids.json"]  # no temp file left


@pytest.mark.parametrize(
  "corrupt, message",
  [
    (lambda d: d["ids"].update({"k1": d["ids"]["k0"]}), "share the id"),
    (lambda d: d["ids"].update({"k2": [3, 99]}), "unknown code 99"),
    (lambda d: d["ids"].update({"k3": []}), "is empty"),
    (lambda d: d.pop("num_codes"), "missing field 'num_codes'"),
    (lambda d: d.update({"format": "other"}), "not a docid map"),
  ],
)
def test_load_rejects_corrupted_file(tmp_path, corrupt, message):
  dm = docids_lib.random_ids([f"k{i}" for i in range(20)], seed=0)
  data = dm.to_json()
  corrupt(data)
  path = tmp_path / "ids.json"
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=message) as err:
    docids_lib.DocidMap.load(path)
  assert str(path) in str(err.value)


def test_load_rejects_duplicate_key(tmp_path):
  path = tmp_path / "ids.json"
  path.write_text(
    '{"format": "dsi_jax.docids/1", "scheme": "random", "num_codes": 10,'
    ' "ids": {"a": [1], "a": [2]}}'
  )
  with pytest.raises(ValueError, match="'a' appears more than once"):
    docids_lib.DocidMap.load(path)


def test_truncated_file(tmp_path):
  path = tmp_path / "ids.json"
  path.write_text('{"format": "dsi_jax.docids/1", "ids": {"a": [1')
  with pytest.raises(ValueError, match="not a JSON docid map"):
    docids_lib.DocidMap.load(path)


# --------------------------------------------------------------------------------------------
# Schemes from embeddings and plain numbers.


def _embeddings(n=300, dim=16, seed=0):
  return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("scheme", ["random", "atomic", "naive", "semantic", "rq"])
def test_every_scheme_builds_a_valid_collision_free_map(scheme, tmp_path):
  keys = [f"doc{i}" for i in range(300)]
  kwargs = {"embeddings": _embeddings()} if scheme in ("semantic", "rq") else {}
  if scheme == "semantic":
    ids = docids_lib.semantic_ids(keys, kwargs["embeddings"], k=4, c=10)
  elif scheme == "rq":
    ids = docids_lib.rq_ids(keys, kwargs["embeddings"], levels=2, codebook_size=8)
  else:
    ids = docids_lib.make_docids(scheme, keys, **kwargs)
  assert ids.scheme == scheme and len(set(ids.codes)) == 300
  ids.save(tmp_path / "ids.json")  # the constructor and load both validate
  assert docids_lib.DocidMap.load(tmp_path / "ids.json") == ids
  # Every id decodes back through the trie.
  trie = build_trie(ids)
  assert int(trie.num_items) == 300


def test_naive_ids_are_plain_numbers_of_varying_length():
  ids = docids_lib.naive_ids([f"d{i}" for i in range(120)])
  assert ids.id_string("d7") == "7" and ids.id_string("d42") == "4-2"
  assert ids.id_string("d105") == "1-0-5" and ids.max_length == 4


def test_semantic_ids_put_near_duplicates_under_a_shared_prefix():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(6, 8)) * 10
  x = np.concatenate([c + 0.01 * rng.normal(size=(40, 8)) for c in centres])
  keys = [f"doc{i}" for i in range(len(x))]
  ids = docids_lib.semantic_ids(keys, x, k=6, c=10, seed=0)
  first = {}
  for i, key in enumerate(keys):
    first.setdefault(i // 40, set()).add(ids.codes[ids.index(key)][0])
  # Each group of near-duplicates sits under one first code, and groups get different codes.
  assert all(len(v) == 1 for v in first.values())
  assert len({next(iter(v)) for v in first.values()}) == 6
  # Identical embeddings still get distinct ids (split by position).
  same = docids_lib.semantic_ids([f"s{i}" for i in range(25)], np.ones((25, 4)), k=3, c=10)
  assert len(set(same.codes)) == 25


def test_rq_ids_separate_items_sharing_every_code():
  x = np.repeat(_embeddings(10, 4), 3, axis=0)  # each embedding three times
  ids = docids_lib.rq_ids([f"d{i}" for i in range(30)], x, levels=2, codebook_size=4)
  tails = sorted(c[-1] for c in ids.codes)
  assert len(set(ids.codes)) == 30 and max(tails) >= 2


def test_embedding_schemes_reject_bad_embeddings():
  with pytest.raises(ValueError, match="needs item embeddings"):
    docids_lib.make_docids("semantic", ["a", "b"])
  with pytest.raises(ValueError, match=r"embeddings must be \[num_items=2"):
    docids_lib.semantic_ids(["a", "b"], np.zeros((3, 4)))
  with pytest.raises(ValueError, match="NaN"):
    docids_lib.rq_ids(["a", "b"], np.array([[0.0, np.nan], [1.0, 1.0]]))


def test_extend_ids_keeps_old_ids_and_follows_each_scheme():
  keys = [f"k{i}" for i in range(30)]
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 8)) * 10
  emb = np.concatenate([c + rng.normal(size=(10, 8)) for c in centers]).astype(np.float32)
  for old in (
    docids_lib.atomic_ids(keys),
    docids_lib.random_ids(keys, num_codes=4, seed=1),
    docids_lib.semantic_ids(keys, emb, k=3, c=12, seed=0),
  ):
    new_emb = (centers[[2, 0]] + 0.1).astype(np.float32)
    grown = docids_lib.extend_ids(old, ["n0", "n1"], embeddings=new_emb, old_embeddings=emb, seed=3)
    assert grown.codes[:30] == old.codes and grown.keys[30:] == ("n0", "n1")
    if old.scheme == "atomic":
      assert grown.codes[30:] == ((30,), (31,)) and grown.vocab_size == old.vocab_size + 2
    else:
      assert grown.num_codes == old.num_codes
    if old.scheme == "random":
      assert {len(c) for c in grown.codes} == {3}  # 4**3 = 64 ids of 3 digits
    if old.scheme == "semantic":  # the leaf of the nearest old item: its cluster
      for key, center in (("n0", 2), ("n1", 0)):
        leaf = grown.codes[grown.index(key)][:-1]
        assert leaf == old.codes[center * 10][:-1]
  full = docids_lib.random_ids(keys[:16], num_codes=4, seed=0)  # 2 digits: 16 ids, all used
  with pytest.raises(ValueError, match="do not fit"):
    docids_lib.extend_ids(full, ["x"])
  with pytest.raises(ValueError, match="already has an id"):
    docids_lib.extend_ids(full, ["k3"])
