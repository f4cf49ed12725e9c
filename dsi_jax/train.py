"""The DSI trainer: indexing, then retrieval fine-tuning.

Phase 1, *indexing*: every indexed item -> its own id, until the exact-match accuracy of
constrained decoding on the indexed items reaches `index_target_accuracy` (or a cap).
Phase 2, *retrieval*: query -> a relevant id, mixed with indexing examples (default 1:1) so
the index is not forgotten; validation MAP@10 picks the best step and stops early.
A model after phase 1 only is "zero-shot".

The functions here are plain Python with keyword arguments; gin binds them only at the
command line (`dsi_jax.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from dsi_jax import metrics as metrics_lib
from dsi_jax.models import dsi

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of both phases (defaults: the seed recipe, lr 5e-4, batch 32)."""

  batch_size: int = 32
  learning_rate: float = 5e-4
  warmup_steps: int = 100
  weight_decay: float = 1e-4
  # Phase 1: indexing.
  index_target_accuracy: float = 0.98
  index_max_steps: int = 1500
  index_min_steps: int = 0
  index_eval_every: int = 20
  # Phase 2: retrieval fine-tuning.
  finetune_max_steps: int = 800
  finetune_eval_every: int = 25
  patience: int = 8  # evaluations without a better validation MAP@10
  retrieval_ratio: float = 1.0  # retrieval examples per indexing example in a batch
  eval_batch_size: int = 64
  ranking: str = "auto"  # retrieval metrics: "exact" | "beam" | "auto" (exact up to 4096 ids)
  ia_beams: int = 10  # beams of the constrained search that IA@1 / IA@5 are measured with
  seed: int = 0


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


class TrainState(train_state.TrainState):
  pass


def epoch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
  """The rows of batch `step`: epochs are seeded permutations, so order depends on step only."""
  start = step * batch
  out = []
  while len(out) < batch:
    epoch, offset = divmod(start + len(out), n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out.extend(perm[offset : offset + batch - len(out)].tolist())
  return np.asarray(out)


def make_train_step(model: dsi.DSIModel):
  @jax.jit
  def train_step(state: TrainState, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    (_, aux), grads = grad_fn(state.params, batch, dropout_rng)
    return state.apply_gradients(grads=grads), aux

  return train_step


def rank_items(
  model: dsi.DSIModel,
  params,
  inputs: np.ndarray,
  k: int,
  config: TrainConfig,
  *,
  method: str | None = None,
  num_beams: int | None = None,
):
  """Ranked item indices `[num, k]` and scores, in batches of `config.eval_batch_size`."""
  items, scores = [], []
  for start in range(0, len(inputs), config.eval_batch_size):
    chunk = inputs[start : start + config.eval_batch_size]
    pad = config.eval_batch_size - len(chunk)  # fixed shapes: one compilation
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    it, sc = model.rank(
      params, jnp.asarray(chunk), k, method=method or config.ranking, num_beams=num_beams
    )
    items.append(it[: config.eval_batch_size - pad])
    scores.append(sc[: config.eval_batch_size - pad])
  return np.concatenate(items), np.concatenate(scores)


def evaluate(
  model: dsi.DSIModel,
  params,
  data: RetrievalData,
  *,
  config: TrainConfig,
  splits: Sequence[str] = ("val",),
  index: bool = True,
  k: int = 100,
) -> dict[str, float]:
  """IA@1 / IA@5 on the indexed items and MAP@10 / Recall@100 (and loss) on query splits.

  IA@k is measured with the constrained beam search (`config.ia_beams` beams); the query
  rankings with `config.ranking` (exact scoring of every id for small corpora, which is
  what beam search gives with beams >= number of ids).
  """
  keys = model.docids.keys
  out: dict[str, float] = {}
  if index:
    # IA@k as the model is used: constrained beam search.
    items, _ = rank_items(
      model, params, data.index_inputs, 5, config, method="beam", num_beams=config.ia_beams
    )
    ranked = [[keys[i] for i in row if i >= 0] for row in items]
    for kk in (1, 5):
      out[f"ia@{kk}"] = metrics_lib.indexing_accuracy(ranked, list(keys), kk)
  for split in splits:
    inputs = getattr(data, f"{split}_inputs")
    relevant = getattr(data, f"{split}_relevant")
    items, scores = rank_items(model, params, inputs, k, config)
    ranked = [[keys[i] for i in row if i >= 0] for row in items]
    rel = [{keys[i] for i in r} for r in relevant]
    names = ["map@10", "recall@100", "hits@1", "hits@10", "mrr@10"]
    for name, value in metrics_lib.compute_metrics(ranked, rel, names).items():
      out[f"{split}/{name}"] = value
    # Retrieval loss: -log of the probability mass on the relevant ids (within the top k).
    mass = [
      np.logaddexp.reduce([s for i, s in zip(row, sc) if i in set(r.tolist())] or [-np.inf])
      for row, sc, r in zip(items, scores, relevant)
    ]
    finite = [m for m in mass if np.isfinite(m)]
    out[f"{split}/loss"] = float(-np.mean(finite)) if finite else float("nan")
  return out


@dataclasses.dataclass
class PhaseResult:
  state: TrainState
  history: list[dict[str, float]]  # one row per step logged / evaluated
  steps: int
  seconds: float
  best_eval: dict[str, float]


def run_phase(
  model: dsi.DSIModel,
  state: TrainState,
  *,
  phase: str,
  make_batch: Callable[[int], dict],
  num_steps: int,
  eval_every: int,
  evaluate_fn: Callable[[Any], dict[str, float]],
  stop_fn: Callable[[list[dict[str, float]]], bool],
  select_key: str | None,
  patience: int,
  min_steps: int = 0,
  rng: jax.Array,
  writer=None,
  show_progress: bool = True,
) -> PhaseResult:
  """A plain loop: step, log, evaluate every `eval_every`, keep the best params."""
  train_step = make_train_step(model)
  history: list[dict[str, float]] = []
  best_value, best_params, best_eval, since_best = -np.inf, state.params, {}, 0
  start_step = int(state.step)
  t0 = time.time()
  bar = tqdm(
    total=num_steps, desc=phase, leave=False, disable=not show_progress, dynamic_ncols=True
  )
  losses = []
  for i in range(num_steps):
    batch = make_batch(i)
    state, aux = train_step(state, {k: jnp.asarray(v) for k, v in batch.items()}, rng)
    losses.append(aux["loss"])
    bar.update(1)
    last = i + 1 == num_steps
    if (i + 1) % eval_every == 0 or last:
      train_loss = float(np.mean(jax.device_get(losses)))
      losses = []
      ev = evaluate_fn(state.params)
      row = {"phase_step": i + 1, "step": int(state.step), "train/loss": train_loss, **ev}
      history.append(row)
      bar.set_postfix(
        {k: round(v, 3) for k, v in row.items() if k in ("train/loss", "ia@1", "val/map@10")}
      )
      if writer is not None:
        writer.write_scalars(
          int(state.step), {f"{phase}/{k}": v for k, v in row.items() if k != "step"}
        )
      if select_key is not None:
        if ev[select_key] > best_value:
          best_value, best_params, best_eval, since_best = ev[select_key], state.params, ev, 0
        else:
          since_best += 1
        if since_best >= patience and i + 1 >= min_steps:
          break
      if i + 1 >= min_steps and stop_fn(history):
        break
  bar.close()
  if select_key is not None:
    state = state.replace(params=best_params)
  else:
    best_eval = history[-1] if history else {}
  return PhaseResult(state, history, int(state.step) - start_step, time.time() - t0, best_eval)


def create_state(model: dsi.DSIModel, input_shape, config: TrainConfig, rng) -> TrainState:
  params = model.init(rng, input_shape)
  tx = dsi.make_optimizer(
    config.learning_rate, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay
  )
  return TrainState.create(apply_fn=None, params=params, tx=tx)


def index_batches(data: RetrievalData, targets: np.ndarray, config: TrainConfig):
  n = len(data.index_inputs)

  def make_batch(step: int) -> dict:
    rows = epoch_indices(n, config.batch_size, step, config.seed)
    return {"inputs": data.index_inputs[rows], "targets": targets[rows]}

  return make_batch


def mixed_batches(data: RetrievalData, targets: np.ndarray, config: TrainConfig):
  """Batches of query -> random relevant id, mixed with indexing examples."""
  n_ret = int(round(config.batch_size * config.retrieval_ratio / (1.0 + config.retrieval_ratio)))
  n_ret = min(max(n_ret, 1), config.batch_size)
  n_idx = config.batch_size - n_ret
  nq, n = len(data.train_inputs), len(data.index_inputs)

  def make_batch(step: int) -> dict:
    q = epoch_indices(nq, n_ret, step, config.seed + 1)
    rng = np.random.default_rng([config.seed, 7, step])
    # Spread the targets over all relevant ids: a fresh relevant id each time.
    rel = np.array([data.train_relevant[j][rng.integers(len(data.train_relevant[j]))] for j in q])
    inputs, tgts = [data.train_inputs[q]], [targets[rel]]
    if n_idx:
      rows = epoch_indices(n, n_idx, step, config.seed + 2)
      inputs.append(data.index_inputs[rows])
      tgts.append(targets[rows])
    return {"inputs": np.concatenate(inputs), "targets": np.concatenate(tgts)}

  return make_batch


def result_rows(
  result: dict[str, Any], metrics: Sequence[str], **common: Any
) -> list[dict[str, Any]]:
  """One results.json row per trained phase ("zero_shot", "fine_tuned") of `train_dsi`.

  `metrics` are test metric names ("map@10", "hits@1", ...); IA@1 and IA@5 are always
  included; `common` fields (model, dataset, ids, ...) go into every row.
  """
  rows = []
  for setting in ("zero_shot", "fine_tuned"):
    if setting not in result:
      continue
    test = result[setting]["test"]
    rows.append(
      {
        **common,
        "setting": setting,
        "ia@1": test["ia@1"],
        "ia@5": test["ia@5"],
        **{m: test[f"test/{m}"] for m in metrics},
        "steps": result[setting]["steps"],
        "seconds": round(result[setting]["seconds"], 1),
      }
    )
  return rows


def save_checkpoint(directory: str, state: TrainState) -> None:
  """Saves `state` with an orbax CheckpointManager (atomic: temp dir, then rename)."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(
    os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  ) as manager:
    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def restore_params(directory: str, template_params) -> Any:
  """Params of the latest checkpoint under `directory`, shaped like `template_params`."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint found")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  return jax.tree_util.tree_map(
    lambda t, r: jnp.asarray(r, t.dtype), template_params, restored["params"]
  )


def train_dsi(
  model: dsi.DSIModel,
  data: RetrievalData,
  *,
  config: TrainConfig = TrainConfig(),
  workdir: str | None = None,
  finetune: bool = True,
  show_progress: bool = True,
) -> dict[str, Any]:
  """Runs indexing then (if `finetune`) retrieval fine-tuning; returns both phases' results.

  Returns a dict with "zero_shot" and "fine_tuned" entries, each holding test metrics,
  steps, seconds and the training history, and the params of each phase.
  """
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state = create_state(model, data.index_inputs.shape, config, init_rng)
  targets = model.docids.targets()
  writer = None
  if workdir:
    from clu import metric_writers

    os.makedirs(workdir, exist_ok=True)
    # A fresh run replaces an earlier run's checkpoints and curves in the same workdir, so
    # "latest checkpoint" and the TensorBoard curves always belong to this run.
    for stale in ("checkpoints", "tensorboard"):
      if os.path.isdir(os.path.join(workdir, stale)):
        log.info("Replacing %s from an earlier run in %s", stale, workdir)
        shutil.rmtree(os.path.join(workdir, stale))
    model.docids.save(os.path.join(workdir, "docids.json"))
    writer = metric_writers.create_default_writer(
      os.path.join(workdir, "tensorboard"), asynchronous=False
    )

  def eval_index_phase(params):
    return evaluate(model, params, data, config=config, splits=("val",), index=True)

  def reached_target(history):
    return history[-1]["ia@1"] >= config.index_target_accuracy

  index = run_phase(
    model,
    state,
    phase="indexing",
    make_batch=index_batches(data, targets, config),
    num_steps=config.index_max_steps,
    eval_every=config.index_eval_every,
    evaluate_fn=eval_index_phase,
    stop_fn=reached_target,
    select_key=None,
    patience=0,
    min_steps=config.index_min_steps,
    rng=dropout_rng,
    writer=writer,
    show_progress=show_progress,
  )
  if index.history and index.history[-1]["ia@1"] < config.index_target_accuracy:
    log.warning(
      "indexing stopped at its cap of %d steps with IA@1 %.3f < %.2f",
      config.index_max_steps,
      index.history[-1]["ia@1"],
      config.index_target_accuracy,
    )
  results: dict[str, Any] = {}
  test = evaluate(model, index.state.params, data, config=config, splits=("test",), index=True)
  results["zero_shot"] = _phase_summary(index, test)
  if workdir:
    save_checkpoint(os.path.join(workdir, "checkpoints", "zero_shot"), index.state)
  if finetune:
    ft = run_phase(
      model,
      index.state,
      phase="retrieval",
      make_batch=mixed_batches(data, targets, config),
      num_steps=config.finetune_max_steps,
      eval_every=config.finetune_eval_every,
      evaluate_fn=lambda p: evaluate(model, p, data, config=config, splits=("val",), index=True),
      stop_fn=lambda h: False,
      select_key="val/map@10",
      patience=config.patience,
      rng=jax.random.fold_in(dropout_rng, 1),
      writer=writer,
      show_progress=show_progress,
    )
    test = evaluate(model, ft.state.params, data, config=config, splits=("test",), index=True)
    results["fine_tuned"] = _phase_summary(ft, test)
    if workdir:
      save_checkpoint(os.path.join(workdir, "checkpoints", "fine_tuned"), ft.state)
    results["fine_tuned_params"] = ft.state.params
  results["zero_shot_params"] = index.state.params
  if writer is not None:
    writer.flush()
    writer.close()
  if workdir:
    with open(os.path.join(workdir, "history.json"), "w") as f:
      json.dump(
        {k: v["history"] for k, v in results.items() if isinstance(v, dict) and "history" in v}, f
      )
  return results


def _phase_summary(phase: PhaseResult, test: dict[str, float]) -> dict[str, Any]:
  return {
    "test": test,
    "steps": phase.steps,
    "seconds": phase.seconds,
    "history": phase.history,
    "best_eval": phase.best_eval,
  }


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


__all__ = [
  "RetrievalData",
  "TrainConfig",
  "count_params",
  "evaluate",
  "optax",
  "rank_items",
  "restore_params",
  "save_checkpoint",
  "train_dsi",
]
