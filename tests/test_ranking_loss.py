"""The ranking loss: listwise distillation from a teacher's scores over each query's target,
hard negatives and in-batch negatives, on top of the id cross-entropy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsi_jax import batches
from dsi_jax import docids as docids_lib
from dsi_jax.batches import RetrievalData
from dsi_jax.losses import listwise_distillation, shift_right, token_log_likelihood
from dsi_jax.models.dsi import DSINetwork
from tests.test_embedding_ids import N, encoded_rows, model_of


def test_listwise_distillation_equals_a_hand_computed_kl():
  student = jnp.array([[1.0, 0.0, 5.0], [0.0, 2.0, 0.0], [3.0, 1.0, 2.0]])
  teacher = jnp.array([[2.0, 1.0, 9.0], [1.0, 1.0, 1.0], [0.0, 0.5, 1.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
  # row 0: candidates 0 and 1; teacher softmax of [2, 1] / 0.5 = [4, 2]; student's of [1, 0]
  p0 = np.exp([4.0, 2.0]) / np.exp([4.0, 2.0]).sum()
  q0 = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
  # row 1 has one candidate: nothing to rank, left out; row 2: all three
  p2 = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
  q2 = np.exp([3.0, 1.0, 2.0]) / np.exp([3.0, 1.0, 2.0]).sum()
  expected = ((p0 * np.log(p0 / q0)).sum() + (p2 * np.log(p2 / q2)).sum()) / 2
  loss = listwise_distillation(student, teacher, mask, temperature=0.5)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  grads = jax.grad(lambda s: listwise_distillation(s, teacher, mask, 0.5))(student)
  assert np.all(np.isfinite(grads)) and np.all(grads[1] == 0) and grads[0, 2] == 0
  np.testing.assert_allclose(grads[0, :2], (q0 - p0) / 2, rtol=1e-5)  # d KL / d student
  # the same lists ranked the same way by both: zero
  assert listwise_distillation(teacher / 0.5, teacher, mask, 0.5) == pytest.approx(0, abs=1e-6)


def test_candidates_are_the_target_the_teachers_hard_negatives_and_the_batch():
  relevant = [np.array([0, 1]), np.array([2]), np.array([3])]
  data = RetrievalData(np.zeros((6, 1)), np.zeros((3, 1)), relevant, None, None, None, None)
  teacher = np.array(
    [
      [9.0, 8.0, 1.0, 5.0, 7.0, 0.0],  # relevant 0, 1 (never negatives); then 4, 3
      [3.0, 0.0, 9.0, 2.0, 4.0, 1.0],  # then 4, 0
      [0.0, 6.0, 5.0, 9.0, 1.0, 2.0],
    ],
    np.float32,
  )
  queries, positives = np.array([0, 1, 2]), np.array([1, 2, 3])
  cands, scores = batches.ranking_candidates(data, queries, positives, teacher, 2)
  assert cands.shape == (3, 1 + 2 + 2)
  assert cands[0].tolist() == [1, 4, 3, 2, -1]  # 3 is hard and in-batch: listed once
  assert cands[1].tolist() == [2, 4, 0, 1, 3]
  assert cands[2].tolist() == [3, 1, 2, -1, -1]  # 1 and 2 already hard negatives
  for q, row in zip(queries, cands):
    assert not set(row[1:].tolist()) & set(relevant[q].tolist())
    np.testing.assert_array_equal(scores[q][row >= 0], teacher[q][row[row >= 0]])
    assert np.all(scores[q][row < 0] == 0)


def _data_and_teacher(rng, docids):
  items = encoded_rows(rng, N)
  queries = encoded_rows(rng, 3 * N)
  rel = [np.array([i % N]) for i in range(3 * N)]
  data = RetrievalData(items, queries, rel, queries[:N], rel[:N], queries[:N], rel[:N])
  teacher = np.full((3 * N, N), -1.0, np.float32)  # knows the answer: its own item first
  teacher[np.arange(3 * N), np.arange(3 * N) % N] = 1.0
  return data, teacher


@pytest.mark.parametrize("scheme", ["atomic", "random"])
def test_candidate_scores_are_the_ids_log_likelihoods(scheme):
  rng = np.random.default_rng(4)
  keys = [f"doc{i}" for i in range(N)]
  docids = (
    docids_lib.atomic_ids(keys) if scheme == "atomic" else docids_lib.random_ids(keys, num_codes=5)
  )
  data, _ = _data_and_teacher(rng, docids)
  model = model_of(docids, embedding_ids=scheme == "atomic")
  params = model.init(jax.random.PRNGKey(0), data.index_inputs.shape)
  inputs = jnp.asarray(data.train_inputs[:4])
  targets = model.all_targets[jnp.array([0, 1, 2, 3])]
  apply = functools.partial(model.network.apply, {"params": params})
  encoded, _ = apply(inputs, method=DSINetwork.encode)
  logits = apply(encoded, shift_right(targets), method=DSINetwork.decode)
  candidates = jnp.array([[0, 5, -1], [1, 2, 3], [7, 8, 9], [3, -1, -1]])
  got = model._candidate_scores(apply, encoded, logits, candidates)
  for b in range(4):
    for c in range(3):
      row = max(int(candidates[b, c]), 0)
      tokens = model.all_targets[row][None]
      ll = token_log_likelihood(
        apply(
          jax.tree.map(lambda x, b=b: x[b : b + 1], encoded),
          shift_right(tokens),
          method=DSINetwork.decode,
        ),
        tokens,
      )[0]
      # atomic ids: the first token's log-probability, which the trie-constrained search
      # ranks by (eos is the only continuation); other ids: the whole id's
      want = ll[0] if scheme == "atomic" else ll.sum()
      np.testing.assert_allclose(got[b, c], want, rtol=1e-4, atol=1e-4)


def test_training_with_the_ranking_loss_follows_the_teacher():
  from dsi_jax import train as train_lib

  rng = np.random.default_rng(3)
  docids = docids_lib.atomic_ids([f"doc{i}" for i in range(N)])
  data, _ = _data_and_teacher(rng, docids)
  # a teacher that prefers another item than the label: item i + 1 for a query of item i
  queries = np.arange(len(data.train_inputs))
  teacher = np.full((len(queries), N), -1.0, np.float32)
  teacher[queries, (queries + 1) % N] = 1.0
  model = model_of(docids)
  common = dict(
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=5,
    index_max_steps=1,
    finetune_max_steps=100,
    index_eval_every=1,
    finetune_eval_every=100,
    ranking="exact",
  )
  with pytest.raises(ValueError, match="rank_weight > 0 and a teacher"):
    train_lib.train_dsi(model, data, config=train_lib.TrainConfig(**common), teacher=teacher)
  config = train_lib.TrainConfig(**common, rank_weight=5.0, rank_hard_negatives=4)
  with pytest.raises(ValueError, match="teacher scores are"):
    train_lib.train_dsi(model, data, config=config, teacher=teacher[:5])
  result = train_lib.train_dsi(model, data, config=config, teacher=teacher, show_progress=False)
  top, _ = model.rank(result["fine_tuned_params"], data.train_inputs, 2, method="exact")
  # the teacher's item is in the top 2 of most queries; by chance 2 / 24, and measured with
  # the id loss alone (rank_weight 0, same steps) 0.07, with the ranking loss 0.53
  assert np.mean([(q + 1) % N in row for q, row in zip(queries, top)]) > 0.4


def test_the_ranking_settings_enter_the_run_fingerprint_only_when_the_loss_is_on():
  from dsi_jax import train as train_lib
  from dsi_jax import workdir

  docids = docids_lib.atomic_ids([f"doc{i}" for i in range(4)])
  model = model_of(docids)
  params = model.init(jax.random.PRNGKey(0), (1, 6, 16))
  off = workdir.run_fingerprint(model, params, train_lib.TrainConfig(), True)
  off_too = workdir.run_fingerprint(
    model, params, train_lib.TrainConfig(rank_hard_negatives=3), True
  )
  on = workdir.run_fingerprint(model, params, train_lib.TrainConfig(rank_weight=1.0), True)
  assert "rank_weight" not in off["train_config"] and off == off_too  # inert: same run
  assert on["train_config"]["rank_weight"] == 1.0 and on != off
