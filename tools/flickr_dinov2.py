"""Flickr8k-1k text -> image with two borrowed towers: all-MiniLM-L6-v2 (trained at 0.1 x the
rate, as in the CLIP-DSI experiment) and the frozen DINOv2 ViT-S/14, on the corpus, splits,
captions and budgets of `gin_configs/experiments/flickr8k1k_clip_dsi.gin`:

- the dual encoder (1,000 steps of 64 pairs) on DINOv2's block-8 mean patch token;
- CLIP-DSI (atomic ids, `--methods dual,clip_dsi`) whose decoder reads DINOv2's block-8
  tokens (1 + 8 x 8 at 112 px), indexing then fine-tuning up to 4,000 steps;

against the same experiment's ViT-from-scratch rows and the caption prototypes.

  DSI_JAX_FLICKR8K_DIR=../shared/data/flickr8k_1k python tools/flickr_dinov2.py \
      --out benchmarks/results/flickr_dual_dinov2_cpu

The images are the corpus's 64 px images, enlarged to `--size` for the tower.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from dsi_jax import results
from dsi_jax.baselines.feature_knn import TowerFeatures
from dsi_jax.experiments import flickr
from dsi_jax.importers import dinov2
from dsi_jax.models import borrowed, text


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--layer", default="block8")
  p.add_argument("--pool", default="mean", choices=["cls", "mean"])
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="runs/flickr_dinov2", help="the corpus is saved here")
  p.add_argument("--methods", default="dual", help="dual, clip_dsi or both (comma-separated)")
  p.add_argument("--clip_dsi_size", type=int, default=112, help="tower side for CLIP-DSI")
  p.add_argument("--index_steps", type=int, default=2000, help="CLIP-DSI's indexing cap")
  p.add_argument("--finetune_steps", type=int, default=4000, help="CLIP-DSI's fine-tuning cap")
  p.add_argument(
    "--embedding_ids",
    action="store_true",
    help="CLIP-DSI's atomic ids start from the mean embedding of each image's training captions",
  )
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  config = flickr.dinov2_config(
    steps=args.steps,
    index_steps=args.index_steps,
    finetune_steps=args.finetune_steps,
    seed=args.seed,
  )
  config = dataclasses.replace(config, embedding_ids=args.embedding_ids)
  methods = args.methods.split(",")
  corpus, data, docids = flickr._prepare(config, args.workdir)
  keys = list(docids.keys)
  relevant = [{keys[i] for i in r} for r in data.test_relevant]
  common = dict(dataset="flickr8k_1000", db_size=len(keys), num_queries=len(data.test_inputs))

  minilm = text.load_minilm()
  rows = [flickr.caption_prototype_row(corpus, data, minilm, **common)]
  if "clip_dsi" in methods:
    tokens = flickr.dinov2_tokens(data.index_inputs, args.clip_dsi_size, show_progress=True)
    clip_rows = flickr.train_clip_dsi(
      config,
      data,
      docids,
      minilm,
      args.workdir,
      True,
      common,
      dinov2_size=args.clip_dsi_size,
      images=tokens[:, :, None, :],
    )
    for r in clip_rows:
      r["tower"] = flickr.dinov2_tower_name(args.clip_dsi_size)
    rows = clip_rows + rows
  if "dual" not in methods:
    return _write(args, rows, config, data)
  t0 = time.time()
  kwargs, params = dinov2.load_onnx()
  pixels = np.round((data.index_inputs + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
  features = TowerFeatures(kwargs, params, size=args.size)(pixels, show_progress=True)
  chosen = features[args.layer][args.pool]
  encode_seconds = time.time() - t0
  row = flickr.dual_encoder_row(
    config,
    data,
    keys,
    relevant,
    minilm,
    True,
    common,
    image_tower=borrowed.FeatureMap(),
    images=chosen[:, None, None, :],
  )
  row["tower"] = f"minilm+dinov2_vits14 ({args.layer} {args.pool}, frozen)"
  row["encode_seconds"] = round(encode_seconds, 1)
  rows.insert(len(rows) - 1, row)
  _write(args, rows, config, data)


def _write(args, rows, config, data) -> None:
  """The report, with folders named by their last component only (no paths of this machine)."""
  command = results.invocation("python tools/flickr_dinov2.py")
  description = {**vars(args), "flickr": flickr._describe(config, data)}
  description["workdir"] = os.path.basename(os.path.normpath(args.workdir))
  source = description["flickr"].get("source_dir")
  if source:
    description["flickr"]["source_dir"] = os.path.basename(os.path.normpath(source))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    results.write_report(args.out, rows, description, command=command)
  else:
    print(results.markdown_table(rows))


if __name__ == "__main__":
  main()
