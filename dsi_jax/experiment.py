"""One ViT-DSI experiment on a Fashion-MNIST corpus, as a plain function.

`dsi-jax train --gin_file=gin_configs/experiments/....gin` binds its arguments with gin;
nothing below the entry point knows about gin.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dsi_jax import docids as docids_lib
from dsi_jax import results as results_lib
from dsi_jax import train as train_lib
from dsi_jax.data import corpus as corpus_lib
from dsi_jax.data import fashion_mnist
from dsi_jax.demo import retrieval_data
from dsi_jax.models import dsi


def run_experiment(
  *,
  workdir: str,
  num_images: int = 512,
  ids: str = "clustered",
  seed: int = 0,
  finetune: bool = True,
  image_size: int = 32,
  model: dict | None = None,
  train_config: train_lib.TrainConfig | None = None,
  data_dir: str | None = None,
) -> dict[str, Any]:
  """Samples the corpus, trains ViT-DSI and writes `results.json` in `workdir`."""
  images, labels = fashion_mnist.load_fashion_mnist("train", data_dir)
  corpus = corpus_lib.sample_corpus(
    images, labels, num_items=num_images, seed=seed, key_prefix="fmnist-train"
  )
  os.makedirs(workdir, exist_ok=True)
  corpus.save(os.path.join(workdir, "corpus.json"))
  docids = docids_lib.make_docids(
    ids, corpus.indexed_keys, labels=corpus.labels[corpus.indexed], seed=seed
  )
  network = dsi.make_vit_dsi(docids, **(model or {}))
  config = dataclasses.replace(train_config or train_lib.TrainConfig(), seed=seed)
  result = train_lib.train_dsi(
    dsi.DSIModel(network, docids),
    retrieval_data(corpus, image_size),
    config=config,
    workdir=workdir,
    finetune=finetune,
  )
  rows = []
  for setting in ("zero_shot", "fine_tuned"):
    if setting not in result:
      continue
    t = result[setting]["test"]
    rows.append(
      {
        "model": "vit_dsi",
        "setting": setting,
        "dataset": "fashion_mnist",
        "db_size": num_images,
        "ids": ids,
        "num_queries": len(corpus.query_test),
        "ia@1": t["ia@1"],
        "ia@5": t["ia@5"],
        "map@10": t["test/map@10"],
        "recall@100": t["test/recall@100"],
        "steps": result[setting]["steps"],
        "seconds": round(result[setting]["seconds"], 1),
        "seed": seed,
      }
    )
  report = {
    "rows": rows,
    "config": {
      "num_images": num_images,
      "ids": ids,
      "seed": seed,
      "model": {**dsi.VIT_DSI_DEFAULTS, **(model or {})},
      "train": dataclasses.asdict(config),
    },
    "versions": results_lib.versions(),
  }
  results_lib.write_json(report, os.path.join(workdir, "results.json"))
  print(results_lib.markdown_table(rows))
  return report
