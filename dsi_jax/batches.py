"""What the trainers read: the retrieval data arrays and the batches drawn from them.

Every batch is a function of its step alone (epochs are seeded permutations), so a run that
resumes from a checkpoint, or runs on another mesh, sees the same batches. A host builds only
its own rows of a global batch (`partitioning.host_rows`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Protocol

import numpy as np

from dsi_jax import partitioning


class BatchConfig(Protocol):
  """What batching reads of a trainer's config (`train.TrainConfig` has these fields)."""

  batch_size: int
  seed: int
  retrieval_ratio: float


@dataclasses.dataclass
class RetrievalData:
  """What training and evaluation read (arrays; issue-4's SeqIO tasks produce the same).

  index_inputs: `[num_ids, ...]` the indexed items, row i has id `docids.keys[i]`.
  *_inputs: `[num_queries, ...]` query items; *_relevant: per query, relevant item indices.
  """

  index_inputs: np.ndarray
  train_inputs: np.ndarray
  train_relevant: list[np.ndarray]
  val_inputs: np.ndarray
  val_relevant: list[np.ndarray]
  test_inputs: np.ndarray
  test_relevant: list[np.ndarray]


_ENCODED: dict[str, np.ndarray] = {}  # input arrays -> a frozen tower's outputs


def encode_data(
  data: RetrievalData,
  encode: Callable[..., np.ndarray],
  *,
  encoder: str,
  show_progress: bool = False,
) -> RetrievalData:
  """`data` with every input array replaced by a frozen tower's outputs, `encode(array,
  show_progress=...)`, computed once per (`encoder`, array) in this process (the id schemes
  and seeds of an experiment share the same items). `encoder` names the tower and its
  settings, e.g. "all-MiniLM-L6-v2" or the JSON of a DINOv2 spec."""
  out = dataclasses.replace(data)
  for field in ("index_inputs", "train_inputs", "val_inputs", "test_inputs"):
    inputs = np.asarray(getattr(data, field))
    digest = hashlib.sha256(encoder.encode() + str((inputs.shape, inputs.dtype)).encode())
    digest.update(inputs.tobytes())
    key = digest.hexdigest()
    if key not in _ENCODED:
      if len(_ENCODED) >= 8:
        _ENCODED.clear()
      _ENCODED[key] = encode(inputs, show_progress=show_progress)
    setattr(out, field, _ENCODED[key])
  return out


def epoch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
  """The rows of batch `step`: epochs are seeded permutations, so order depends on step only."""
  start = step * batch
  out = []
  while len(out) < batch:
    epoch, offset = divmod(start + len(out), n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out.extend(perm[offset : offset + batch - len(out)].tolist())
  return np.asarray(out)


def example_inputs(data: RetrievalData):
  """What `DSIModel.init` needs to see: the inputs' shape, or one row of each kind of input
  where queries and items differ (captions and images)."""
  if same_kind(data):
    return data.index_inputs.shape
  return (data.train_inputs[:1], data.index_inputs[:1])


def same_kind(data: RetrievalData) -> bool:
  a, b = data.index_inputs, data.train_inputs
  return a.dtype == b.dtype and a.shape[1:] == b.shape[1:]


def index_batches(data: RetrievalData, targets: np.ndarray, config: BatchConfig, mesh):
  """Batch `step` of indexing examples (this host's rows of it)."""
  n = len(data.index_inputs)
  rows = partitioning.host_rows(config.batch_size, mesh)

  def make_batch(step: int) -> dict:
    idx = epoch_indices(n, config.batch_size, step, config.seed)[rows]
    return {"inputs": data.index_inputs[idx], "targets": targets[idx]}

  return make_batch


def ranking_candidates(
  data: RetrievalData,
  queries: np.ndarray,
  positives: np.ndarray,
  teacher: np.ndarray,
  hard_negatives: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Each training query's candidates for the ranking loss, and the teacher's scores of them.

  Row i: the query's target `positives[i]`, then the teacher's `hard_negatives` best-scored
  items that are not relevant to it, then the other queries' targets of the batch (in-batch
  negatives) that are neither relevant nor already listed; -1 pads. `teacher` is
  `[training queries, items]`.
  """
  n, width = len(queries), 1 + hard_negatives + len(queries) - 1
  candidates = np.full((n, width), -1, np.int64)
  for i, (q, pos) in enumerate(zip(queries, positives)):
    relevant = set(data.train_relevant[q].tolist())
    row = teacher[q]
    take = min(hard_negatives + len(relevant), len(row))
    best = np.argpartition(-row, take - 1)[:take] if take else np.zeros(0, int)
    best = best[np.argsort(-row[best], kind="stable")]
    hard = [int(j) for j in best if int(j) not in relevant][:hard_negatives]
    listed = {int(pos), *hard}
    in_batch = []
    for j in positives:
      j = int(j)
      if j not in relevant and j not in listed:
        in_batch.append(j)
        listed.add(j)
    chosen = [int(pos), *hard, *in_batch]
    candidates[i, : len(chosen)] = chosen
  scores = np.take_along_axis(teacher[queries], np.maximum(candidates, 0), axis=1)
  return candidates, np.where(candidates >= 0, scores, 0.0).astype(np.float32)


def mixed_batches(
  data: RetrievalData,
  targets: np.ndarray,
  config: BatchConfig,
  mesh,
  *,
  paired: bool = False,
  teacher: np.ndarray | None = None,
  hard_negatives: int = 0,
):
  """Batches of query -> random relevant id, mixed with indexing examples (this host's rows).

  Where queries and items are of different kinds (captions, images), `inputs` and `targets`
  are the tuples `(queries, items)`, each split over the hosts on its own. With `paired`, the
  indexing examples are the queries' own relevant items, row for row (for a contrastive loss
  between the towers); the rest of the item rows, if any, are drawn as usual. (`paired` applies
  to batches of two kinds only.)

  With a `teacher` (`[training queries, items]` scores), batches also hold `candidates` and
  `teacher` for the ranking loss (`ranking_candidates`; indexing rows have none). Queries and
  items must then be of one kind.
  """
  n_ret = int(round(config.batch_size * config.retrieval_ratio / (1.0 + config.retrieval_ratio)))
  n_ret = min(max(n_ret, 1), config.batch_size)
  n_idx = config.batch_size - n_ret
  nq, n = len(data.train_inputs), len(data.index_inputs)
  mixed = same_kind(data) or n_idx == 0
  if teacher is not None:
    if not same_kind(data):
      raise ValueError("the ranking loss needs queries and items of one kind (one input batch)")
    if teacher.shape != (nq, n):
      raise ValueError(
        f"teacher scores are {teacher.shape}, not [training queries, items] = {(nq, n)}"
      )
  if mixed:
    rows = partitioning.host_rows(config.batch_size, mesh)
  else:
    q_rows, i_rows = partitioning.host_rows(n_ret, mesh), partitioning.host_rows(n_idx, mesh)

  def make_batch(step: int) -> dict:
    # The global batch is [retrieval examples, indexing examples]; a host reads its rows only.
    q = epoch_indices(nq, n_ret, step, config.seed + 1)
    rng = np.random.default_rng([config.seed, 7, step])
    # Spread the targets over all relevant ids: a fresh relevant id each time.
    rel = np.array([data.train_relevant[j][rng.integers(len(data.train_relevant[j]))] for j in q])
    idx = epoch_indices(n, n_idx, step, config.seed + 2) if n_idx else np.zeros(0, int)
    if paired and not mixed:
      idx[: min(n_ret, n_idx)] = rel[: min(n_ret, n_idx)]
    if not mixed:
      return {
        "inputs": (data.train_inputs[q[q_rows]], data.index_inputs[idx[i_rows]]),
        "targets": (targets[rel[q_rows]], targets[idx[i_rows]]),
      }
    is_query = (np.arange(config.batch_size) < n_ret)[rows]
    row, tgt = np.concatenate([q, idx])[rows], np.concatenate([rel, idx])[rows]
    inputs = np.concatenate([data.train_inputs[row[is_query]], data.index_inputs[row[~is_query]]])
    batch = {"inputs": inputs, "targets": targets[tgt]}
    if teacher is not None:
      cands, scores = ranking_candidates(data, q, rel, teacher, hard_negatives)
      pad = np.full((n_idx, cands.shape[1]), -1, np.int64)
      batch["candidates"] = np.concatenate([cands, pad])[rows].astype(np.int32)
      batch["teacher"] = np.concatenate([scores, np.zeros(pad.shape, np.float32)])[rows]
    return batch

  return make_batch
