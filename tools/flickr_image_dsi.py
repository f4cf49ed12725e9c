"""Image -> image DSI on Flickr8k-1k through the borrowed DINOv2 tower: each of the 1,000
photos is indexed, and queried by an augmented view of itself (80 % crop, flip, brightness and
contrast jitter), the same test queries as `tools/bench_tower_knn.py`'s Flickr rows.

  python tools/flickr_image_dsi.py --out benchmarks/results/flickr_image_dsi_cpu

The docid decoder reads the frozen tower's tokens (computed once); it is indexed on the
photos, then fine-tuned on other augmented views of them (`--train_views` per photo, seeds
disjoint from the test views'), with validation on a further view of 100 photos.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from dsi_jax import batches, evaluation, results
from dsi_jax import docids as docids_lib
from dsi_jax import train as train_lib
from dsi_jax.baselines.pixel_knn import PixelKNN
from dsi_jax.data import images as images_lib
from dsi_jax.data import inputs as inputs_lib
from dsi_jax.models import borrowed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tower_knn import flickr  # noqa: E402


def views(index: np.ndarray, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.stack([images_lib.augmented_view(x, rng) for x in index])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--size", type=int, default=112, help="tower input side (multiple of 14)")
  p.add_argument("--ids", default="atomic", choices=["atomic", "random"])
  p.add_argument("--train_views", type=int, default=2)
  p.add_argument("--index_steps", type=int, default=2000)
  p.add_argument("--finetune_steps", type=int, default=2000)
  p.add_argument("--output_block", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  index, keys, test_queries, relevant, metrics = flickr(args.size, seed=args.seed)
  n = len(keys)
  train_views = np.concatenate([views(index, 1000 + v) for v in range(args.train_views)])
  val = views(index[:100], 2000)
  if args.ids == "atomic":
    docids = docids_lib.atomic_ids(keys)
  else:
    docids = docids_lib.random_ids(keys, num_codes=10, seed=args.seed)
  model = borrowed.make_dinov2_dsi(
    docids, image_size=args.size, output_block=args.output_block, decoder_mlp_dim=768
  )
  as_inputs = inputs_lib.image_inputs
  data = batches.RetrievalData(
    index_inputs=as_inputs(index),
    train_inputs=as_inputs(train_views),
    train_relevant=[np.array([i % n]) for i in range(len(train_views))],
    val_inputs=as_inputs(val),
    val_relevant=[np.array([i]) for i in range(len(val))],
    test_inputs=as_inputs(test_queries),
    test_relevant=[np.array([keys.index(r[0])]) for r in relevant],
  )
  t0 = time.time()
  data = batches.encode_data(data, model.input_encoder, encoder="dinov2", show_progress=True)
  encode_seconds = time.time() - t0
  config = train_lib.TrainConfig(
    batch_size=64,
    learning_rate=1e-3,
    warmup_steps=100,
    index_max_steps=args.index_steps,
    index_eval_every=250,
    finetune_max_steps=args.finetune_steps,
    finetune_eval_every=250,
    patience=3,
    eval_batch_size=100,
    ranking="auto",
    eval_metrics=("map@10", *metrics),
    seed=args.seed,
  )
  result = train_lib.train_dsi(model, data, config=config, show_progress=True)
  common = dict(dataset="flickr8k_image_to_image", db_size=n, num_queries=n, seed=args.seed)
  rows = results.phase_rows(
    result, metrics, model="vit_dsi", ids=args.ids, tower="dinov2_vits14", **common
  )
  knn = PixelKNN(data.index_inputs[:, 0], keys)  # cosine kNN over the CLS token it reads
  values = evaluation.evaluate(knn, data.test_inputs[:, 0], relevant, metrics)
  rows.append(
    results.make_row(
      model="feature_knn",
      setting="-",
      metrics={"ia@1": None, "ia@5": None, **values},
      tower="dinov2_vits14",
      layer="final" if args.output_block is None else f"block{args.output_block}",
      pool="cls",
      **common,
    )
  )
  config_out = {**vars(args), "train": dataclasses.asdict(config)}
  config_out["encode_seconds"] = round(encode_seconds, 1)
  command = results.invocation("python tools/flickr_image_dsi.py")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    results.write_report(args.out, rows, config_out, command=command)
  else:
    print(results.markdown_table(rows))


if __name__ == "__main__":
  main()
