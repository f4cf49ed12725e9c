"""Tests for dsi_jax.metrics against hand-computed values."""

from __future__ import annotations

import pytest

from dsi_jax import metrics


def test_average_precision_basic():
  ranked, rel = ["a", "x", "b"], {"a", "b"}
  # (1/2) * (1/1 + 2/3)
  assert metrics.average_precision_at_k(ranked, rel, 3) == pytest.approx(5 / 6)
  # Top 1 is relevant, denominator min(2, 1) = 1.
  assert metrics.average_precision_at_k(ranked, rel, 1) == pytest.approx(1.0)
  # Top 2 = [a, x]: (1/min(2,2)) * 1/1.
  assert metrics.average_precision_at_k(ranked, rel, 2) == pytest.approx(0.5)


def test_average_precision_relevant_larger_than_k():
  ranked, rel = ["x", "a", "b", "c"], {"a", "b", "c", "d", "e"}
  # k=3: top = [x, a, b]; sum = 1/2 + 2/3; denominator min(5, 3) = 3.
  assert metrics.average_precision_at_k(ranked, rel, 3) == pytest.approx((1 / 2 + 2 / 3) / 3)
  # k=10 with a short list: sum = 1/2 + 2/3 + 3/4; denominator min(5, 10) = 5.
  assert metrics.average_precision_at_k(ranked, rel, 10) == pytest.approx(
    (1 / 2 + 2 / 3 + 3 / 4) / 5
  )


def test_average_precision_no_hits_and_empty_list():
  assert metrics.average_precision_at_k(["x", "y"], {"a"}, 2) == 0.0
  assert metrics.average_precision_at_k([], {"a"}, 5) == 0.0


def test_map_at_k():
  ranked = [["a", "x", "b"], ["y", "c"]]
  relevant = [{"a", "b"}, {"c"}]
  # (5/6 + 1/2) / 2
  assert metrics.map_at_k(ranked, relevant, 3) == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_recall_with_short_list():
  ranked = [["a", "x"], ["b", "c", "d", "e"]]
  relevant = [{"a", "b", "c"}, {"c", "z"}]
  # q0: list shorter than k, 1 of 3 found; q1 top 3 = [b, c, d], 1 of 2 found.
  assert metrics.recall_at_k(ranked, relevant, 3) == pytest.approx((1 / 3 + 1 / 2) / 2)
  # k=1: q0 finds a (1/3), q1 top [b] finds nothing.
  assert metrics.recall_at_k(ranked, relevant, 1) == pytest.approx((1 / 3 + 0) / 2)


def test_hits_at_k():
  ranked = [["x", "a"], ["b"], ["y", "z", "c"]]
  relevant = [{"a"}, {"b"}, {"c"}]
  assert metrics.hits_at_k(ranked, relevant, 1) == pytest.approx(1 / 3)
  assert metrics.hits_at_k(ranked, relevant, 2) == pytest.approx(2 / 3)
  assert metrics.hits_at_k(ranked, relevant, 3) == pytest.approx(1.0)


def test_mrr_at_k():
  ranked = [["x", "a"], ["b"], ["y", "z", "c"], ["q"]]
  relevant = [{"a"}, {"b"}, {"c", "y"}, {"w"}]
  # Reciprocal ranks: 1/2, 1, 1 (y at rank 1), 0.
  assert metrics.mrr_at_k(ranked, relevant, 3) == pytest.approx((1 / 2 + 1 + 1 + 0) / 4)
  # k=1 cuts off q0's hit at rank 2.
  assert metrics.mrr_at_k(ranked, relevant, 1) == pytest.approx((0 + 1 + 1 + 0) / 4)


def test_indexing_accuracy():
  ranked = [["d1", "d2"], ["d1", "d2"], ["d1", "d3"]]
  own = ["d1", "d2", "d9"]
  assert metrics.indexing_accuracy(ranked, own, 1) == pytest.approx(1 / 3)
  assert metrics.indexing_accuracy(ranked, own, 2) == pytest.approx(2 / 3)


def test_returns_python_floats():
  ranked, relevant = [["a"]], [{"a"}]
  for fn in (metrics.recall_at_k, metrics.map_at_k, metrics.hits_at_k, metrics.mrr_at_k):
    assert type(fn(ranked, relevant, 1)) is float
  assert type(metrics.indexing_accuracy(ranked, ["a"], 1)) is float
  assert type(metrics.average_precision_at_k(["a"], {"a"}, 1)) is float


def test_compute_metrics():
  ranked = [["a", "x", "b"], ["y", "c"]]
  relevant = [{"a", "b"}, {"c"}]
  out = metrics.compute_metrics(ranked, relevant, ["map@3", "recall@1", "hits@1", "mrr@10"])
  assert list(out) == ["map@3", "recall@1", "hits@1", "mrr@10"]
  assert out["map@3"] == pytest.approx((5 / 6 + 1 / 2) / 2)
  assert out["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
  assert out["hits@1"] == pytest.approx(1 / 2)
  assert out["mrr@10"] == pytest.approx((1 + 1 / 2) / 2)


def test_compute_metrics_ia():
  ranked = [["d1", "d2"], ["d1", "d2"]]
  relevant = [{"d1"}, {"d2"}]
  out = metrics.compute_metrics(ranked, relevant, ["ia@1", "ia@2"])
  assert out == {"ia@1": pytest.approx(0.5), "ia@2": pytest.approx(1.0)}
  with pytest.raises(ValueError, match="query 0"):
    metrics.compute_metrics(ranked, [{"d1", "d2"}, {"d2"}], ["ia@1"])


def test_length_mismatch():
  with pytest.raises(ValueError, match=r"len\(ranked\)=2.*len\(relevant\)=1"):
    metrics.recall_at_k([["a"], ["b"]], [{"a"}], 1)
  with pytest.raises(ValueError, match=r"len\(ranked\)=1.*len\(own_keys\)=2"):
    metrics.indexing_accuracy([["a"]], ["a", "b"], 1)


def test_empty_relevant_names_query():
  for fn in (metrics.recall_at_k, metrics.map_at_k, metrics.hits_at_k, metrics.mrr_at_k):
    with pytest.raises(ValueError, match="query 1"):
      fn([["a"], ["b"]], [{"a"}, set()], 1)
  with pytest.raises(ValueError, match="empty"):
    metrics.average_precision_at_k(["a"], set(), 1)


@pytest.mark.parametrize("k", [0, -1])
def test_bad_k(k):
  with pytest.raises(ValueError, match="k must be"):
    metrics.recall_at_k([["a"]], [{"a"}], k)
  with pytest.raises(ValueError, match="k must be"):
    metrics.average_precision_at_k(["a"], {"a"}, k)
  with pytest.raises(ValueError, match="k must be"):
    metrics.indexing_accuracy([["a"]], ["a"], k)
  with pytest.raises(ValueError):
    metrics.compute_metrics([["a"]], [{"a"}], [f"map@{k}"])


def test_unknown_metric():
  with pytest.raises(ValueError, match="known prefixes: hits, ia, map, mrr, recall"):
    metrics.compute_metrics([["a"]], [{"a"}], ["ndcg@10"])
  with pytest.raises(ValueError, match="prefix@k|map@k"):
    metrics.compute_metrics([["a"]], [{"a"}], ["map"])
