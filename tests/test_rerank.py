"""Re-ranking: the Reranked retriever, the cross-encoder network, hard negatives, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsi_jax import cross_training, evaluation, rerank
from dsi_jax.models import cross_encoder, text


class ListRetriever:
  """A first stage that returns fixed rankings (query i -> rankings[i])."""

  def __init__(self, rankings, keys):
    self.rankings = rankings
    self.keys = keys

  def search(self, queries, k):
    ranked = [list(self.rankings[int(q)][:k]) for q in queries]
    return ranked, [np.arange(len(r), 0, -1, dtype=np.float32) for r in ranked]


class FunctionScorer:
  """Scores a pair by a known function of (query, key)."""

  def __init__(self, fn):
    self.fn = fn
    self.calls = 0

  def score(self, queries, candidates):
    self.calls += 1
    return [
      np.asarray([self.fn(q, key) for key in c], np.float32) for q, c in zip(queries, candidates)
    ]


def _score_fn(q, key):
  return float((int(key) * 7 + int(q) * 3) % 11)


def test_reranking_is_the_scorers_order_above_k_and_the_first_stages_below():
  rng = np.random.default_rng(0)
  keys = [str(i) for i in range(60)]
  for _ in range(30):
    num_queries = int(rng.integers(1, 6))
    rankings = [
      [keys[j] for j in rng.permutation(60)[: int(rng.integers(0, 40))]] for _ in range(num_queries)
    ]
    k_rerank = int(rng.integers(1, 25))
    k_out = int(rng.integers(1, 45))
    scorer = FunctionScorer(_score_fn)
    retriever = rerank.Reranked(ListRetriever(rankings, keys), scorer, k=k_rerank)
    queries = np.arange(num_queries)
    ranked, scores = retriever.search(queries, k_out)
    assert scorer.calls == 1  # all queries' pairs at once
    for q, (row, first) in enumerate(zip(ranked, rankings)):
      expected_len = min(k_out, len(first))
      assert len(row) == expected_len and len(set(row)) == len(row)  # nothing dropped or doubled
      assert set(row) <= set(first)
      head = first[:k_rerank]
      want_head = sorted(head, key=lambda key: -_score_fn(q, key))  # stable: ties keep order
      assert row[: len(head)] == want_head[: len(row)]
      assert row[len(head) :] == first[len(head) : expected_len]  # below k untouched
      assert np.all(np.isnan(scores[q][len(head) :]))
      assert np.all(np.diff(scores[q][: len(head)]) <= 0)


def test_full_fusion_weight_keeps_the_first_stage_order():
  keys = [str(i) for i in range(30)]
  rankings = [keys[::-1][:25]]
  retriever = rerank.Reranked(
    ListRetriever(rankings, keys), FunctionScorer(_score_fn), fusion_weight=1.0
  )
  assert retriever.search([0], 25)[0][0] == rankings[0]
  half = rerank.fuse(np.asarray([0.0, 1.0]), np.asarray([1.0, 0.0]), 0.5)
  np.testing.assert_allclose(half, [0.0, 0.0])


def test_reranked_goes_through_the_harness_and_records_latency():
  keys = [str(i) for i in range(30)]
  rankings = [keys[:25], keys[5:]]
  # Item "3" is relevant to query 0; the scorer puts it first.
  scorer = FunctionScorer(lambda q, key: 1.0 if key == "3" else 0.0)
  retriever = rerank.Reranked(ListRetriever(rankings, keys), scorer, k=10)
  first = evaluation.evaluate(ListRetriever(rankings, keys), [0, 1], [{"3"}, {"5"}], ["hits@1"])
  values = evaluation.evaluate(retriever, [0, 1], [{"3"}, {"5"}], ["hits@1", "mrr@10"])
  assert first["hits@1"] == 0.5 and values["hits@1"] == 1.0
  latency = retriever.latency_ms()
  assert latency["total_ms"] >= latency["rerank_ms"] >= 0 and retriever.num_pairs == 20
  assert retriever.full_index_ms(30) == pytest.approx(latency["rerank_ms"] * 30 / 10)
  with pytest.raises(ValueError, match="fusion_weight"):
    rerank.Reranked(ListRetriever(rankings, keys), scorer, fusion_weight=2.0)


# ----------------------------------------------------------------------------- the network


@pytest.fixture(scope="module")
def minilm():
  return text.load_minilm()


def test_cross_encoder_loads_minilm_exactly(minilm):
  encoder, bert_params, tokenizer = minilm
  model = cross_encoder.CrossEncoder(encoder.config)
  ids, mask = text.tokenize(tokenizer, ["where is the tower?", "a paragraph about paris"], 32)
  params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
  params = cross_encoder.with_pretrained(params, bert_params)
  hidden, _ = model.apply({"params": params}, ids, mask, method="encode")
  want, _ = encoder.apply({"params": bert_params}, ids, mask)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(want), atol=1e-5)
  emb = model.apply({"params": params}, ids, mask, method="embed")
  want_emb = text.embed_texts(
    encoder, bert_params, tokenizer, ["where is the tower?", "a paragraph about paris"]
  )
  np.testing.assert_allclose(np.asarray(emb), want_emb, atol=1e-5)
  logits = model.apply({"params": params}, ids, mask)
  assert logits.shape == (2,) and logits.dtype == jnp.float32


def test_with_pretrained_rejects_another_size(minilm):
  _, bert_params, _ = minilm
  small = text.BertConfig(vocab_size=40, hidden=32, layers=1, heads=2, intermediate=64)
  model = cross_encoder.CrossEncoder(small)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
  with pytest.raises(ValueError, match="does not match"):
    cross_encoder.with_pretrained(params, bert_params)


def _tiny(image_dim=None):
  config = text.BertConfig(
    vocab_size=30522, hidden=32, layers=1, heads=2, intermediate=64, dropout=0.0
  )
  return cross_encoder.CrossEncoder(config, image_dim=image_dim, max_image_tokens=4)


def test_image_tokens_follow_the_word_pieces_and_are_required():
  model = _tiny(image_dim=6)
  ids = jnp.asarray([[101, 2054, 102, 0]])
  feats = jnp.ones((1, 3, 6))
  params = model.init(jax.random.PRNGKey(0), ids, image_features=feats)["params"]
  hidden, mask = model.apply({"params": params}, ids, image_features=feats, method="encode")
  assert hidden.shape == (1, 7, 32) and mask.tolist() == [
    [True, True, True, False, True, True, True]
  ]
  with pytest.raises(ValueError, match="reads image features"):
    model.apply({"params": params}, ids)
  with pytest.raises(ValueError, match="max_image_tokens"):
    model.apply({"params": params}, ids, image_features=jnp.ones((1, 5, 6)))


def test_batched_scoring_equals_one_pair_at_a_time(minilm):
  _, _, tokenizer = minilm
  model = _tiny()
  params = model.init(jax.random.PRNGKey(1), jnp.ones((1, 8), jnp.int32))["params"]
  texts = {
    "a": "the eiffel tower is in paris",
    "b": "bananas are yellow",
    "c": "rust is a language",
  }
  queries = ["where is the tower", "what colour are bananas", "a systems language"]
  # lists of other lengths; with query_batch 1 a device call holds pairs of two queries
  for query_batch, candidates in [
    (2, [["a", "b", "c"], ["c"], ["b", "a"]]),
    (1, [["a", "b"], ["c", "a", "b"], ["b"]]),
  ]:
    scorer = rerank.CrossEncoderScorer(
      model, params, tokenizer, item_texts=texts, query_batch=query_batch
    )
    batched = scorer.score(queries, candidates)
    assert [len(b) for b in batched] == [len(c) for c in candidates]
    for q, c, got in zip(queries, candidates, batched):
      alone = [scorer.score_pairs([(q, key)])[0] for key in c]
      np.testing.assert_allclose(got, alone, atol=1e-5)


# ----------------------------------------------------------------------------- training


def test_hard_negatives_never_include_a_relevant_item():
  rng = np.random.default_rng(1)
  keys = [str(i) for i in range(50)]
  relevant = [{keys[int(rng.integers(50))]} for _ in range(40)]
  rankings = {
    name: [[keys[j] for j in rng.permutation(50)[:15]] for _ in relevant]
    for name in ("bm25", "dual")
  }
  negatives = cross_training.mine_negatives(rankings, relevant, {"bm25": 3, "dual": 2})
  for rel, neg, bm25 in zip(relevant, negatives, rankings["bm25"]):
    assert not rel & set(neg) and len(neg) == len(set(neg)) == 5
    assert neg[:3] == [key for key in bm25 if key not in rel][:3]  # each source's top ones
  with pytest.raises(ValueError, match="no ranking"):
    cross_training.mine_negatives(rankings, relevant, {"dsi": 1})
  rows, groups = cross_training.batch_groups(
    [sorted(r)[0] for r in relevant],
    [[] for _ in relevant],
    keys,
    relevant,
    queries_per_batch=8,
    negatives_per_query=4,
    step=3,
    seed=0,
  )
  for row, group in zip(rows, groups):  # random fill-ins are never relevant either
    assert group[0] in relevant[row] and not relevant[row] & set(group[1:]) and len(set(group)) == 5


def test_training_separates_positives_and_the_joint_model_trains_both_losses(minilm):
  _, _, tokenizer = minilm
  words = ["red", "blue", "green", "cat", "dog", "fish", "tree", "car", "sun", "moon"]
  items = {w: f"all about the {w}" for w in words}
  queries = [f"tell me of {w}" for w in words]
  relevant = [{w} for w in words]
  model = _tiny()
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
  scorer = rerank.CrossEncoderScorer(model, params, tokenizer, item_texts=items, max_length=32)
  negatives = [[w2 for w2 in words if w2 != w][:2] for w in words]
  common = dict(
    steps=60,
    queries_per_batch=5,
    negatives_per_query=2,
    learning_rate=3e-3,
    pretrained_lr_multiplier=1.0,
    seed=0,
    show_progress=False,
  )
  trained, history = cross_training.train_cross_encoder(
    model, params, scorer.pair_inputs, queries, relevant, negatives, words, **common
  )
  assert np.mean([h["bce"] for h in history[-10:]]) < 0.5 * np.mean([h["bce"] for h in history[:5]])
  trained_scorer = rerank.CrossEncoderScorer(
    model, trained, tokenizer, item_texts=items, max_length=32
  )
  seen = [[w, *neg] for w, neg in zip(words, negatives)]  # the positive first
  scores = trained_scorer.score(queries, seen)
  assert np.mean([np.argmax(s) == 0 for s in scores]) >= 0.8
  _, joint = cross_training.train_cross_encoder(
    model,
    params,
    scorer.pair_inputs,
    queries,
    relevant,
    negatives,
    words,
    joint_weight=1.0,
    embed_inputs=cross_training.embed_inputs_fn(tokenizer, 32),
    item_texts=items,
    **{**common, "steps": 30},
  )
  assert {"bce", "infonce"} <= set(joint[0]) and joint[-1]["infonce"] < joint[0]["infonce"]


# ----------------------------------------------------------------------------- the experiment


def _export_tiny(folder, train_questions, test_questions):
  """A folder in the layout `experiments.squad.export` writes, 6 paragraphs."""
  import json
  import os

  from dsi_jax import docids

  topics = ["paris", "bananas", "rust", "the moon", "jazz", "volcanoes"]
  keys = [f"p{i}" for i in range(len(topics))]
  documents = [f"This paragraph is about {t}. It says many things about {t}." for t in topics]
  arrays = {"index_inputs": np.zeros((6, 4), np.int32)}
  for split, questions in (
    ("train", train_questions),
    ("val", test_questions),
    ("test", test_questions),
  ):
    rel = [keys[i % 6] for i in range(len(questions))]
    arrays[f"{split}_inputs"] = np.zeros((len(questions), 4), np.int32)
    arrays[f"{split}_relevant"] = np.asarray([keys.index(r) for r in rel], np.int32)
    arrays[f"{split}_relevant_counts"] = np.ones(len(questions), np.int32)
  os.makedirs(folder, exist_ok=True)
  np.savez(os.path.join(folder, "arrays.npz"), **arrays)
  docids.atomic_ids(keys).save(os.path.join(folder, "docids.json"))
  texts = {
    "documents": documents,
    "train_questions": train_questions,
    "val_questions": test_questions,
    "test_questions": test_questions,
  }
  with open(os.path.join(folder, "texts.json"), "w") as f:
    json.dump(texts, f)
  return topics


def test_the_squad_experiment_reports_every_pipeline(tmp_path, monkeypatch):
  import shlex
  import sys

  from dsi_jax import results
  from dsi_jax.experiments import rerank as experiment

  topics = ["paris", "bananas", "rust", "the moon", "jazz", "volcanoes"]
  train = [f"what about {t}?" for t in topics] * 2
  train = [q + " really" * i for i, q in enumerate(train)]  # distinct texts
  test = [f"tell me of {t}" for t in topics]
  _export_tiny(tmp_path / "data", train, test)
  config = experiment.RerankConfig(
    k=3,
    steps=2,
    joint_steps=2,
    queries_per_batch=2,
    negatives_per_query=2,
    max_length=32,
    latency_queries=2,
    negatives=(("bm25", 1), ("dual_encoder", 1)),
  )
  monkeypatch.setattr(sys, "argv", ["/x/bin/dsi-jax", "train", "--gin_bindings=a='b c'"])
  report = experiment.run_rerank_experiment(
    config, data=str(tmp_path / "data"), workdir=str(tmp_path / "out"), show_progress=False
  )
  rows = report["rows"]
  models = [(r["model"], r["setting"]) for r in rows]
  for name in ("bm25", "dual_encoder", "joint"):
    assert (name, "first_stage") in models and (f"{name}+rerank", "rerank k=3") in models
  assert ("bm25+rerank", "rerank k=3, fused 0.5") in models
  for r in rows:
    assert 0.0 <= r["hits@1"] <= r["hits@10"] <= 1.0 and r["num_queries"] == 6
    if "+rerank" in r["model"]:
      assert r["speedup"] > 0 and r["rerank_ms"] > 0
  assert results.load(str(tmp_path / "out" / "results.json"))["rows"] == rows
  table = (tmp_path / "out" / "results.md").read_text()
  assert "rerank ms/q" in table and "speed-up" in table
  assert shlex.split(report["command"]) == ["dsi-jax", "train", "--gin_bindings=a='b c'"]
  kept, kept_rel = experiment.without_test_questions(train, [{"a"}] * 12, [train[3], "other"])
  assert train[3] not in kept and len(kept) == len(kept_rel) == 11


def test_flickr_training_pairs_never_show_the_query_and_every_item_loses_one_caption():
  from dsi_jax.experiments.flickr_rerank import drop_one

  captions_of = {
    "a.jpg": ["a dog runs", "a brown dog", "dog on grass"],
    "b.jpg": ["a cat", "a cat sleeps", "cat on a mat"],
  }
  pairs = [(q, key) for q in ["a brown dog", "a cat sleeps"] for key in captions_of]
  texts = drop_one(pairs, captions_of)
  assert texts[0] == "a dog runs ; dog on grass" and texts[3] == "a cat ; cat on a mat"
  for (query, key), item_text in zip(pairs, texts):
    kept = item_text.split(" ; ")
    assert query not in kept
    # positives and negatives alike show one caption fewer: the count cannot tell them apart
    assert len(kept) == len(captions_of[key]) - 1 and set(kept) <= set(captions_of[key])
  assert drop_one(pairs, captions_of) == texts  # deterministic
