import json

import numpy as np
import pytest

from dsi_jax import docids as docids_lib


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
