"""A training run's folder: what makes it the same run, and resuming in it.

`run.json` holds the run's fingerprint (config, hashes of the ids, data and model spec, param
shapes). A rerun with the same fingerprint resumes from the folder's checkpoints; any other
run replaces them. The sha256 of `run.json` is the run's id, recorded with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from dsi_jax import errors, partitioning
from dsi_jax import results as results_lib
from dsi_jax.batches import RetrievalData

if TYPE_CHECKING:
  from dsi_jax.models import dsi

log = logging.getLogger(__name__)


def data_sha256(data: RetrievalData) -> str:
  """Hash of everything a run trains and evaluates on: inputs and relevance of every split."""
  digest = hashlib.sha256()
  for field in dataclasses.fields(data):
    value = getattr(data, field.name)
    arrays = value if isinstance(value, list) else [value]
    digest.update(f"{field.name}:{len(arrays)}".encode())
    _hash_arrays(digest, arrays)
  return digest.hexdigest()


def arrays_sha256(*arrays: Any) -> str:
  """sha256 of arrays' dtypes, shapes and bytes: a fingerprint of the data a training read
  (`checkpoints.trained_once`)."""
  digest = hashlib.sha256()
  _hash_arrays(digest, arrays)
  return digest.hexdigest()


def _hash_arrays(digest, arrays) -> None:
  for a in arrays:
    a = np.ascontiguousarray(a)
    digest.update(f"{a.dtype}{a.shape}".encode())
    digest.update(a.tobytes())


def run_fingerprint(
  model: dsi.DSIModel,
  params,
  config: Any,  # a train.TrainConfig
  finetune: bool,
  data: RetrievalData | None = None,
) -> dict:
  """What makes two runs the same run (so a rerun resumes rather than starts over): the
  config, the ids, the data (inputs and relevance of every split) and the shapes of the
  model's `params`.

  The mesh is left out on purpose: a run preempted on one mesh may resume on another. So are
  the ranking loss's settings while it is off (`rank_weight` 0): they change nothing then, and
  run folders written before they existed still resume.
  """
  settings = dataclasses.asdict(config)
  for name in ("mesh_data", "mesh_fsdp", "mesh_model", "checkpoint_every", "max_to_keep"):
    settings.pop(name)
  if not settings.get("rank_weight"):
    for name in ("rank_weight", "rank_temperature", "rank_hard_negatives"):
      settings.pop(name, None)
  return {
    "train_config": settings,
    "finetune": finetune,
    "docids_sha256": model.docids.sha256(),
    **({"data_sha256": data_sha256(data)} if data is not None else {}),
    **(
      {"contrastive": [model.contrastive_weight, model.contrastive_temperature]}
      if model.contrastive_weight > 0
      else {}
    ),
    "params": {
      partitioning.path_string(p): list(x.shape)
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    },
  }


def prepare(workdir: str, fingerprint: dict) -> bool:
  """Keeps an earlier run's checkpoints if it was this same run (returns True: resume);
  otherwise removes its checkpoints and curves so that they always belong to this run."""
  errors.writable_folder(workdir, "workdir")
  path = os.path.join(workdir, "run.json")
  same = False
  if os.path.exists(path):
    with open(path) as f:
      same = json.load(f) == json.loads(json.dumps(fingerprint))
  partitioning.sync("workdir read")  # every process has decided before process 0 writes
  if not same and partitioning.is_writer():
    for stale in ("checkpoints", "tensorboard"):
      if os.path.isdir(os.path.join(workdir, stale)):
        log.info("Replacing %s from a different earlier run in %s", stale, workdir)
        shutil.rmtree(os.path.join(workdir, stale))
    results_lib.write_json(fingerprint, path)
  partitioning.sync("workdir prepared")
  return same


def last_logged_step(logdir: str) -> int:
  """The highest step of any scalar in the TensorBoard event files under `logdir` (-1: none)."""
  import tensorflow as tf

  last = -1
  for root, _, files in os.walk(logdir):
    for name in files:
      if "tfevents" not in name:
        continue
      try:
        for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
          if event.HasField("summary"):
            last = max(last, event.step)
      except tf.errors.DataLossError:  # a file cut short by a kill: its complete events count
        pass
  return last


class LogAfter:
  """A metric writer that drops scalars of steps up to `step` (already in the log)."""

  def __init__(self, writer, step: int):
    self.writer, self.step = writer, step

  def write_scalars(self, step: int, scalars) -> None:
    if step > self.step:
      self.writer.write_scalars(step, scalars)

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
