"""Retrieve fast, rerank smart on Flickr8k-1k: caption prototypes, the dual encoder and
CLIP-DSI (MiniLM + the frozen DINOv2 tower), each alone and re-ranked by a caption-image
cross-encoder.

The cross-encoder is one MiniLM over `[CLS] caption [SEP]` followed by the image's tokens:
DINOv2's block-8 output at `image_size` px (CLIP-DSI's own image input), its patch grid
average-pooled to `grid x grid` plus the class token, projected to MiniLM's width
(`models.cross_encoder.CrossEncoder(image_dim=...)`). It trains with binary cross-entropy on
the training captions, each with its image and hard negatives from the first stages' rankings
of the training captions. The "image+captions" item view also gives the cross-encoder the
item's training captions as its text segment (what CLIP-DSI and the caption prototypes index
too), in training one caption fewer, the query's own for its positive (`drop_one`); "image"
is pixels only.

The corpus, splits, towers and training budgets are those of `tools/flickr_dinov2.py`
(`experiments.flickr.dinov2_config`); every metric is over all 1,000 test captions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from typing import Any

import jax
import numpy as np

from dsi_jax import checkpoints, cross_training, rerank, results, retrieval
from dsi_jax import workdir as workdir_lib
from dsi_jax.experiments import flickr
from dsi_jax.experiments.rerank import pipeline_rows

ITEM_VIEWS = ("image", "image+captions")
# what a trained cross-encoder depends on (a run with other values trains a new one)
CROSS_ENCODER_FIELDS = (
  "image_size",
  "grid",
  "max_length",
  "steps",
  "queries_per_batch",
  "negatives_per_query",
  "negatives",
  "learning_rate",
  "pretrained_lr_multiplier",
  "dual_steps",
  "index_steps",
  "finetune_steps",
  "seed",
)


@dataclasses.dataclass(frozen=True)
class FlickrRerankConfig:
  """The Flickr re-ranking experiment (fields as `experiments.rerank.RerankConfig`).

  image_size, grid: the tower's input side and the pooled patch grid the cross-encoder reads.
  item_views: "image" and/or "image+captions" (one cross-encoder each).
  dual_steps, index_steps, finetune_steps: the first stages' budgets (`flickr.dinov2_config`).
  """

  k: int = 20
  fusion_weights: tuple[float, ...] = (0.0, 0.5)
  image_size: int = 112
  grid: int = 4
  item_views: tuple[str, ...] = ITEM_VIEWS
  max_length: int = 96
  steps: int = 500
  queries_per_batch: int = 8
  negatives_per_query: int = 3
  negatives: tuple[tuple[str, int], ...] = (
    ("clip_dsi", 1),
    ("dual_encoder", 1),
    ("caption_prototypes", 1),
  )
  learning_rate: float = 3e-4
  pretrained_lr_multiplier: float = 0.25
  dual_steps: int = 1000
  index_steps: int = 2000
  finetune_steps: int = 4000
  seed: int = 0
  max_test_queries: int | None = None
  latency_queries: int = 32


def pooled_tokens(tokens: np.ndarray, grid: int) -> np.ndarray:
  """`[n, 1 + g * g, d]` class + patch tokens -> `[n, 1 + grid * grid, d]`: the class token
  and the patch grid average-pooled to `grid x grid` (g a multiple of grid)."""
  n, p, d = tokens.shape
  g = int(round((p - 1) ** 0.5))
  if g * g != p - 1 or g % grid:
    raise ValueError(f"{p - 1} patch tokens are not a square grid divisible by {grid}")
  f = g // grid
  patches = tokens[:, 1:].reshape(n, grid, f, grid, f, d).mean(axis=(2, 4))
  return np.concatenate([tokens[:, :1], patches.reshape(n, grid * grid, d)], axis=1)


def drop_one(pairs, captions_of: dict[str, list[str]]) -> list[str]:
  """The item text of each training pair (caption, key): the item's training captions less
  exactly one, the query itself when it is one of them (else a positive would hold its query
  verbatim, a string match the cross-encoder learns in a few steps and cannot use on test
  captions), else one chosen by a hash of the pair. Every item, relevant or not, so shows one
  caption fewer than it has: were only positives shortened, the caption count alone would
  tell them apart (a run that did so fit its training pairs to a BCE of 0.02 and re-ranked
  test captions no better than chance)."""
  texts = []
  for query, key in pairs:
    captions = captions_of[key]
    if query in captions:
      drop = captions.index(query)
    else:
      drop = zlib.crc32(f"{query}\t{key}".encode()) % max(len(captions), 1)
    texts.append(" ; ".join(c for i, c in enumerate(captions) if i != drop))
  return texts


def run(
  config: FlickrRerankConfig = FlickrRerankConfig(),
  *,
  workdir: str,
  show_progress: bool = True,
) -> list[dict[str, Any]]:
  """Trains the first stages and the cross-encoders, evaluates every pipeline; result rows."""
  from dsi_jax.data import inputs as inputs_lib
  from dsi_jax.models import borrowed, cross_encoder, text

  for view in config.item_views:
    if view not in ITEM_VIEWS:
      raise ValueError(f"unknown item view {view!r}; known: {', '.join(ITEM_VIEWS)}")
  fconf = flickr.dinov2_config(
    steps=config.dual_steps,
    index_steps=config.index_steps,
    finetune_steps=config.finetune_steps,
    seed=config.seed,
  )
  fconf = dataclasses.replace(fconf, max_eval_queries=config.max_test_queries)
  corpus, data, docids = flickr._prepare(fconf, workdir)
  keys = list(docids.keys)
  minilm = text.load_minilm()
  tokenizer = minilm[2]

  def prepare(captions):  # caption texts -> token rows, as the tasks made them
    rows = [inputs_lib.text_token_ids(tokenizer, c) for c in captions]
    return inputs_lib.token_rows(rows, fconf.text_length)

  train_caps = [q.text for q in corpus.split("train")]
  test_caps = [q.text for q in corpus.split("test")][: len(data.test_inputs)]
  if not np.array_equal(prepare(test_caps), data.test_inputs):
    raise ValueError("the test captions do not match the task's test inputs")
  train_rel = [{keys[i] for i in r} for r in data.train_relevant]
  test_rel = [{keys[i] for i in r} for r in data.test_relevant]
  common = dict(dataset="flickr8k_1000", db_size=len(keys), num_queries=len(test_caps))

  tokens = flickr.dinov2_tokens(data.index_inputs, config.image_size, show_progress)
  tower_name = flickr.dinov2_tower_name(config.image_size)
  stages: dict[str, Any] = {"caption_prototypes": flickr.CaptionPrototypes(corpus, minilm)}
  rows: list[dict[str, Any]] = []
  clip_rows, clip = flickr.train_clip_dsi(
    fconf,
    data,
    docids,
    minilm,
    workdir,
    show_progress,
    common,
    dinov2_size=config.image_size,
    images=tokens[:, :, None, :],
    with_retriever=True,
  )
  stages["clip_dsi"] = retrieval.Prepared(clip, prepare)
  dual_row, dual = flickr.dual_encoder_row(
    fconf,
    data,
    keys,
    test_rel,
    minilm,
    show_progress,
    common,
    image_tower=borrowed.FeatureMap(),
    images=tokens[:, 1:].mean(axis=1)[:, None, None, :],
    with_retriever=True,
    keep_in=os.path.join(workdir, "dual_encoder"),
  )
  stages["dual_encoder"] = retrieval.Prepared(dual, prepare)
  rows += [{**r, "tower": tower_name} for r in [*clip_rows, dual_row]]

  t0 = time.time()
  sources = dict(config.negatives)
  rankings = {name: stages[name].search(train_caps, 20)[0] for name in sources}
  negatives = cross_training.mine_negatives(rankings, train_rel, sources)
  features = pooled_tokens(tokens, config.grid)
  item_features = dict(zip(keys, features))
  captions_of: dict[str, list[str]] = {key: [] for key in keys}
  for caption, rel in zip(train_caps, train_rel):
    for key in rel:
      captions_of[key].append(caption)
  item_captions = {key: " ; ".join(c) for key, c in captions_of.items()}
  mining_s = time.time() - t0

  pipelines = []
  for view in config.item_views:
    model = cross_encoder.CrossEncoder(
      minilm[0].config, image_dim=features.shape[-1], max_image_tokens=features.shape[1]
    )
    dummy = (np.zeros((1, 8), np.int32), np.zeros((1, *features.shape[1:]), np.float32))
    params = model.init(jax.random.PRNGKey(config.seed), dummy[0], image_features=dummy[1])
    params = cross_encoder.with_pretrained(params["params"], minilm[1])
    scorer = rerank.CrossEncoderScorer(
      model,
      params,
      tokenizer,
      item_texts=item_captions if view == "image+captions" else None,
      item_features=item_features,
      max_length=config.max_length,
      show_progress=show_progress,
    )
    train_inputs = scorer.pair_inputs
    if view == "image+captions":

      def train_inputs(pairs, scorer=scorer):
        features = np.stack([scorer.item_features[key] for _, key in pairs])
        texts = drop_one(pairs, captions_of)
        queries = [q for q, _ in pairs]
        return rerank.pair_inputs(tokenizer, queries, texts, features, max_length=scorer.max_length)

    def train(params=params, train_inputs=train_inputs, model=model):
      t = time.time()
      params, history = cross_training.train_cross_encoder(
        model,
        params,
        train_inputs,
        train_caps,
        train_rel,
        negatives,
        keys,
        steps=config.steps,
        queries_per_batch=config.queries_per_batch,
        negatives_per_query=config.negatives_per_query,
        learning_rate=config.learning_rate,
        pretrained_lr_multiplier=config.pretrained_lr_multiplier,
        seed=config.seed,
        show_progress=show_progress,
      )
      return params, {
        "train_seconds": round(time.time() - t, 1),
        "final_bce": float(np.mean([h["bce"] for h in history[-20:]])),
      }

    fingerprint = {
      "view": view,
      "config": {f: getattr(config, f) for f in CROSS_ENCODER_FIELDS},
      "data": workdir_lib.arrays_sha256(
        features, np.frombuffer(json.dumps([train_caps, negatives]).encode(), np.uint8)
      ),
      "training_items": "drop_one" if view == "image+captions" else None,
    }
    params, trained = checkpoints.trained_once(
      os.path.join(workdir, f"cross_encoder_{view.replace('+', '_')}"), fingerprint, params, train
    )
    info = {
      "reranker": "rerank" if view == "image" else "rerank_with_captions",
      "item_view": view,
      **trained,
    }
    scorer = dataclasses.replace(scorer, params=params)
    pipelines += [(name, stage, scorer, info) for name, stage in stages.items()]
  rows += pipeline_rows(
    pipelines,
    test_caps,
    test_rel,
    flickr.METRICS,
    k=config.k,
    fusion_weights=config.fusion_weights,
    latency_queries=config.latency_queries,
    ids={"clip_dsi": "atomic"},
    common=common,
  )
  rows[-1]["negatives_seconds"] = round(mining_s, 1)
  return rows


def run_flickr_rerank_experiment(
  config: FlickrRerankConfig = FlickrRerankConfig(), *, workdir: str, show_progress: bool = True
) -> dict[str, Any]:
  """The gin entry point (`dsi_jax.run_flickr_rerank_experiment`): `run`, results written to
  `workdir/results.json`. The Flickr8k folder comes from DSI_JAX_FLICKR8K_DIR."""
  from dsi_jax import errors

  errors.writable_folder(workdir, "workdir")
  rows = run(config, workdir=workdir, show_progress=show_progress)
  described = {**dataclasses.asdict(config), "workdir": os.path.basename(os.path.normpath(workdir))}
  return results.write_report(workdir, rows, described, command=results.invocation())
