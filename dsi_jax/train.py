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
import hashlib
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

from dsi_jax import checkpoints as checkpoints_lib
from dsi_jax import metrics as metrics_lib
from dsi_jax import partitioning
from dsi_jax import results as results_lib
from dsi_jax.checkpoints import restore_params
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
  # Query metrics measured on the validation and test splits (the ranking goes to the largest k).
  eval_metrics: tuple[str, ...] = ("map@10", "recall@100", "hits@1", "hits@10", "mrr@10")
  ia_beams: int = 10  # beams of the constrained search that IA@1 / IA@5 are measured with
  seed: int = 0
  # Device mesh (data, fsdp, model); one of them may be -1 ("all the remaining devices").
  mesh_data: int = -1
  mesh_fsdp: int = 1
  mesh_model: int = 1
  # Checkpoints: every `checkpoint_every` steps of a phase (0: only when a phase ends), keeping
  # the latest `max_to_keep`. A rerun of the same run in the same workdir resumes from them.
  checkpoint_every: int = 0
  max_to_keep: int = 2
  # Frozen for the first `freeze_steps` steps of training: parameter subtrees by path (e.g.
  # "encoder", or CLIP-DSI's "encoder/text_tower"); their params and optimizer state stay as
  # they are while the rest trains.
  freeze: tuple[str, ...] = ("encoder",)
  freeze_steps: int = 0
  # Learning-rate factors of parameter subtrees, `((path, factor), ...)`, e.g.
  # `(("encoder", 0.1),)` for a pretrained text encoder under fresh decoder layers.
  lr_multipliers: tuple[tuple[str, float], ...] = ()

  def make_mesh(self) -> jax.sharding.Mesh:
    return partitioning.make_mesh(self.mesh_data, self.mesh_fsdp, self.mesh_model)


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


def make_train_step(
  model: dsi.DSIModel,
  state_shardings,
  mesh: jax.sharding.Mesh,
  *,
  freeze: Sequence[str] = (),
  freeze_steps: int = 0,
):
  """One jitted update; the state keeps `state_shardings`, the batch is split on `batch`.

  While `state.step < freeze_steps`, parameters under the `freeze` paths (and their optimizer
  state) keep their values.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  is_frozen = dsi.path_matcher(freeze)

  def keep_frozen(new, old):
    frozen = old.step < freeze_steps

    def pick(path, n, o):
      name = partitioning.path_string(path)
      if is_frozen(name) is not None:
        return jnp.where(frozen, o, n)
      return n

    params = jax.tree_util.tree_map_with_path(pick, new.params, old.params)
    opt_state = jax.tree_util.tree_map_with_path(pick, new.opt_state, old.opt_state)
    return new.replace(params=params, opt_state=opt_state)

  def train_step(state: TrainState, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    (_, aux), grads = grad_fn(state.params, batch, dropout_rng)
    new = state.apply_gradients(grads=grads)
    if freeze and freeze_steps > 0:
      new = keep_frozen(new, state)
    return new, aux

  return jax.jit(
    train_step,
    in_shardings=(state_shardings, partitioning.batch_sharding(mesh), replicated),
    out_shardings=(state_shardings, replicated),
  )


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
) -> dict[str, float]:
  """IA@1 / IA@5 on the indexed items and `config.eval_metrics` (and a loss) on query splits.

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
  names = list(config.eval_metrics)
  k = max(int(name.split("@")[1]) for name in names)
  for split in splits:
    inputs = getattr(data, f"{split}_inputs")
    relevant = getattr(data, f"{split}_relevant")
    items, scores = rank_items(model, params, inputs, k, config)
    ranked = [[keys[i] for i in row if i >= 0] for row in items]
    rel = [{keys[i] for i in r} for r in relevant]
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
  mesh: jax.sharding.Mesh,
  checkpoints: checkpoints_lib.PhaseCheckpoints | None = None,
  writer=None,
  show_progress: bool = True,
  freeze: Sequence[str] = (),
  freeze_steps: int = 0,
) -> PhaseResult:
  """A plain loop: step, log, evaluate every `eval_every`, keep the best params, checkpoint.

  `make_batch(i)` gives this host's rows of the phase's batch `i`. With `checkpoints`, the
  phase resumes from its latest checkpoint (a finished phase returns at once).
  """
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  train_step = make_train_step(
    model, state_shardings, mesh, freeze=freeze, freeze_steps=freeze_steps
  )
  progress = checkpoints_lib.Progress(rng=np.asarray(jax.random.key_data(rng)).tolist())
  best_params = None
  if checkpoints is not None:
    restored = checkpoints.restore(state, state.params if select_key else None)
    if restored is not None:
      state, best_params, progress = restored
      rng = jnp.asarray(progress.rng, jnp.uint32)
  history = progress.history
  t0 = time.time() - progress.seconds
  bar = tqdm(
    total=num_steps,
    initial=progress.phase_step,
    desc=phase,
    leave=False,
    disable=not show_progress or progress.done,
    dynamic_ncols=True,
  )
  losses: list[jax.Array] = []  # step losses since the last fold into `progress`

  def fold_losses(losses):
    progress.loss_sum += float(np.sum(jax.device_get(losses)))
    progress.loss_count += len(losses)
    return []

  for i in range(num_steps if progress.done else progress.phase_step, num_steps):
    batch = partitioning.global_batch(make_batch(i), mesh)
    with partitioning.axis_rules(mesh):
      state, aux = train_step(state, batch, rng)
    losses.append(aux["loss"])
    bar.update(1)
    progress.phase_step = n = i + 1
    stop = False
    if n % eval_every == 0 or n == num_steps:
      losses = fold_losses(losses)
      train_loss = progress.loss_sum / progress.loss_count
      progress.loss_sum, progress.loss_count = 0.0, 0
      ev = evaluate_fn(state.params)
      row = {"phase_step": n, "step": int(state.step), "train/loss": train_loss, **ev}
      history.append(row)
      bar.set_postfix(
        {k: round(v, 3) for k, v in row.items() if k in ("train/loss", "ia@1", "val/map@10")}
      )
      if writer is not None:
        writer.write_scalars(
          int(state.step), {f"{phase}/{k}": v for k, v in row.items() if k != "step"}
        )
      if select_key is not None:
        if progress.best_value is None or ev[select_key] > progress.best_value:
          best_params, progress.best_value, progress.best_eval = state.params, ev[select_key], ev
          progress.since_best = 0
        else:
          progress.since_best += 1
        stop = progress.since_best >= patience and n >= min_steps
      stop = stop or (n >= min_steps and stop_fn(history))
    if stop or n == num_steps:
      break
    if checkpoints is not None and checkpoints.due(n):
      losses = fold_losses(losses)
      progress.seconds = time.time() - t0
      checkpoints.save(state, best_params, progress)
  bar.close()
  if not progress.done:
    progress.done, progress.seconds = True, time.time() - t0
    if select_key is not None and best_params is not None:
      state = state.replace(params=best_params)
    if checkpoints is not None:
      checkpoints.save(state, best_params, progress)
  best_eval = progress.best_eval if select_key is not None else (history[-1] if history else {})
  return PhaseResult(state, history, progress.phase_step, progress.seconds, best_eval)


def create_state(
  model: dsi.DSIModel, input_shape, config: TrainConfig, rng, mesh: jax.sharding.Mesh
) -> TrainState:
  """The initial train state, created directly in its shardings on `mesh`."""
  tx = dsi.make_optimizer(
    config.learning_rate,
    warmup_steps=config.warmup_steps,
    weight_decay=config.weight_decay,
    lr_multipliers=config.lr_multipliers,
  )

  def make_state(params):
    return TrainState.create(apply_fn=None, params=params, tx=tx)

  abstract = jax.eval_shape(lambda r: model.init(r, input_shape), rng)  # shape or examples
  params = model.init(rng, input_shape, out_shardings=partitioning.shardings(abstract, mesh))
  state_shardings = partitioning.shardings(jax.eval_shape(make_state, params), mesh)
  return jax.jit(make_state, out_shardings=state_shardings)(params)


def example_inputs(data: RetrievalData):
  """What `DSIModel.init` needs to see: the inputs' shape, or one row of each kind of input
  where queries and items differ (captions and images)."""
  if same_kind(data):
    return data.index_inputs.shape
  return (data.train_inputs[:1], data.index_inputs[:1])


def same_kind(data: RetrievalData) -> bool:
  a, b = data.index_inputs, data.train_inputs
  return a.dtype == b.dtype and a.shape[1:] == b.shape[1:]


def index_batches(data: RetrievalData, targets: np.ndarray, config: TrainConfig, mesh):
  """Batch `step` of indexing examples (this host's rows of it)."""
  n = len(data.index_inputs)
  rows = partitioning.host_rows(config.batch_size, mesh)

  def make_batch(step: int) -> dict:
    idx = epoch_indices(n, config.batch_size, step, config.seed)[rows]
    return {"inputs": data.index_inputs[idx], "targets": targets[idx]}

  return make_batch


def mixed_batches(
  data: RetrievalData, targets: np.ndarray, config: TrainConfig, mesh, *, paired: bool = False
):
  """Batches of query -> random relevant id, mixed with indexing examples (this host's rows).

  Where queries and items are of different kinds (captions, images), `inputs` and `targets`
  are the tuples `(queries, items)`, each split over the hosts on its own. With `paired`, the
  indexing examples are the queries' own relevant items, row for row (for a contrastive loss
  between the towers); the rest of the item rows, if any, are drawn as usual. (`paired` applies
  to batches of two kinds only.)
  """
  n_ret = int(round(config.batch_size * config.retrieval_ratio / (1.0 + config.retrieval_ratio)))
  n_ret = min(max(n_ret, 1), config.batch_size)
  n_idx = config.batch_size - n_ret
  nq, n = len(data.train_inputs), len(data.index_inputs)
  mixed = same_kind(data) or n_idx == 0
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
    return {"inputs": inputs, "targets": targets[tgt]}

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


def run_fingerprint(model: dsi.DSIModel, params, config: TrainConfig, finetune: bool) -> dict:
  """What makes two runs the same run (so a rerun resumes rather than starts over): the
  config, the ids and the shapes of the model's `params`.

  The mesh is left out on purpose: a run preempted on one mesh may resume on another.
  """
  settings = dataclasses.asdict(config)
  for name in ("mesh_data", "mesh_fsdp", "mesh_model", "checkpoint_every", "max_to_keep"):
    settings.pop(name)
  ids = json.dumps(model.docids.to_json(), sort_keys=True).encode()
  return {
    "train_config": settings,
    "finetune": finetune,
    "docids_sha256": hashlib.sha256(ids).hexdigest(),
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


def _prepare_workdir(workdir: str, fingerprint: dict) -> bool:
  """Keeps an earlier run's checkpoints if it was this same run (returns True: resume);
  otherwise removes its checkpoints and curves so that they always belong to this run."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "run.json")
  same = False
  if os.path.exists(path):
    with open(path) as f:
      same = json.load(f) == json.loads(json.dumps(fingerprint))
  if not same:
    for stale in ("checkpoints", "tensorboard"):
      if os.path.isdir(os.path.join(workdir, stale)):
        log.info("Replacing %s from a different earlier run in %s", stale, workdir)
        shutil.rmtree(os.path.join(workdir, stale))
    results_lib.write_json(fingerprint, path)
  return same


def train_dsi(
  model: dsi.DSIModel,
  data: RetrievalData,
  *,
  config: TrainConfig = TrainConfig(),
  workdir: str | None = None,
  finetune: bool = True,
  show_progress: bool = True,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """Runs indexing then (if `finetune`) retrieval fine-tuning; returns both phases' results.

  Returns a dict with "zero_shot" and "fine_tuned" entries, each holding test metrics,
  steps, seconds and the training history, and the params of each phase.

  Training runs on `mesh` (default: `config`'s mesh shape over all devices). With a
  `workdir`, each phase checkpoints into `workdir/checkpoints/{zero_shot,fine_tuned}`; running
  the same run again in the same workdir (same config, ids and model) resumes where the
  previous process stopped, a finished phase is not trained again, and a different run
  replaces the earlier one's checkpoints.
  """
  if finetune and "map@10" not in config.eval_metrics:
    raise ValueError(
      f"TrainConfig.eval_metrics {config.eval_metrics} lacks 'map@10', which selects the "
      "fine-tuned step and stops early"
    )
  mesh = mesh or config.make_mesh()
  partitioning.host_rows(config.batch_size, mesh)  # a clear error now, not after indexing
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state = create_state(model, example_inputs(data), config, init_rng, mesh)
  targets = model.docids.targets()
  writer = None
  phase_checkpoints: dict[str, checkpoints_lib.PhaseCheckpoints] = {}
  if workdir:
    from clu import metric_writers

    fingerprint = run_fingerprint(model, state.params, config, finetune)
    if _prepare_workdir(workdir, fingerprint):
      log.info("Resuming the run in %s", workdir)
    model.docids.save(os.path.join(workdir, "docids.json"))
    writer = metric_writers.create_default_writer(
      os.path.join(workdir, "tensorboard"), asynchronous=False
    )
    for name in ("zero_shot", "fine_tuned"):
      phase_checkpoints[name] = checkpoints_lib.PhaseCheckpoints(
        os.path.join(workdir, "checkpoints", name),
        every=config.checkpoint_every,
        max_to_keep=config.max_to_keep,
      )

  def eval_index_phase(params):
    return evaluate(model, params, data, config=config, splits=("val",), index=True)

  def reached_target(history):
    return history[-1]["ia@1"] >= config.index_target_accuracy

  try:
    index = run_phase(
      model,
      state,
      phase="indexing",
      make_batch=index_batches(data, targets, config, mesh),
      num_steps=config.index_max_steps,
      eval_every=config.index_eval_every,
      evaluate_fn=eval_index_phase,
      stop_fn=reached_target,
      select_key=None,
      patience=0,
      min_steps=config.index_min_steps,
      rng=dropout_rng,
      mesh=mesh,
      checkpoints=phase_checkpoints.get("zero_shot"),
      writer=writer,
      show_progress=show_progress,
      freeze=config.freeze,
      freeze_steps=config.freeze_steps,
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
    if finetune:
      ft = run_phase(
        model,
        index.state,
        phase="retrieval",
        make_batch=mixed_batches(data, targets, config, mesh, paired=model.contrastive_weight > 0),
        num_steps=config.finetune_max_steps,
        eval_every=config.finetune_eval_every,
        evaluate_fn=lambda p: evaluate(model, p, data, config=config, splits=("val",)),
        stop_fn=lambda h: False,
        select_key="val/map@10",
        patience=config.patience,
        rng=jax.random.fold_in(dropout_rng, 1),
        mesh=mesh,
        checkpoints=phase_checkpoints.get("fine_tuned"),
        writer=writer,
        show_progress=show_progress,
        freeze=config.freeze,
        freeze_steps=config.freeze_steps,
      )
      test = evaluate(model, ft.state.params, data, config=config, splits=("test",), index=True)
      results["fine_tuned"] = _phase_summary(ft, test)
      results["fine_tuned_params"] = ft.state.params
    results["zero_shot_params"] = index.state.params
  finally:
    for manager in phase_checkpoints.values():
      manager.close()
    if writer is not None:
      writer.flush()
      writer.close()
  if workdir:
    results_lib.write_json(
      {k: v["history"] for k, v in results.items() if isinstance(v, dict) and "history" in v},
      os.path.join(workdir, "history.json"),
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
  "train_dsi",
]
