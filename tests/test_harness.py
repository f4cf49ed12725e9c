"""The one evaluation harness, DSI behind the Retriever protocol, and results rows."""

import os
import subprocess

import jax
import numpy as np
import pytest
from test_model import make_test_model

from dsi_jax import evaluation, results, retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FixedRetriever:
  """Answers every query with the same ranking (the keys it indexes, in order)."""

  def __init__(self, keys):
    self.keys = list(keys)

  def search(self, queries, k):
    ranked = [self.keys[:k] for _ in queries]
    return ranked, [np.arange(len(r), 0, -1, dtype=np.float32) for r in ranked]


def test_evaluate_computes_query_and_indexing_metrics():
  r = FixedRetriever(["a", "b", "c"])
  values = evaluation.evaluate(
    r,
    ["q1", "q2"],
    [{"a"}, {"c"}],
    ["hits@1", "recall@3", "mrr@10", "ia@1", "ia@3"],
    index=["a", "b", "c"],
  )
  assert list(values) == ["hits@1", "recall@3", "mrr@10", "ia@1", "ia@3"]
  assert values["hits@1"] == 0.5 and values["recall@3"] == 1.0
  assert values["mrr@10"] == pytest.approx((1 + 1 / 3) / 2)
  assert values["ia@1"] == pytest.approx(1 / 3) and values["ia@3"] == 1.0
  with pytest.raises(ValueError, match="ia@1 need the indexed items"):
    evaluation.evaluate(r, ["q"], [{"a"}], ["ia@1"])
  with pytest.raises(ValueError, match="2 queries but 1 relevance"):
    evaluation.evaluate(r, ["q1", "q2"], [{"a"}], ["hits@1"])


def test_dsi_retriever_answers_like_the_model_ranks():
  model, params = make_test_model()
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (5, 8, 8, 1)))
  items, scores = model.rank(params, images, 4, method="exact")
  keys = model.docids.keys
  for method in ("exact", "beam"):
    r = retrieval.DSIRetriever(model, params, method=method, num_beams=30, batch_size=2)
    ranked, top = r.search(images, 4)
    assert ranked == [[keys[i] for i in row] for row in items]
    np.testing.assert_allclose(np.stack(top), scores, atol=1e-4)
  # IA@k: every indexed item as its own query, ranked by the constrained beam search.
  r = retrieval.DSIRetriever(model, params, method="exact", batch_size=4)
  own = [keys[i] for i in items[:, 0]]  # queries whose best id is known: IA@1 = 1
  values = evaluation.evaluate(
    r,
    images,
    [{k} for k in own],
    ["hits@1", "ia@1"],
    index=images,
    index_keys=own,
    index_retriever=r.with_search("beam", 30),
  )
  assert values == {"hits@1": 1.0, "ia@1": 1.0}


def test_short_batches_are_padded_to_a_power_of_two_only():
  assert [retrieval.padded_size(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
  model, params = make_test_model()
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (3, 8, 8, 1)))
  seen = []

  def encode(x):
    seen.append(len(x))
    return x

  r = retrieval.DSIRetriever(model, params, method="exact", batch_size=64, encode_inputs=encode)
  ranked, _ = r.search(images[:1], 4)
  alone, _ = r.search(images, 4)
  assert seen == [1, 4]  # not 64 rows for one query
  assert ranked[0] == alone[0]


def test_aggregate_keeps_every_metric_it_is_given():
  rows = [
    results.make_row(
      model="clip_dsi",
      setting="fine_tuned",
      dataset="flickr8k_1000",
      db_size=1000,
      num_queries=1000,
      ids="atomic",
      metrics={"recall@1": r1, "recall@5": 0.5, "hits@1": r1, "mrr@10": 0.3, "ia@1": None},
      steps=steps,
      seed=seed,
    )
    for r1, steps, seed in ((0.2, 100, 0), (0.4, 300, 1))
  ]
  (row,) = results.aggregate(rows)
  assert row["num_seeds"] == 2
  assert row["recall@1"] == pytest.approx(0.3) and row["recall@1_std"] == pytest.approx(0.1)
  assert row["hits@1"] == pytest.approx(0.3) and row["mrr@10"] == pytest.approx(0.3)
  assert row["recall@5"] == 0.5 and row["recall@5_std"] == 0.0
  assert row["ia@1"] is None and row["steps"] == 200
  assert "seed" not in row
  with pytest.raises(ValueError, match="not a metric"):
    results.make_row(
      model="x", setting=None, dataset="d", db_size=1, num_queries=1, metrics={"accuracy": 1.0}
    )


def test_write_report_is_the_results_contract(tmp_path):
  row = results.make_row(
    model="bm25", setting="-", dataset="d", db_size=3, num_queries=2, metrics={"hits@1": 0.5}
  )
  report = results.write_report(str(tmp_path), [row], {"k": 1}, command="x --y", quiet=True)
  saved = results.load(str(tmp_path / "results.json"))
  assert saved == report
  assert {"rows", "config", "versions", "command", "machine", "date"} <= set(saved)
  assert "| bm25 |" in (tmp_path / "results.md").read_text()


def test_recorded_commands_name_folders_not_paths_of_this_machine():
  argv = ["--out", "/data/x/results/", "--gin_bindings=a.workdir='r'", "--images=/home/u/pics"]
  assert results.invocation("python tools/t.py", argv) == (
    "python tools/t.py --out results '--gin_bindings=a.workdir='\"'\"'r'\"'\"'' --images=pics"
  )
  assert results.portable_argv(["relative/dir", "-k", "5"]) == ["relative/dir", "-k", "5"]


def test_metrics_are_computed_in_one_place():
  """`compute_metrics(` is called only by the harness (and t5x's metric function)."""
  proc = subprocess.run(
    ["grep", "-rln", "compute_metrics(", "dsi_jax", "tools", "tasks"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  files = set(proc.stdout.split())
  assert files <= {"dsi_jax/evaluation.py", "dsi_jax/metrics.py", "dsi_jax/t5x_models.py"}, files
