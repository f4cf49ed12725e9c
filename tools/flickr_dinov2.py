"""The Flickr8k-1k dual encoder with two borrowed towers: all-MiniLM-L6-v2 (trained at 0.1 x
the rate, as in the CLIP-DSI experiment) and the frozen DINOv2 ViT-S/14 (block 8, mean of the
patch tokens, computed once), on the corpus, splits, captions and training budget of
`gin_configs/experiments/flickr8k1k_clip_dsi.gin` (1,000 steps of 64 pairs), against the same
experiment's ViT-from-scratch dual encoder and the caption prototypes.

  DSI_JAX_FLICKR8K_DIR=../shared/data/flickr8k_1k python tools/flickr_dinov2.py \
      --out benchmarks/results/flickr_dual_dinov2_cpu

The images are the corpus's 64 px images, enlarged to `--size` for the tower.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
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
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  config = flickr.FlickrConfig(
    corpus="flickr8k",
    num_items=1000,
    seed=args.seed,
    ids="atomic",  # the splits do not depend on the ids; the dual encoder never reads them
    text_length=24,
    text_lr_multiplier=0.1,
    dual=flickr.DualEncoderConfig(steps=args.steps, batch_size=64, learning_rate=3e-4),
  )
  corpus, data, docids = flickr._prepare(config, args.workdir)
  keys = list(docids.keys)
  relevant = [{keys[i] for i in r} for r in data.test_relevant]
  common = dict(dataset="flickr8k_1000", db_size=len(keys), num_queries=len(data.test_inputs))

  t0 = time.time()
  kwargs, params = dinov2.load_onnx()
  pixels = np.round((data.index_inputs + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
  features = TowerFeatures(kwargs, params, size=args.size)(pixels, show_progress=True)
  chosen = features[args.layer][args.pool]
  encode_seconds = time.time() - t0

  minilm = text.load_minilm()
  rows = [flickr.caption_prototype_row(corpus, data, minilm, **common)]
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
  rows.insert(0, row)
  command = "python tools/flickr_dinov2.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  description = {**vars(args), "flickr": flickr._describe(config, data)}
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    results.write_report(args.out, rows, description, command=command)
  else:
    print(results.markdown_table(rows))


if __name__ == "__main__":
  main()
