"""Atomic ids that start from embeddings (`DocidDecoder.embedding_ids`): at step 0 DSI ranks
exactly as the cosine of pooled query and item embeddings, by exact scoring and by beam search;
training then moves the ranking."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dsi_jax import docids as docids_lib
from dsi_jax.models.borrowed import PrecomputedEncoder
from dsi_jax.models.decoder import DocidDecoder
from dsi_jax.models.dsi import DSIModel, DSINetwork

N, LENGTH, WIDTH = 24, 6, 16


def encoded_rows(rng, n):
  """Frozen-encoder outputs `[n, LENGTH, WIDTH]` with a random number of padded (zero) tail
  positions, as `borrowed.encode_frozen` writes them."""
  x = rng.normal(size=(n, LENGTH, WIDTH)).astype(np.float32)
  for row, keep in zip(x, rng.integers(2, LENGTH + 1, size=n)):
    row[keep:] = 0.0
  return x


def pooled_unit(x):
  mask = np.any(x != 0, axis=-1)[..., None]
  v = (x * mask).sum(1) / mask.sum(1)
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def model_of(docids, embedding_ids=True):
  decoder = DocidDecoder(
    vocab_size=docids.vocab_size,
    max_length=docids.max_length,
    width=32,
    depth=2,
    mlp_dim=64,
    num_heads=4,
    embedding_ids=embedding_ids,
  )
  return DSIModel(DSINetwork(encoder=PrecomputedEncoder(), decoder=decoder), docids)


def test_at_step_zero_dsi_ranks_exactly_as_the_embeddings():
  rng = np.random.default_rng(0)
  keys = [f"doc{i}" for i in range(N)]
  docids = docids_lib.atomic_ids(keys)
  items = encoded_rows(rng, N)
  queries = encoded_rows(rng, 10)
  model = model_of(docids)
  params = model.init(jax.random.PRNGKey(0), items.shape)
  params = model.ids_from_embeddings(params, items)
  expected = np.argsort(-(pooled_unit(queries) @ pooled_unit(items).T), axis=1, kind="stable")
  exact, _ = model.rank(params, queries, 5, method="exact")
  np.testing.assert_array_equal(exact, expected[:, :5])
  beam, _ = model.rank(params, queries, 5, method="beam")
  np.testing.assert_array_equal(beam, expected[:, :5])
  # an item's own input finds it first
  own, _ = model.rank(params, items, 1, method="exact")
  np.testing.assert_array_equal(own[:, 0], np.arange(N))


def test_item_rows_average_several_inputs_per_item_and_every_item_needs_one():
  rng = np.random.default_rng(1)
  docids = docids_lib.atomic_ids([f"img{i}" for i in range(6)])
  captions = encoded_rows(rng, 12)
  item_of_row = np.repeat(np.arange(6), 2)
  model = model_of(docids)
  params = model.init(jax.random.PRNGKey(0), captions.shape)
  params = model.ids_from_embeddings(params, captions, item_of_row)
  unit = pooled_unit(captions)
  rows = np.asarray(params["decoder"]["id_embedding"])[np.asarray(docids.targets())[:, 0]]
  np.testing.assert_allclose(rows[3], (unit[6] + unit[7]) / 2, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="have no row"):
    model.ids_from_embeddings(params, captions[:10], item_of_row[:10])


def test_embedding_ids_need_atomic_ids_and_the_embedding_decoder():
  keys = [f"doc{i}" for i in range(8)]
  items = encoded_rows(np.random.default_rng(2), 8)
  semantic = docids_lib.random_ids(keys, num_codes=4)
  model = model_of(semantic)
  params = model.init(jax.random.PRNGKey(0), items.shape)
  with pytest.raises(ValueError, match="atomic ids only"):
    model.ids_from_embeddings(params, items)
  plain = model_of(docids_lib.atomic_ids(keys), embedding_ids=False)
  params = plain.init(jax.random.PRNGKey(0), items.shape)
  with pytest.raises(ValueError, match="embedding_ids=True"):
    plain.ids_from_embeddings(params, items)


def test_training_starts_from_the_embedding_ranking_and_improves_on_it():
  from dsi_jax import train as train_lib
  from dsi_jax.batches import RetrievalData

  rng = np.random.default_rng(3)
  keys = [f"doc{i}" for i in range(N)]
  docids = docids_lib.atomic_ids(keys)
  items = encoded_rows(rng, N)
  # queries whose embedding is far from their item's: the embeddings rank them badly
  queries = encoded_rows(rng, 3 * N)
  rel = [np.array([i % N]) for i in range(3 * N)]
  data = RetrievalData(items, queries, rel, queries[:N], rel[:N], queries[:N], rel[:N])
  model = model_of(docids)
  config = train_lib.TrainConfig(
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=5,
    index_max_steps=1,
    finetune_max_steps=150,
    index_eval_every=1,
    finetune_eval_every=50,
    retrieval_ratio=1.0,
    ranking="exact",
  )
  result = train_lib.train_dsi(model, data, config=config, show_progress=False)
  start = model.ids_from_embeddings(
    model.init(jax.random.PRNGKey(0), items.shape), items
  )  # the ranking step 0 had
  before, _ = model.rank(start, queries[:N], 1, method="exact")
  after, _ = model.rank(result["fine_tuned_params"], queries[:N], 1, method="exact")
  assert (before[:, 0] == np.arange(N)).mean() < 0.3
  assert (after[:, 0] == np.arange(N)).mean() > 0.8
