"""Pseudo-queries as SeqIO preprocessors: views of the items only, deterministic per seed."""

import os

import numpy as np
import pytest
import seqio

from dsi_jax import tasks
from dsi_jax.data import corpus as corpus_lib

SENTENCES = [
  "The {0} river floods every spring.",
  "Farmers near the {0} plant rice in the silt!",
  "Is the {0} delta still growing?",
  "Boats carry grain down the {0} to the sea.",
]


def text_corpus_data(n=12):
  keys = [f"doc{i}" for i in range(n)]
  texts = {k: " ".join(s.format(f"name{i}") for s in SENTENCES) for i, k in enumerate(keys)}
  questions = [
    [(f"q{i}_{j}", f"question {j} about name{i} and its river?") for j in range(10)]
    for i in range(n)
  ]
  corpus = corpus_lib.qa_corpus(keys, questions, num_items=n)
  return tasks.CorpusData(corpus, corpus.make_docids("atomic"), texts=texts)


def read(task):
  ds = seqio.get_mixture_or_task(task).get_dataset(
    None, split="train", shuffle=False, use_cached=False, num_epochs=1
  )
  return list(ds.as_numpy_iterator())


def register_text(name, **kwargs):
  data = text_corpus_data()
  tasks.register_dsi_tasks(name, data, modality="text")
  tasks.add_pseudo_queries(name, tasks.PseudoQueries(**kwargs))
  return data


def test_text_pseudo_queries_are_sentences_or_spans_of_their_own_item_only():
  data = register_text("test_pq_text", per_item=6, span_length=(4, 9))
  vocab = seqio.ByteVocabulary()
  examples = read("test_pq_text_pseudo_queries")
  assert len(examples) == 6 * len(data.corpus.indexed)
  held_out = {q.text.encode() for split in ("validation", "test") for q in data.corpus.split(split)}
  kinds = set()
  for ex in examples:
    item, _, j = ex["key"].decode().partition("#pq")
    row = data.docids.index(item)
    assert ex["relevant"].tolist() == [row] and 0 <= int(j) < 6
    assert ex["targets"][-1] == 1  # eos-terminated id of its own item
    text = vocab.decode(ex["inputs"].tolist()[:-1])  # without the eos
    assert text.encode() not in held_out and text in data.texts[item]
    sentences = [s.format(f"name{row}") for s in SENTENCES]
    if text in sentences:
      kinds.add("sentence")
    else:  # a window of 4..9 byte tokens
      assert 4 <= len(text.encode()) <= 9
      kinds.add("span")
  assert kinds == {"sentence", "span"}


def test_sentence_views_of_an_item_cover_its_sentences():
  data = register_text("test_pq_cover", per_item=4, views=(("sentence", 1.0),))
  vocab = seqio.ByteVocabulary()
  views = {}
  for ex in read("test_pq_cover_pseudo_queries"):
    item = ex["key"].decode().split("#pq")[0]
    views.setdefault(item, []).append(vocab.decode(ex["inputs"].tolist()[:-1]))
  for item, texts in views.items():
    row = data.docids.index(item)
    assert sorted(texts) == sorted(s.format(f"name{row}") for s in SENTENCES)


def test_pseudo_queries_are_deterministic_per_seed():
  register_text("test_pq_seed_a", per_item=3, seed=0)
  register_text("test_pq_seed_b", per_item=3, seed=0)
  register_text("test_pq_seed_c", per_item=3, seed=1)
  a, b, c = (read(f"test_pq_seed_{x}_pseudo_queries") for x in "abc")
  as_pairs = lambda exs: [(e["key"], e["inputs"].tobytes()) for e in exs]  # noqa: E731
  assert as_pairs(a) == as_pairs(b)  # a fresh pipeline, the same examples
  assert as_pairs(a) != as_pairs(c)
  # the same pseudo-queries in any order: each depends on its own key, not on its position
  assert sorted(as_pairs(a)) == sorted(as_pairs(read("test_pq_seed_a_pseudo_queries")[::-1]))


def test_retrieval_data_adds_pseudo_queries_to_training_only_and_the_mixture_draws_them():
  data = text_corpus_data()
  tasks.register_dsi_tasks("test_pq_plain", data, modality="text")
  plain, _ = tasks.retrieval_data("test_pq_plain", text_length=24)
  tasks.register_dsi_tasks("test_pq_more", data, modality="text")
  tasks.add_pseudo_queries("test_pq_more", tasks.PseudoQueries(per_item=2))
  more, _ = tasks.retrieval_data("test_pq_more", text_length=24)
  n = len(plain.train_inputs)
  assert len(more.train_inputs) == n + 2 * len(data.corpus.indexed)
  np.testing.assert_array_equal(more.train_inputs[:n], plain.train_inputs)
  assert [r.tolist() for r in more.train_relevant[n:]] == [
    [i] for i in range(len(data.corpus.indexed)) for _ in range(2)
  ]
  for split in ("val", "test"):
    np.testing.assert_array_equal(
      getattr(more, f"{split}_inputs"), getattr(plain, f"{split}_inputs")
    )
  mixture = seqio.get_mixture_or_task("test_pq_more")
  assert {t.name for t in mixture.tasks} == {
    "test_pq_more_indexing",
    "test_pq_more_retrieval",
    "test_pq_more_pseudo_queries",
  }
  # registering the corpus again without them removes them
  tasks.register_dsi_tasks("test_pq_more", data, modality="text")
  again, _ = tasks.retrieval_data("test_pq_more", text_length=24)
  assert len(again.train_inputs) == n


def test_image_pseudo_queries_are_augmented_views_of_their_item():
  rng = np.random.default_rng(0)
  keys = [f"img{i}" for i in range(40)]
  images = {k: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for k in keys}
  corpus = corpus_lib.class_corpus(keys, np.arange(40) % 2, num_items=32)
  data = tasks.CorpusData(corpus, corpus.make_docids("random"), images=images)
  config = tasks.PseudoQueries(per_item=2, views=(("augment", 1.0),))
  tasks.register_dsi_tasks("test_pq_image", data)
  tasks.add_pseudo_queries("test_pq_image", config)
  examples = read("test_pq_image_pseudo_queries")
  assert len(examples) == 2 * len(corpus.indexed) == 16
  for ex in examples:
    item = ex["key"].decode().split("#pq")[0]
    original = images[item] / 127.5 - 1.0
    assert ex["inputs"].shape == (16, 16, 3)
    assert ex["inputs"].min() >= -1 and ex["inputs"].max() <= 1
    assert not np.allclose(ex["inputs"], original, atol=1e-3)
    assert ex["relevant"].tolist() == [data.docids.index(item)]


def test_pseudo_query_settings_that_cannot_apply_are_one_line_errors():
  with pytest.raises(ValueError, match="unknown pseudo-query view 'paraphrase'"):
    tasks.PseudoQueries(views=(("paraphrase", 1.0),))
  with pytest.raises(ValueError, match="per_item"):
    tasks.PseudoQueries(per_item=0)
  data = text_corpus_data()
  tasks.register_dsi_tasks("test_pq_bad", data, modality="text")
  with pytest.raises(ValueError, match="'augment' does not apply to a text corpus"):
    tasks.add_pseudo_queries("test_pq_bad", tasks.PseudoQueries(views=(("augment", 1.0),)))
  with pytest.raises(ValueError, match="no DSI corpus registered as 'nowhere'"):
    tasks.add_pseudo_queries("nowhere", tasks.PseudoQueries())


def test_the_fashion_mnist_experiment_adds_augmented_views_of_its_indexed_images(tmp_path):
  """`FashionMnistConfig(pseudo_queries=N)`: the same corpus and ids, N views per indexed image
  after the training queries."""
  from dsi_jax import errors
  from dsi_jax.data import fashion_mnist
  from dsi_jax.experiments import fashion_mnist as experiment

  if not os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)):
    pytest.skip("Fashion-MNIST not installed")
  plain = experiment._register(experiment.FashionMnistConfig(num_images=40), str(tmp_path), "t")
  more = experiment._register(
    experiment.FashionMnistConfig(num_images=40, pseudo_queries=2), str(tmp_path), "t"
  )
  assert more == plain + "_pq2"
  a, ids_a = tasks.retrieval_data(plain)
  b, ids_b = tasks.retrieval_data(more)
  assert ids_a.keys == ids_b.keys
  n, indexed = len(a.train_inputs), len(a.index_inputs)
  assert len(b.train_inputs) == n + 2 * indexed
  np.testing.assert_array_equal(b.test_inputs, a.test_inputs)
  with pytest.raises(errors.UserError, match="pseudo_queries must be 0 or more"):
    experiment.FashionMnistConfig(pseudo_queries=-1)
