"""`dsi-jax demo`: ViT-DSI against BoVW and pixel kNN on a Fashion-MNIST corpus.

The seed's Table-1 setting at small scale: N images with balanced classes, 25 % indexed,
75 % queries (split 0.8 / 0.1 / 0.1), a query is relevant to every indexed image of its
class. ViT-DSI is trained with clustered and with random ids, zero-shot (indexing only) and
fine-tuned (indexing, then retrieval mixed 1:1 with indexing). Everything is evaluated on
all test queries.

All data comes through the SeqIO tasks of `dsi_jax.tasks` (the `dsi_fashion_mnist/32px` tfds
dataset, built from the Debian package's files on first use); each run's corpus and ids are
saved under `--out`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dsi_jax import metrics as metrics_lib
from dsi_jax import results as results_lib
from dsi_jax import train as train_lib
from dsi_jax.baselines.bovw import BoVW
from dsi_jax.baselines.pixel_knn import PixelKNN
from dsi_jax.models import dsi


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  num_images: int = 512
  schemes: tuple[str, ...] = ("clustered", "random")
  model: dict = dataclasses.field(default_factory=dict)  # overrides of make_vit_dsi
  train: train_lib.TrainConfig = train_lib.TrainConfig()
  bovw_words: int = 200


def default_config(quick: bool = False, num_images: int | None = None) -> DemoConfig:
  if not quick:
    return DemoConfig(num_images=num_images or 512)
  # --quick: a smaller corpus and model and capped phases, same code path (≤ 3 min on 2 cores).
  return DemoConfig(
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


def register_corpus(
  config: DemoConfig, scheme: str, seed: int, out_dir: str, data_dir: str | None
) -> str:
  """Registers the SeqIO tasks of this run's corpus; its corpus and ids go under `out_dir`."""
  from dsi_jax.tasks import datasets as task_datasets

  name = f"dsi_jax_demo_fmnist{config.num_images}_{scheme}_seed{seed}"
  task_datasets.register(
    "fmnist",
    num_items=config.num_images,
    scheme=scheme,
    seed=seed,
    name=name,
    corpus_dir=os.path.join(out_dir, "runs", f"seed{seed}", f"vit_dsi_{scheme}", "corpus"),
    location=data_dir,
  )
  return name


def baseline_rows(task_name: str, config: DemoConfig, common: dict) -> list[dict]:
  """BoVW and pixel kNN on the same indexed items and test queries as ViT-DSI."""
  from dsi_jax import tasks

  data = tasks.corpus_data(task_name)
  corpus = data.corpus
  index_images = np.stack([data.images[k] for k in corpus.indexed])
  test_images = np.stack([data.images[q.item] for q in corpus.split("test")])
  relevant = corpus.query_relevance("test")
  rows = []
  for name, retriever in (
    (
      "bovw",
      lambda: BoVW(num_words=config.bovw_words, seed=common["seed"]).fit(
        index_images, list(corpus.indexed)
      ),
    ),
    ("pixel_knn", lambda: PixelKNN(index_images, list(corpus.indexed))),
  ):
    t0 = time.time()
    r = retriever()
    ranked, _ = r.search(test_images, 100)
    m = metrics_lib.compute_metrics(ranked, relevant, ["map@10", "recall@100"])
    rows.append(
      {
        **common,
        "model": name,
        "setting": "-",
        "ids": None,
        "ia@1": None,
        "ia@5": None,
        **m,
        "seconds": round(time.time() - t0, 2),
      }
    )
  return rows


def run_seed(
  config: DemoConfig, seed: int, out_dir: str, data_dir: str | None, show_progress: bool
) -> tuple[list[dict], dict]:
  from dsi_jax import tasks

  rows, histories = [], {}
  tconf = dataclasses.replace(config.train, seed=seed)
  common: dict[str, Any] = {}
  task_name = ""
  for scheme in config.schemes:
    task_name = register_corpus(config, scheme, seed, out_dir, data_dir)
    data, ids = tasks.retrieval_data(task_name)
    corpus = tasks.corpus_data(task_name).corpus
    common = {
      "dataset": "fashion_mnist",
      "db_size": len(corpus.item_keys),
      "num_indexed": len(corpus.indexed),
      "num_queries": len(corpus.split("test")),
      "seed": seed,
    }
    model = dsi.DSIModel(dsi.make_vit_dsi(ids, **config.model), ids)
    workdir = os.path.join(out_dir, "runs", f"seed{seed}", f"vit_dsi_{scheme}")
    if show_progress:
      print(
        f"[seed {seed}] ViT-DSI, {scheme} ids: indexing {len(ids)} images, then fine-tuning",
        file=sys.stderr,
      )
    res = train_lib.train_dsi(
      model, data, config=tconf, workdir=workdir, show_progress=show_progress
    )
    rows += train_lib.result_rows(
      res, ("map@10", "recall@100"), **common, model="vit_dsi", ids=scheme
    )
    histories[scheme] = {s: res[s]["history"] for s in ("zero_shot", "fine_tuned")}
  rows.extend(baseline_rows(task_name, config, common))
  return rows, histories


def run_demo(
  out_dir: str,
  *,
  quick: bool = False,
  seeds: Sequence[int] = (0,),
  num_images: int | None = None,
  data_dir: str | None = None,
  show_progress: bool = True,
) -> dict[str, Any]:
  """Runs the whole demo and writes `results.json`, `results.md` and `loss_curves.png`."""
  config = default_config(quick, num_images)
  if not show_progress:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  all_rows, all_hist = [], {}
  for seed in seeds:
    rows, hist = run_seed(config, seed, out_dir, data_dir, show_progress)
    all_rows.extend(rows)
    all_hist[seed] = hist
  report = {
    "rows": results_lib.aggregate(all_rows),
    "runs": all_rows,
    "config": {
      "command": "dsi-jax demo" + (" --quick" if quick else ""),
      "seeds": list(seeds),
      "num_images": config.num_images,
      "image_size": 32,
      "model": {**dsi.VIT_DSI_DEFAULTS, **config.model},
      "train": dataclasses.asdict(config.train),
      "bovw_words": config.bovw_words,
      "total_seconds": round(time.time() - t0, 1),
      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    },
    "versions": results_lib.versions(),
  }
  results_lib.write_json(report, os.path.join(out_dir, "results.json"))
  table = results_lib.markdown_table(report["rows"])
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(table + "\n")
  plot_loss_curves(all_hist, os.path.join(out_dir, "loss_curves.png"))
  print(table)
  print(f"\nwrote {os.path.join(out_dir, 'results.json')} ({report['config']['total_seconds']} s)")
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
