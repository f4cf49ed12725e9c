"""One ViT-DSI experiment on a Fashion-MNIST corpus, as a plain function.

`dsi-jax train --gin_file=gin_configs/experiments/....gin` binds its arguments with gin;
nothing below the entry point knows about gin.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dsi_jax import results as results_lib
from dsi_jax import train as train_lib
from dsi_jax.models import dsi


def run_experiment(
  *,
  workdir: str,
  num_images: int = 512,
  ids: str = "clustered",
  seed: int = 0,
  finetune: bool = True,
  model: dict | None = None,
  train_config: train_lib.TrainConfig | None = None,
  data_dir: str | None = None,
  distributed: bool = False,
) -> dict[str, Any]:
  """Registers the corpus's SeqIO tasks, trains ViT-DSI on them, writes `results.json`.

  The corpus and its ids are saved in `workdir/corpus/` (and reused if present).
  distributed: start with `jax.distributed.initialize` (one process per host of a TPU pod
    slice or a multi-node GPU job; its arguments are auto-detected there).
  """
  if distributed:
    from dsi_jax import partitioning

    partitioning.initialize_distributed()
  from dsi_jax import tasks
  from dsi_jax.tasks import datasets as task_datasets

  name = f"dsi_jax_experiment_fmnist{num_images}_{ids}_seed{seed}"
  task_datasets.register(
    "fmnist",
    num_items=num_images,
    scheme=ids,
    seed=seed,
    name=name,
    corpus_dir=os.path.join(workdir, "corpus"),
    location=data_dir,
  )
  data, docids = tasks.retrieval_data(name)
  corpus = tasks.corpus_data(name).corpus
  network = dsi.make_vit_dsi(docids, **(model or {}))
  config = dataclasses.replace(train_config or train_lib.TrainConfig(), seed=seed)
  result = train_lib.train_dsi(
    dsi.DSIModel(network, docids), data, config=config, workdir=workdir, finetune=finetune
  )
  rows = train_lib.result_rows(
    result,
    ("map@10", "recall@100"),
    model="vit_dsi",
    dataset="fashion_mnist",
    db_size=num_images,
    ids=ids,
    num_queries=len(corpus.split("test")),
    seed=seed,
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
