"""Your own collection, measured: adding to an index against building it again, and building and
searching a photo collection.

  python tools/index_bench.py add --out benchmarks/results/index_add_cpu
  python tools/index_bench.py build --images DIR --out benchmarks/results/index_build_cpu

`add`: a 512-image Fashion-MNIST index (balanced classes of the training split, written as PNG
files, built with `dsi-jax index build`'s defaults), then 10 %, 25 % and 50 % more training
images added to a copy of it (`Index.add`, defaults), each against an index built from scratch
on the same grown collection. Per row: IA@1 on the new items and on the old ones (each item's
own image finds it first: forgetting shows on the old), MAP@10 and R@100 of 500 test-split
queries (50 per class; relevant: the indexed items of the query's class), and the wall time of
the add or of the build.

`build`: every image of a folder indexed with the defaults; build time, IA@1, augmented-copy
R@1 (`Index` trains and tests on augmented views) and search latency (ms per query, batches of
one and of 32 queries).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np

from dsi_jax import metrics as metrics_lib
from dsi_jax import results
from dsi_jax.data import fashion_mnist
from dsi_jax.data import images as images_lib
from dsi_jax.data import inputs as inputs_lib
from dsi_jax.index import AddConfig, BuildConfig, Index

TOWER = "dinov2_vits14 (block8, frozen)"


def write_pngs(folder: str, pixels: np.ndarray, names: list[str]) -> None:
  os.makedirs(folder, exist_ok=True)
  for x, name in zip(pixels, names):
    cv2.imwrite(os.path.join(folder, name), x)


def own_image_accuracy(index: Index, keys: list[str]) -> float:
  """IA@1: each item's own image (as the index stores it) ranks it first."""
  rows = [index.items["keys"].index(k) for k in keys]
  hits = index.search_inputs(inputs_lib.image_inputs(index.pixels[rows]), k=1)
  return float(np.mean([h[0]["key"] == k for h, k in zip(hits, keys)]))


def class_queries(index: Index, queries: np.ndarray, labels: np.ndarray, label_of: dict) -> dict:
  """MAP@10 and R@100 of test images; relevant: the live indexed items of the same class."""
  size = index.run.spec.image_size
  inputs = inputs_lib.image_inputs(
    images_lib.resize_square(np.repeat(queries[..., None], 3, -1), size)
  )
  hits = index.search_inputs(inputs, k=100)
  ranked = [[h["key"] for h in q] for q in hits]
  live = index.keys
  relevant = [{k for k in live if label_of[k] == y} for y in labels]
  return {
    "map@10": metrics_lib.map_at_k(ranked, relevant, 10),
    "recall@100": metrics_lib.recall_at_k(ranked, relevant, 100),
  }


def command(argv) -> str:
  return results.invocation("python tools/index_bench.py", argv)


def add_benchmark(args, argv=None) -> tuple[list[dict], dict]:
  images, labels = fashion_mnist.load_fashion_mnist("train", args.data_dir)
  test_images, test_labels = fashion_mnist.load_fashion_mnist("test", args.data_dir)
  rng = np.random.default_rng(args.seed)
  per_class = args.base // 10
  extra_needed = int(round(max(args.fractions) * args.base))
  chosen = [
    rng.choice(np.flatnonzero(labels == c), per_class + extra_needed // 10 + 1, replace=False)
    for c in range(10)
  ]
  base = np.concatenate([c[:per_class] for c in chosen])
  pool = np.stack([c[per_class:] for c in chosen], axis=1).reshape(-1)  # classes interleaved
  q = np.concatenate(
    [
      rng.choice(np.flatnonzero(test_labels == c), args.queries // 10, replace=False)
      for c in range(10)
    ]
  )
  queries, query_labels = test_images[q], test_labels[q]
  label_of = {f"fm{i:05d}.png": int(labels[i]) for i in np.concatenate([base, pool])}
  work = tempfile.mkdtemp(prefix="index-bench-")
  write_pngs(os.path.join(work, "base"), images[base], [f"fm{i:05d}.png" for i in base])
  rows = []
  config = {"base": len(base), "fractions": args.fractions, "queries": args.queries}
  common = dict(dataset=f"fashion_mnist_{len(base)}", ids="atomic", tower=TOWER, num_queries=len(q))

  def row(index: Index, setting: str, seconds: float, old: list[str], new: list[str]) -> dict:
    values = class_queries(index, queries, query_labels, label_of)
    return results.make_row(
      model="vit_dsi",
      setting=setting,
      db_size=len(index),
      metrics={
        "ia@1": own_image_accuracy(index, index.keys),
        "ia_new@1": own_image_accuracy(index, new) if new else None,
        "ia_old@1": own_image_accuracy(index, old),
        **values,
      },
      wall_seconds=round(seconds, 1),
      **common,
    )

  t0 = time.time()
  base_path = os.path.join(work, "index")
  built = Index.build(os.path.join(work, "base"), base_path, BuildConfig(seed=args.seed))
  base_keys = built.keys
  rows.append(row(built, "build (base)", time.time() - t0, base_keys, []))
  if args.keep:  # the base index, e.g. to serve
    shutil.copytree(base_path, args.keep)
  for fraction in args.fractions:
    count = int(round(fraction * args.base))
    names = [f"fm{i:05d}.png" for i in pool[:count]]
    source = os.path.join(work, f"add{count}")
    write_pngs(source, images[pool[:count]], names)
    path = os.path.join(work, f"added{count}")
    shutil.copytree(base_path, path)
    t0 = time.time()
    grown = Index.add(path, source, AddConfig(seed=args.seed))
    label = f"add +{fraction:.0%} ({count})"
    rows.append(row(grown, label, time.time() - t0, base_keys, names))
    both = os.path.join(work, f"both{count}")
    os.makedirs(both)
    for folder in (os.path.join(work, "base"), source):
      for name in os.listdir(folder):
        shutil.copy(os.path.join(folder, name), both)
    t0 = time.time()
    scratch = Index.build(both, os.path.join(work, f"scratch{count}"), BuildConfig(seed=args.seed))
    rows.append(
      row(scratch, f"rebuild +{fraction:.0%} ({count})", time.time() - t0, base_keys, names)
    )
    print(results.markdown_table(rows), file=sys.stderr)
  shutil.rmtree(work, ignore_errors=True)
  return rows, config


def build_benchmark(args) -> tuple[list[dict], dict]:
  work = tempfile.mkdtemp(prefix="index-bench-")
  path = os.path.join(work, "index")
  t0 = time.time()
  index = Index.build(args.images, path, BuildConfig(seed=args.seed))
  seconds = time.time() - t0
  summary = index.state["log"][0]["fine_tuned"]
  n = len(index)
  rng = np.random.default_rng(args.seed + 77)
  rows = rng.choice(n, size=min(n, 256), replace=False)
  views = np.stack([images_lib.augmented_view(index.pixels[r], rng) for r in rows])
  inputs = inputs_lib.image_inputs(views)
  index.search_inputs(inputs[:32], k=10)  # compiled
  index.search_inputs(inputs[:1], k=10)
  t = time.time()
  hits = index.search_inputs(inputs, k=10)
  batch_ms = 1000 * (time.time() - t) / len(rows)
  t = time.time()
  for x in inputs[:32]:
    index.search_inputs(x[None], k=10)
  single_ms = 1000 * (time.time() - t) / 32
  keys = [index.items["keys"][r] for r in rows]
  ranked = [[h["key"] for h in q] for q in hits]
  relevant = [{k} for k in keys]
  row = results.make_row(
    model="vit_dsi",
    setting="dsi-jax index build",
    ids="atomic",
    dataset=os.path.basename(os.path.normpath(args.images)),
    db_size=n,
    num_queries=len(rows),
    metrics={
      "ia@1": own_image_accuracy(index, index.keys),
      "recall@1": metrics_lib.recall_at_k(ranked, relevant, 1),
      "recall@10": metrics_lib.recall_at_k(ranked, relevant, 10),
    },
    tower=TOWER,
    wall_seconds=round(seconds, 1),
    search_ms=round(single_ms, 1),
    search_batch_ms=round(batch_ms, 2),
    steps=summary["steps"],
    captions=sum(len(q) for q in index.items["queries"]),  # kept in the index, not trained on
  )
  shutil.rmtree(work, ignore_errors=True)
  return [row], {"images": os.path.basename(os.path.normpath(args.images))}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest="what", required=True)
  a = sub.add_parser("add")
  a.add_argument("--base", type=int, default=512, help="items (a multiple of 10: balanced)")
  a.add_argument(
    "--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.25, 0.5]
  )
  a.add_argument("--queries", type=int, default=500)
  a.add_argument("--data-dir", default=None)
  a.add_argument("--keep", default=None, help="copy the base index to this folder")
  b = sub.add_parser("build")
  b.add_argument("--images", required=True, help="a folder of images")
  for parser in (a, b):
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
  args = p.parse_args(argv)
  rows, config = add_benchmark(args) if args.what == "add" else build_benchmark(args)
  if args.out:
    results.write_report(args.out, rows, config, command=command(argv))
  else:
    print(results.markdown_table(rows))


if __name__ == "__main__":
  main()
