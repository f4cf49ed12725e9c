"""Benchmark of retrieval latency and throughput: DSI decoding, exact kNN and BoVW, against N.

For each number of items N it times one query batch (batch 1 and batch 64), end to end:

* `dsi`: `DSIModel.predict_batch` of the seed ViT-DSI network (`make_vit_dsi` defaults:
  width 128, depth 6, 3-layer decoder; randomly initialised: latency does not depend on the
  weights) over N random ids: the ViT encoder on the query images, then the
  trie-constrained beam search (`--beams`, default 10) with the real decoder and its
  key/value cache, all in one jitted call.
* `knn`: the exact dual-encoder baseline with the same encoder: the same ViT on the query
  images, mean-pooled and L2-normalised to a 128-d embedding, then one matmul against N
  random unit embeddings `[N, 128]` held on device and `jax.lax.top_k` (k = beams), jitted.
  `knn_search` is the matmul + top-k alone (query embeddings given), and `encoder` the ViT
  alone, so the table shows what each part costs.
* `bovw`: `dsi_jax.baselines.bovw.BoVW` (SIFT, k-means words, cosine top-k) on the host,
  on Fashion-MNIST test images (random images if the data is not installed), only up to
  `--bovw-max-n` items (it is CPU-bound and O(N) too). Its words are learnt once from
  `--bovw-vocab-images` images (k-means is slow and not what is timed), then N images are
  indexed with them. Its latency is `search()` on the query images: SIFT on them, word
  assignment, one matmul, top-k.

The crossover is the smallest N of the grid at which DSI is faster than exact kNN at the
same batch size, or "not reached up to N": end to end (both with the encoder), and search
only (DSI minus the encoder, a derived number, against the matmul + top-k). DSI's decode cost grows
with the id length (log N) while kNN grows with N, so on a fast matmul device the crossover
may lie far beyond the grid; it is reported as measured, never extrapolated.

Run `python tools/bench_retrieval.py --quick --out DIR` (N = 1k, 10k; under a minute on 2
CPU cores) or without `--quick` for N = 1k ... 1M. Writes `DIR/bench_retrieval.json` and
`DIR/bench_retrieval.png` and prints a Markdown table. Shares its helpers with
`bench_decode.py`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
  count,
  human,
  int_list,
  markdown_table,
  pyplot,
  start_report,
  time_call,
  write_report,
)

from dsi_jax import docids as docids_lib  # noqa: E402
from dsi_jax.models import dsi  # noqa: E402

IMAGE_SHAPE = (32, 32, 3)


def query_images(batch: int, seed: int) -> jax.Array:
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, *IMAGE_SHAPE))


def make_knn(model: dsi.DSIModel, k: int):
  """Jitted `(params, images, table) -> (scores, indices)` and `(queries, table) -> ...`."""

  def embed(params, images):
    encoded, _ = model.network.apply({"params": params}, images, method=dsi.DSINetwork.encode)
    e = jnp.mean(encoded, axis=1)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  def search(queries, table):
    return jax.lax.top_k(queries @ table.T, k)

  full = jax.jit(lambda params, images, table: search(embed(params, images), table))
  return jax.jit(embed), jax.jit(search), full


def unit_table(n: int, width: int, seed: int) -> jax.Array:
  """`[n, width]` random unit rows, made on device (1M x 128 float32 is 512 MB)."""
  key = jax.random.PRNGKey(seed)

  @jax.jit
  def make(key):
    x = jax.random.normal(key, (n, width), jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  return jax.block_until_ready(make(key))


def bovw_images(n: int, seed: int) -> tuple[np.ndarray, str]:
  """`n` Fashion-MNIST images (uint8 28x28: test, then train), or random ones without it."""
  try:
    from dsi_jax.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    if n <= len(images):
      return images[:n], "fashion_mnist test"
    train, _ = load_fashion_mnist("train")
    images = np.concatenate([images, train])
    if n <= len(images):
      return images[:n], "fashion_mnist test, then train"
    reps = -(-n // len(images))
    return np.concatenate([images] * reps)[:n], "fashion_mnist test + train (repeated)"
  except Exception as e:  # noqa: BLE001 - any failure to load means "not available"
    print(f"Fashion-MNIST not available ({e}); BoVW on random images")
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), "random_uint8_28px"


def bench_n(n: int, args, report: dict) -> list[dict[str, Any]]:
  keys = [f"item{i}" for i in range(n)]
  t0 = time.perf_counter()
  docids = docids_lib.random_ids(keys, seed=args.seed)
  model = dsi.DSIModel(dsi.make_vit_dsi(docids), docids)
  params = model.init(jax.random.PRNGKey(args.seed), (1, *IMAGE_SHAPE))
  table = unit_table(n, model.network.encoder.width, args.seed)
  setup_s = time.perf_counter() - t0
  print(
    f"N={human(n)}: ids of {docids.max_length - 1} codes, trie {model.trie.nbytes / 2**20:.1f} "
    f"MiB, kNN table {table.nbytes / 2**20:.1f} MiB (setup {setup_s:.1f}s)",
    flush=True,
  )
  embed, search, knn = make_knn(model, args.beams)
  rows = []
  for batch in args.batches:
    images = query_images(batch, args.seed + batch)
    predict = functools.partial(model.predict_batch, num_beams=args.beams)
    kw = {"repeats": args.repeats, "min_time": args.min_time}
    t_dsi = time_call(predict, params, images, **kw)
    t_knn = time_call(knn, params, images, table, **kw)
    queries = embed(params, images)
    t_search = time_call(search, queries, table, **kw)
    t_enc = time_call(embed, params, images, **kw)
    row = {"n": n, "batch": batch, "beams": args.beams, "id_length": docids.max_length - 1}
    for name, t in (("dsi", t_dsi), ("knn", t_knn), ("knn_search", t_search), ("encoder", t_enc)):
      row[f"{name}_ms"] = 1e3 * t["median_s"]
      row[f"{name}_query_ms"] = 1e3 * t["median_s"] / batch
      row[f"{name}_qps"] = batch / t["median_s"]
      row[f"{name}_compile_s"] = t["warmup_s"]
    row["dsi_over_knn"] = t_dsi["median_s"] / t_knn["median_s"]
    # Derived, not measured alone: DSI's search part without the shared encoder.
    row["dsi_decode_ms"] = max(row["dsi_ms"] - row["encoder_ms"], 0.0)
    rows.append(row)
    print(
      f"  batch {batch:3d}: dsi {row['dsi_ms']:.2f} ms, knn {row['knn_ms']:.2f} ms "
      f"(search {row['knn_search_ms']:.2f}, encoder {row['encoder_ms']:.2f})",
      flush=True,
    )
  report["setup"].append(
    {
      "n": n,
      "setup_s": setup_s,
      "trie_bytes": model.trie.nbytes,
      "knn_table_bytes": int(table.nbytes),
    }
  )
  return rows


def bench_bovw(ns: list[int], args, rows: list[dict[str, Any]], report: dict) -> None:
  """BoVW latency at each N <= `args.bovw_max_n`.

  The visual vocabulary is learnt once, by `BoVW.fit` on the first `--bovw-vocab-images`
  images (k-means is the slow part and is not what is timed); the N indexed items are then
  encoded with it (`BoVW.encode`) and set as the index, as `fit` would have done.
  """
  from dsi_jax.baselines.bovw import BoVW

  todo = [n for n in ns if n <= args.bovw_max_n]
  if not todo:
    return
  images, source = bovw_images(max(todo) + max(args.batches), args.seed)
  vocab_n = min(args.bovw_vocab_images, max(todo))
  t0 = time.perf_counter()
  index = BoVW(num_words=args.bovw_words, seed=args.seed, progress=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # images without keypoints
    index.fit(images[:vocab_n], [f"item{i}" for i in range(vocab_n)])
  fit_s = time.perf_counter() - t0
  report["bovw"] = {
    "images": source,
    "num_words": index.num_words_used,
    "vocabulary_images": vocab_n,
    "vocabulary_fit_s": fit_s,
    "index": [],
  }
  print(f"BoVW: vocabulary of {index.num_words_used} words from {vocab_n} images, {fit_s:.1f}s")
  for n in todo:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      index.index_histograms = index.encode(images[:n])
    index.keys = [f"item{i}" for i in range(n)]
    index_s = time.perf_counter() - t0
    report["bovw"]["index"].append({"n": n, "index_s": index_s})
    for batch in args.batches:
      queries = images[-batch:]  # not among the indexed images
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = time_call(
          index.search,
          queries,
          args.beams,
          repeats=max(1, args.repeats // 2),
          min_time=args.min_time,
        )
      for row in rows:
        if (row["n"], row["batch"]) == (n, batch):
          row["bovw_ms"] = 1e3 * t["median_s"]
          row["bovw_query_ms"] = 1e3 * t["median_s"] / batch
          row["bovw_qps"] = batch / t["median_s"]
    print(f"BoVW N={human(n)}: indexed in {index_s:.1f}s", flush=True)


def crossover(rows: list[dict[str, Any]], ns: list[int]) -> dict[str, Any]:
  """Per batch size: the first N where DSI beats exact kNN, end to end and search only."""
  out = {}
  for batch in sorted({r["batch"] for r in rows}):
    sel = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["n"])
    entry = {}
    for name, dsi_key, knn_key in (
      ("end_to_end", "dsi_ms", "knn_ms"),
      ("search_only", "dsi_decode_ms", "knn_search_ms"),
    ):
      faster = [r["n"] for r in sel if r[dsi_key] < r[knn_key]]
      first = faster[0] if faster else None
      entry[name] = {
        "crossover_n": first,
        "text": (
          f"DSI faster than exact kNN from N={human(first)}"
          if first is not None
          else f"not reached up to N={human(max(ns))}"
        ),
        "dsi_over_knn": {human(r["n"]): r[dsi_key] / r[knn_key] for r in sel},
      }
    entry["crossover_n"] = entry["end_to_end"]["crossover_n"]
    entry["text"] = entry["end_to_end"]["text"]
    out[f"batch_{batch}"] = entry
  return out


def plot(report: dict, path: str) -> None:
  plt = pyplot()
  rows = report["results"]
  batches = sorted({r["batch"] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
  series = [
    ("dsi_ms", "DSI (encoder + trie beam search)", "o-"),
    ("knn_ms", "exact kNN (encoder + matmul + top-k)", "s-"),
    ("knn_search_ms", "kNN search only", "s:"),
    ("encoder_ms", "ViT encoder only", "--"),
    ("dsi_decode_ms", "DSI decode only (DSI - encoder)", "o:"),
    ("bovw_ms", "BoVW (SIFT + histogram + cosine)", "^-"),
  ]
  for ax, batch in zip(axes[0], batches):
    sel = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["n"])
    for key, label, style in series:
      pts = [(r["n"], r[key]) for r in sel if key in r]
      if pts:
        ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of items N")
    ax.set_ylabel(f"ms per call (batch {batch})")
    ax.set_title(f"batch {batch}: {report['summary']['crossover'][f'batch_{batch}']['text']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  m = report["machine"]
  fig.suptitle(f"retrieval latency, {m['backend']} ({m['device_kind']})")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description="Latency and throughput of DSI decoding vs exact kNN vs BoVW against N.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--out", default="bench_out", help="folder for bench_retrieval.json and .png")
  p.add_argument("--quick", action="store_true", help="N = 1k, 10k; BoVW at 1k; fewer repeats")
  p.add_argument("--ns", type=int_list, default=None, help="numbers of items, e.g. 1k,10k,1M")
  p.add_argument("--batches", type=int_list, default=[1, 64])
  p.add_argument("--beams", type=int, default=10, help="beams of DSI = k of kNN and BoVW")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--min-time", type=float, default=None, help="seconds per timed repeat")
  p.add_argument("--bovw-max-n", type=count, default=None, help="largest N for BoVW")
  p.add_argument("--bovw-words", type=int, default=200, help="BoVW vocabulary size")
  p.add_argument(
    "--bovw-vocab-images", type=int, default=None, help="images BoVW learns its words from"
  )
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.ns is None:
    args.ns = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
  if args.repeats is None:
    args.repeats = 3 if args.quick else 7
  if args.min_time is None:
    args.min_time = 0.0 if args.quick else 0.2
  if args.bovw_max_n is None:
    args.bovw_max_n = 1_000 if args.quick else 10_000
  if args.bovw_vocab_images is None:
    args.bovw_vocab_images = 200 if args.quick else 1_000
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  report = start_report("bench_retrieval", args)
  report["method"] = {
    "dsi": "DSIModel.predict_batch (jitted: ViT encoder + trie beam search with the real "
    "3-layer decoder and kv cache), seed ViT-DSI at width 128, random init, random ids",
    "knn": "same ViT encoder, mean-pooled + L2-normalised, then matmul with N random unit "
    "128-d embeddings and lax.top_k, one jitted call",
    "knn_search": "matmul + top_k alone on given query embeddings",
    "encoder": "the ViT encoder alone (shared by dsi and knn)",
    "dsi_decode": "derived: dsi - encoder (the search part of DSI, not timed alone)",
    "bovw": "dsi_jax.baselines.bovw.BoVW.search on the host (SIFT + words + cosine top-k)",
    "timing": "median over repeats of one batch call waited for with block_until_ready; "
    "compile call excluded; per-query = batch time / batch; qps = batch / batch time",
  }
  report["setup"] = []
  rows = []
  for n in args.ns:
    rows.extend(bench_n(n, args, report))
  bench_bovw(args.ns, args, rows, report)
  report["results"] = rows
  report["summary"] = {"crossover": crossover(rows, args.ns)}
  json_path = write_report(args.out, "bench_retrieval", report)
  png = os.path.join(args.out, "bench_retrieval.png")
  plot(report, png)
  print()
  print(
    markdown_table(
      rows,
      [
        ("N", "n"),
        ("batch", "batch"),
        ("DSI ms", "dsi_ms"),
        ("kNN ms", "knn_ms"),
        ("kNN search ms", "knn_search_ms"),
        ("encoder ms", "encoder_ms"),
        ("DSI decode ms", "dsi_decode_ms"),
        ("BoVW ms", "bovw_ms"),
        ("DSI q/s", "dsi_qps"),
        ("kNN q/s", "knn_qps"),
        ("BoVW q/s", "bovw_qps"),
        ("DSI/kNN", "dsi_over_knn"),
      ],
    )
  )
  print()
  for batch, c in report["summary"]["crossover"].items():
    print(f"{batch}: end to end {c['text']}; search only {c['search_only']['text']}")
  print(f"wrote {json_path} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
