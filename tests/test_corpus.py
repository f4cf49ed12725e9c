"""Tests for the Fashion-MNIST loader and corpus sampling/splitting/persistence."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from dsi_jax import docids as docids_lib
from dsi_jax.data import corpus as corpus_lib
from dsi_jax.data import fashion_mnist
from dsi_jax.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _idx_bytes(magic: int, dims: list[int], payload: bytes) -> bytes:
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
  return header + payload


def _write_fake(directory, num: int = 3, images_bytes: bytes | None = None) -> None:
  """Writes a tiny valid `t10k` split into `directory`, or given image-file bytes."""
  if images_bytes is None:
    images_bytes = _idx_bytes(2051, [num, 28, 28], bytes(num * 28 * 28))
  with gzip.open(os.path.join(directory, "t10k-images-idx3-ubyte.gz"), "wb") as f:
    f.write(images_bytes)
  with gzip.open(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
    f.write(_idx_bytes(2049, [num], bytes([1, 9, 0][:num])))


def _toy_data(per_class: int = 30, num_classes: int = 10) -> tuple[list[str], np.ndarray]:
  """Item keys and shuffled class labels."""
  n = per_class * num_classes
  labels = np.random.default_rng(123).permutation(np.repeat(np.arange(num_classes), per_class))
  return [f"item-{i:06d}" for i in range(n)], labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST loader.


def test_load_fashion_mnist_train():
  if not os.path.isdir(FASHION_DIR):
    pytest.skip(f"{FASHION_DIR} not installed")
  images, labels = load_fashion_mnist("train", FASHION_DIR)
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (60000,) and labels.dtype == np.int64
  assert labels.min() == 0 and labels.max() == 9
  assert np.all(np.bincount(labels) == 6000)
  assert images.max() > 200 and images.flags.writeable
  assert len(CLASS_NAMES) == 10


def test_load_fake_split_and_env_var(tmp_path, monkeypatch):
  _write_fake(tmp_path)
  monkeypatch.setenv("DSI_JAX_FASHION_MNIST_DIR", str(tmp_path))
  images, labels = load_fashion_mnist("test")
  assert images.shape == (3, 28, 28)
  assert labels.tolist() == [1, 9, 0]


def test_load_missing_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    load_fashion_mnist("train", str(tmp_path / "nowhere"))


def test_load_bad_split():
  with pytest.raises(ValueError, match="split"):
    load_fashion_mnist("validation", "/tmp")


@pytest.mark.parametrize(
  "payload, message",
  [
    (_idx_bytes(2049, [3, 28, 28], bytes(3 * 28 * 28)), "magic"),  # Labels magic on images.
    (_idx_bytes(2051, [3, 28, 28], bytes(3 * 28 * 28 - 5)), "size"),  # Truncated payload.
    (b"\x00\x00\x08", "truncated"),  # Truncated header.
  ],
)
def test_load_bad_images_file(tmp_path, payload, message):
  _write_fake(tmp_path, images_bytes=payload)
  with pytest.raises(ValueError, match=message) as info:
    load_fashion_mnist("test", str(tmp_path))
  assert "t10k-images-idx3-ubyte.gz" in str(info.value)


def test_load_corrupt_gzip(tmp_path):
  _write_fake(tmp_path)
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # Truncated gzip stream.
  with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
    load_fashion_mnist("test", str(tmp_path))
  path.write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
    load_fashion_mnist("test", str(tmp_path))


def test_module_default_dir():
  assert fashion_mnist.DEFAULT_DIR == FASHION_DIR


# --------------------------------------------------------------------------------------------
# Sampling.


def _split_keys(corpus):
  return {name: [q.item for q in corpus.split(name)] for name in corpus_lib.QUERY_SPLITS}


def test_class_corpus_balanced_splits_and_relevance():
  keys, labels = _toy_data()
  label_of = dict(zip(keys, labels))
  corpus = corpus_lib.class_corpus(keys, labels, num_items=200, seed=3)
  splits = _split_keys(corpus)
  # 20 per class: 5 indexed, 15 queries -> 12 / 1.5 / 1.5, the odd one going to validation.
  assert [len(corpus.indexed)] + [len(v) for v in splits.values()] == [50, 120, 20, 10]
  everything = list(corpus.indexed) + sum(splits.values(), [])
  assert len(set(everything)) == 200
  for part in [list(corpus.indexed), *splits.values()]:  # Every split has every class.
    assert {label_of[k] for k in part} == set(range(10))
  for name in corpus_lib.QUERY_SPLITS:
    for q in corpus.split(name):
      assert set(q.relevant) == {k for k in corpus.indexed if label_of[k] == label_of[q.item]}
  assert corpus.labels == {k: label_of[k] for k in corpus.indexed}


def test_class_corpus_remainder_and_small():
  keys, labels = _toy_data()
  label_of = dict(zip(keys, labels))
  corpus = corpus_lib.class_corpus(keys, labels, num_items=105, seed=0)
  counts = np.bincount([label_of[k] for k in corpus.item_keys], minlength=10)
  assert counts.tolist() == [11] * 5 + [10] * 5  # Remainder spread over the first classes.
  small = corpus_lib.class_corpus(keys, labels, num_items=64, seed=1)
  assert all(len(small.split(name)) > 0 for name in corpus_lib.QUERY_SPLITS)


def test_class_corpus_deterministic():
  keys, labels = _toy_data()
  a = corpus_lib.class_corpus(keys, labels, num_items=80, seed=7)
  b = corpus_lib.class_corpus(keys, labels, num_items=80, seed=7)
  c = corpus_lib.class_corpus(keys, labels, num_items=80, seed=8)
  assert a == b and a.indexed != c.indexed


@pytest.mark.parametrize(
  "num_items, match",
  [(301, "num_items=301 exceeds the 300 items"), (19, "num_items=19 is below"), (295, "class")],
)
def test_class_corpus_errors(num_items, match):
  keys, labels = _toy_data()
  labels = labels.copy()
  if num_items == 295:  # Make class 9 too small for 295 // 10 = 29 items.
    labels[np.flatnonzero(labels == 9)[:5]] = 0
  with pytest.raises(ValueError, match=match):
    corpus_lib.class_corpus(keys, labels, num_items=num_items)


def test_empty_data_set_is_an_error():
  with pytest.raises(ValueError, match="empty corpus"):
    corpus_lib.caption_corpus([], [])


def test_category_corpus_relevance_is_a_shared_category():
  rng = np.random.default_rng(0)
  keys = [f"coco-{i}" for i in range(80)]
  cats = [sorted(set(rng.integers(0, 6, size=rng.integers(0, 3)).tolist())) for _ in keys]
  cat_of = dict(zip(keys, cats))
  corpus = corpus_lib.category_corpus(keys, cats, num_items=40, seed=1)
  assert all(cat_of[k] for k in corpus.item_keys)  # Items without a category are never drawn.
  for name in corpus_lib.QUERY_SPLITS:
    for q in corpus.split(name):
      expected = {k for k in corpus.indexed if set(cat_of[k]) & set(cat_of[q.item])}
      assert set(q.relevant) == expected and expected
  kept = sum(len(corpus.split(n)) for n in corpus_lib.QUERY_SPLITS)
  assert kept + corpus.source["dropped_queries"] + len(corpus.indexed) == 40


def test_caption_corpus_splits_each_images_captions_3_1_1():
  keys = [f"img{i}.jpg" for i in range(10)]
  caps = [[f"caption {j} of {k}" for j in range(5)] for k in keys]
  corpus = corpus_lib.caption_corpus(keys, caps, num_items=6, seed=0)
  assert len(corpus.indexed) == 6
  sizes = [len(corpus.split(n)) for n in corpus_lib.QUERY_SPLITS]
  assert sizes == [18, 6, 6]
  for q in corpus.split("test"):
    (image,) = q.relevant
    assert q.text == f"caption 4 of {image}" and q.item is None


def test_qa_corpus_questions_point_to_their_paragraph():
  keys = [f"doc{i}" for i in range(5)]
  questions = [[(f"q{i}-{j}", f"question {j} about doc{i}") for j in range(10)] for i in range(5)]
  corpus = corpus_lib.qa_corpus(keys, questions, seed=0)
  assert corpus.indexed == tuple(keys)
  assert [len(corpus.split(n)) for n in corpus_lib.QUERY_SPLITS] == [40, 5, 5]
  for name in corpus_lib.QUERY_SPLITS:
    for q in corpus.split(name):
      assert q.text.endswith(q.relevant[0])


# --------------------------------------------------------------------------------------------
# Persistence.


def test_save_load_round_trip(tmp_path):
  keys, labels = _toy_data()
  corpus = corpus_lib.class_corpus(keys, labels, num_items=60, seed=4)
  ids = corpus.make_docids("clustered")
  corpus_lib.save_corpus(tmp_path / "c", corpus, ids)
  assert sorted(os.listdir(tmp_path)) == ["c"]  # No temporary folder left behind.
  assert sorted(os.listdir(tmp_path / "c")) == ["corpus.json", "docids.json"]
  loaded, loaded_ids = corpus_lib.load_corpus(tmp_path / "c")
  assert loaded == corpus and loaded_ids == ids
  # Saving again replaces the pair as a whole.
  other = corpus_lib.class_corpus(keys, labels, num_items=60, seed=5)
  corpus_lib.save_corpus(tmp_path / "c", other, other.make_docids("random"))
  assert corpus_lib.load_corpus(tmp_path / "c")[0] == other
  assert sorted(os.listdir(tmp_path)) == ["c"]


def test_save_rejects_ids_of_other_items(tmp_path):
  keys, labels = _toy_data()
  corpus = corpus_lib.class_corpus(keys, labels, num_items=60, seed=4)
  ids = docids_lib.random_ids(["a", "b"])
  with pytest.raises(ValueError, match="indexed keys"):
    corpus_lib.save_corpus(tmp_path / "c", corpus, ids)
  assert not os.listdir(tmp_path)


def _corrupt(path, edit) -> None:
  data = json.loads(path.read_text())
  edit(data)
  path.write_text(json.dumps(data))


@pytest.mark.parametrize(
  "edit, match",
  [
    (lambda d: d["queries"]["validation"][0]["relevant"].append("item-999999"), "not indexed"),
    (lambda d: d["queries"]["test"].append(d["queries"]["train"][0]), "more than once"),
    (lambda d: d["indexed"].append(d["indexed"][0]), "more than once"),
    (lambda d: d["queries"]["test"][0].__setitem__("item", d["indexed"][0]), "is the indexed"),
    (lambda d: d["labels"].pop(d["indexed"][0]), "has no label"),
    (lambda d: d.pop("queries"), "missing"),
    (lambda d: d.__setitem__("format", "other"), "not a corpus file"),
  ],
)
def test_load_corrupted(tmp_path, edit, match):
  keys, labels = _toy_data()
  corpus = corpus_lib.class_corpus(keys, labels, num_items=40)
  corpus_lib.save_corpus(tmp_path, corpus, corpus.make_docids("random"))
  _corrupt(tmp_path / "corpus.json", edit)
  with pytest.raises(ValueError, match=match) as info:
    corpus_lib.load_corpus(tmp_path)
  assert "corpus.json" in str(info.value) and "\n" not in str(info.value)


def test_load_truncated_json(tmp_path):
  keys, labels = _toy_data()
  corpus = corpus_lib.class_corpus(keys, labels, num_items=40)
  corpus_lib.save_corpus(tmp_path, corpus, corpus.make_docids("random"))
  path = tmp_path / "corpus.json"
  path.write_text(path.read_text()[:50])
  with pytest.raises(ValueError, match="corpus.json"):
    corpus_lib.load_corpus(tmp_path)
