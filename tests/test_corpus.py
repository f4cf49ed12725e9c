"""Tests for the Fashion-MNIST loader and corpus sampling/splitting/persistence."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from dsi_jax.data import fashion_mnist
from dsi_jax.data.corpus import ImageCorpus, sample_corpus
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


def _toy_data(per_class: int = 30, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Images `[n, 4, 4]` whose first pixel encodes the index (mod 256); shuffled labels."""
  n = per_class * num_classes
  labels = np.random.default_rng(123).permutation(np.repeat(np.arange(num_classes), per_class))
  images = (np.arange(n)[:, None, None] % 256 * np.ones((1, 4, 4))).astype(np.uint8)
  return images, labels.astype(np.int64)


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


def test_sample_corpus_balanced_and_keys():
  images, labels = _toy_data()
  corpus = sample_corpus(images, labels, num_items=105, seed=0)
  counts = np.bincount(corpus.labels, minlength=10)
  assert counts.tolist() == [11] * 5 + [10] * 5  # Remainder spread over the first classes.
  assert len(corpus.keys) == 105 and len(set(corpus.keys)) == 105
  for key, src, image, label in zip(
    corpus.keys, corpus.source_indices, corpus.images, corpus.labels
  ):
    assert key == f"item-{src:06d}"
    assert image[0, 0] == src % 256 and label == labels[src]
  assert np.all(np.diff(corpus.source_indices) > 0)


def test_sample_corpus_splits_disjoint_and_cover():
  images, labels = _toy_data()
  corpus = sample_corpus(images, labels, num_items=200, seed=3)
  parts = [corpus.indexed, corpus.query_train, corpus.query_val, corpus.query_test]
  everything = np.concatenate(parts)
  assert sorted(everything.tolist()) == list(range(200))
  # 20 per class: 5 indexed, 15 queries -> 12/1.5/1.5, the odd one going to val.
  assert [len(p) for p in parts] == [50, 120, 20, 10]
  for part in parts:  # Every split has every class.
    assert set(corpus.labels[part].tolist()) == set(range(10))
  # 25% indexed, per class.
  assert np.all(np.bincount(corpus.labels[corpus.indexed], minlength=10) == 5)


def test_sample_corpus_small_has_val_and_test():
  images, labels = _toy_data()
  corpus = sample_corpus(images, labels, num_items=64, seed=1)
  assert len(corpus.query_val) > 0 and len(corpus.query_test) > 0
  assert (
    len(corpus.indexed) + len(corpus.query_train) + len(corpus.query_val) + len(corpus.query_test)
    == 64
  )
  for part in (corpus.indexed, corpus.query_train, corpus.query_val, corpus.query_test):
    assert set(corpus.labels[part].tolist()) == set(range(10))


def test_sample_corpus_deterministic():
  images, labels = _toy_data()
  a = sample_corpus(images, labels, num_items=80, seed=7, key_prefix="fm")
  b = sample_corpus(images, labels, num_items=80, seed=7, key_prefix="fm")
  c = sample_corpus(images, labels, num_items=80, seed=8, key_prefix="fm")
  assert a.keys == b.keys and a.keys[0].startswith("fm-")
  for name in ("indexed", "query_train", "query_val", "query_test"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert a.keys != c.keys


@pytest.mark.parametrize(
  "num_items, match",
  [(301, "num_items=301 exceeds"), (19, "num_items=19 is below"), (295, "class")],
)
def test_sample_corpus_errors(num_items, match):
  images, labels = _toy_data()
  labels = labels.copy()
  if num_items == 295:  # Make class 9 too small for 295 // 10 = 29 items.
    labels[np.flatnonzero(labels == 9)[:5]] = 0
  with pytest.raises(ValueError, match=match):
    sample_corpus(images, labels, num_items=num_items)


def test_relevant_keys_and_query_relevance():
  images, labels = _toy_data()
  corpus = sample_corpus(images, labels, num_items=100, seed=2)
  for i in range(len(corpus.keys)):
    expected = {corpus.keys[j] for j in corpus.indexed if corpus.labels[j] == corpus.labels[i]}
    assert corpus.relevant_keys(i) == expected
    assert len(expected) >= 2
  assert set(corpus.indexed_keys) == {corpus.keys[j] for j in corpus.indexed}
  relevance = corpus.query_relevance("val")
  assert len(relevance) == len(corpus.query_val)
  for i, rel in zip(corpus.query_val, relevance):
    assert rel == corpus.relevant_keys(int(i))
    assert corpus.keys[i] not in rel  # A query is never an indexed item.
  with pytest.raises(ValueError):
    corpus.query_relevance("indexed")


# --------------------------------------------------------------------------------------------
# Persistence.


def test_save_load_round_trip(tmp_path):
  images, labels = _toy_data()
  corpus = sample_corpus(images, labels, num_items=60, seed=4)
  path = tmp_path / "corpus.json"
  corpus.save(path)
  assert os.listdir(tmp_path) == ["corpus.json"]  # No temporary file left behind.
  loaded = ImageCorpus.load(path, images, labels)
  assert loaded.keys == corpus.keys
  np.testing.assert_array_equal(loaded.images, corpus.images)
  np.testing.assert_array_equal(loaded.labels, corpus.labels)
  np.testing.assert_array_equal(loaded.source_indices, corpus.source_indices)
  for name in ("indexed", "query_train", "query_val", "query_test"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(corpus, name))
  assert "pickle" not in path.read_text()  # Plain JSON.
  json.loads(path.read_text())


def _corrupt(path, edit) -> None:
  data = json.loads(path.read_text())
  edit(data)
  path.write_text(json.dumps(data))


@pytest.mark.parametrize(
  "edit, match",
  [
    (lambda d: d["splits"]["query_val"].append("item-999999"), "unknown keys"),
    (lambda d: d["splits"]["query_test"].append(d["splits"]["indexed"][0]), "repeats"),
    (lambda d: d["keys"].__setitem__(1, d["keys"][0]), "duplicate keys"),
    (lambda d: d["source_indices"].__setitem__(0, 10**6), "out of range"),
    (lambda d: d["labels"].__setitem__(0, (d["labels"][0] + 1) % 10), "labels do not match"),
    (lambda d: d.pop("splits"), "missing"),
  ],
)
def test_load_corrupted(tmp_path, edit, match):
  images, labels = _toy_data()
  path = tmp_path / "corpus.json"
  sample_corpus(images, labels, num_items=40).save(path)
  _corrupt(path, edit)
  with pytest.raises(ValueError, match=match) as info:
    ImageCorpus.load(path, images, labels)
  assert "corpus.json" in str(info.value)


def test_load_truncated_json(tmp_path):
  images, labels = _toy_data()
  path = tmp_path / "corpus.json"
  sample_corpus(images, labels, num_items=40).save(path)
  path.write_text(path.read_text()[:50])
  with pytest.raises(ValueError, match="corpus.json"):
    ImageCorpus.load(path, images, labels)
