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
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state
from tqdm.auto import tqdm

from dsi_jax import checkpoints as checkpoints_lib
from dsi_jax import errors, evaluation, optim, partitioning, retrieval
from dsi_jax import results as results_lib
from dsi_jax import workdir as workdir_lib
from dsi_jax.batches import RetrievalData, example_inputs, index_batches, mixed_batches
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
  # they are while the rest trains, and their gradients are left out of the clipping norm
  # (`optim.make_optimizer`).
  freeze: tuple[str, ...] = ("encoder",)
  freeze_steps: int = 0
  # Learning-rate factors of parameter subtrees, `((path, factor), ...)`, e.g.
  # `(("encoder", 0.1),)` for a pretrained text encoder under fresh decoder layers.
  lr_multipliers: tuple[tuple[str, float], ...] = ()
  # Ranking loss of the fine-tuning phase (`train_dsi(teacher=...)`): listwise distillation
  # from a teacher's scores over each training query's target, `rank_hard_negatives` of the
  # teacher's best-scored other items and the batch's other targets, added with `rank_weight`
  # (0: off), teacher softmax at `rank_temperature`.
  rank_weight: float = 0.0
  rank_temperature: float = 0.05
  rank_hard_negatives: int = 15

  def __post_init__(self):
    """Bad values are one-line errors here, before anything is written."""
    positive = ("batch_size", "eval_batch_size", "index_eval_every", "finetune_eval_every")
    positive += ("ia_beams", "max_to_keep")
    counts = ("warmup_steps", "index_max_steps", "index_min_steps", "finetune_max_steps")
    counts += ("patience", "checkpoint_every", "freeze_steps", "seed", "rank_hard_negatives")
    for name in positive + counts:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise errors.UserError(f"TrainConfig.{name} must be an integer, got {value!r}")
      if value < (1 if name in positive else 0):
        bound = ">= 1" if name in positive else ">= 0"
        raise errors.UserError(f"TrainConfig.{name} must be {bound}, got {value}")
    numbers = ("learning_rate", "weight_decay", "retrieval_ratio", "index_target_accuracy")
    for name in (*numbers, "rank_weight", "rank_temperature"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise errors.UserError(f"TrainConfig.{name} must be a number >= 0, got {value!r}")
    if self.ranking not in ("exact", "beam", "auto"):
      raise errors.UserError(
        f"TrainConfig.ranking must be 'exact', 'beam' or 'auto', got {self.ranking!r}"
      )

  def make_mesh(self) -> jax.sharding.Mesh:
    return partitioning.make_mesh(self.mesh_data, self.mesh_fsdp, self.mesh_model)


class TrainState(train_state.TrainState):
  pass


def make_train_step(
  loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]],
  state_shardings,
  mesh: jax.sharding.Mesh,
):
  """One jitted update of a `TrainState`; the state keeps `state_shardings`, the batch is split
  on `batch`.

  `loss_fn(params, batch, dropout_rng) -> (loss, aux)` (e.g. `DSIModel.loss_fn`); the step
  returns `(state, aux)`, and its dropout key is `fold_in(rng, state.step)`. Freezing, rates
  and clipping are the optimizer's (`optim.make_optimizer`).
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def train_step(state: TrainState, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, aux), grads = grad_fn(state.params, batch, dropout_rng)
    return state.apply_gradients(grads=grads), aux

  return jax.jit(
    train_step,
    in_shardings=(state_shardings, partitioning.batch_sharding(mesh), replicated),
    out_shardings=(state_shardings, replicated),
  )


def evaluate(
  model: dsi.DSIModel,
  params,
  data: RetrievalData,
  *,
  config: TrainConfig,
  splits: Sequence[str] = ("val",),
  index: bool = True,
) -> dict[str, float]:
  """The trainer's evaluation (`evaluation.evaluate_splits`): query rankings by
  `config.ranking`, IA@1 / IA@5 by the constrained beam search with `config.ia_beams` beams."""
  retriever = retrieval.DSIRetriever(
    model, params, method=config.ranking, batch_size=config.eval_batch_size
  )
  return evaluation.evaluate_splits(
    retriever,
    data,
    config.eval_metrics,
    splits=splits,
    index_retriever=retriever.with_search("beam", config.ia_beams) if index else None,
  )


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
  loss_fn: Callable | None = None,
) -> PhaseResult:
  """A plain loop: step, log, evaluate every `eval_every`, keep the best params, checkpoint.

  `make_batch(i)` gives this host's rows of the phase's batch `i`. With `checkpoints`, the
  phase resumes from its latest checkpoint (a finished phase returns at once). `loss_fn`
  defaults to `model.loss_fn`.
  """
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  train_step = make_train_step(loss_fn or model.loss_fn, state_shardings, mesh)
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
    disable=not show_progress or progress.done or not partitioning.is_writer(),
    dynamic_ncols=True,
  )
  losses: list[jax.Array] = []  # step losses since the last fold into `progress`

  def fold_losses(losses):
    progress.loss_sum += float(np.sum(jax.device_get(losses)))
    progress.loss_count += len(losses)
    return []

  try:  # the bar is cleared however the loop ends, so an error starts its own line
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
  finally:
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
  model: dsi.DSIModel,
  input_shape,
  config: TrainConfig,
  rng,
  mesh: jax.sharding.Mesh,
  init_params: Any = None,
) -> TrainState:
  """The initial train state, created directly in its shardings on `mesh` (from
  `init_params` where given, else freshly initialised)."""
  tx = optim.make_optimizer(
    config.learning_rate,
    warmup_steps=config.warmup_steps,
    weight_decay=config.weight_decay,
    lr_multipliers=config.lr_multipliers,
    freeze=config.freeze,
    freeze_steps=config.freeze_steps,
  )

  def make_state(params):
    return TrainState.create(apply_fn=None, params=params, tx=tx)

  abstract = jax.eval_shape(lambda r: model.init(r, input_shape), rng)  # shape or examples
  if init_params is not None:
    given = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), init_params)
    if given != jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), abstract):
      raise ValueError("init_params do not fit the model's parameters")
    params = jax.device_put(init_params, partitioning.shardings(abstract, mesh))
  else:
    params = model.init(rng, input_shape, out_shardings=partitioning.shardings(abstract, mesh))
  state_shardings = partitioning.shardings(jax.eval_shape(make_state, params), mesh)
  return jax.jit(make_state, out_shardings=state_shardings)(params)


def train_dsi(
  model: dsi.DSIModel,
  data: RetrievalData,
  *,
  config: TrainConfig = TrainConfig(),
  workdir: str | None = None,
  finetune: bool = True,
  show_progress: bool = True,
  mesh: jax.sharding.Mesh | None = None,
  spec: Any = None,
  init_params: Any = None,
  embedding_rows: tuple[Any, Any] | None = None,
  teacher: np.ndarray | None = None,
) -> dict[str, Any]:
  """Runs indexing then (if `finetune`) retrieval fine-tuning; returns both phases' results.

  Returns a dict with "zero_shot" and "fine_tuned" entries, each holding test metrics,
  steps, seconds and the training history, and the params of each phase.

  Training runs on `mesh` (default: `config`'s mesh shape over all devices). With a
  `workdir`, each phase checkpoints into `workdir/checkpoints/{zero_shot,fine_tuned}`; running
  the same run again in the same workdir (same config, ids and model) resumes where the
  previous process stopped, a finished phase is not trained again, and a different run
  replaces the earlier one's checkpoints.

  spec: the model's `runs.ModelSpec`, written to `workdir/model.json` so that `runs.load_run`
  (and `dsi-jax search`) can rebuild the trained retriever from the folder alone.
  init_params: parameters to start from instead of a fresh initialisation (continual
    training, e.g. `dsi_jax.index.Index.add`). Without them, a model whose ids start from
    embeddings (`embedding_ids`) starts with each item's row from `data.index_inputs`, or
    from `embedding_rows = (inputs, item of each row)` (e.g. the training captions of each
    image, where only the text side starts aligned).
  teacher: `[training queries, items]` scores of a teacher (a dual encoder's cosines, BM25)
    for the ranking loss of the fine-tuning phase (`config.rank_weight`).
  """
  if finetune and "map@10" not in config.eval_metrics:
    raise ValueError(
      f"TrainConfig.eval_metrics {config.eval_metrics} lacks 'map@10', which selects the "
      "fine-tuned step and stops early"
    )
  if (config.rank_weight > 0) != (teacher is not None):
    raise ValueError("TrainConfig.rank_weight > 0 and a teacher's scores go together")
  mesh = mesh or config.make_mesh()
  partitioning.host_rows(config.batch_size, mesh)  # a clear error now, not after indexing
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state = create_state(model, example_inputs(data), config, init_rng, mesh, init_params)
  if init_params is None and getattr(model.network.decoder, "embedding_ids", False):
    # ids that start from embeddings: each item's row from its indexed input, or as given
    rows = embedding_rows or (data.index_inputs, None)
    start = model.ids_from_embeddings(jax.device_get(state.params), *rows)
    # AdamW's moments do not depend on the values: only the params change
    state = state.replace(
      params=jax.tree.map(lambda x, p: jax.device_put(x, p.sharding), start, state.params)
    )
  targets = model.docids.targets()
  writer = None
  phase_checkpoints: dict[str, checkpoints_lib.PhaseCheckpoints] = {}
  if workdir:
    from clu import metric_writers

    fingerprint = workdir_lib.run_fingerprint(model, state.params, config, finetune, data)
    if spec is not None:
      fingerprint["spec_sha256"] = spec.sha256()
    if teacher is not None:
      fingerprint["teacher_sha256"] = workdir_lib.arrays_sha256(teacher)
    resuming = workdir_lib.prepare(workdir, fingerprint)
    if resuming:
      log.info("Resuming the run in %s", workdir)
    run_id = checkpoints_lib.file_sha256(os.path.join(workdir, "run.json"))
    if partitioning.is_writer():
      model.docids.save(os.path.join(workdir, "docids.json"))
    if spec is not None:
      from dsi_jax import runs

      runs.save_spec(workdir, spec)
    logdir = os.path.join(workdir, "tensorboard")
    writer = metric_writers.create_default_writer(
      logdir, just_logging=not partitioning.is_writer(), asynchronous=False
    )
    if resuming:  # steps redone since the last checkpoint were logged before the restart
      writer = workdir_lib.LogAfter(writer, workdir_lib.last_logged_step(logdir))
    for name in ("zero_shot", "fine_tuned"):
      phase_checkpoints[name] = checkpoints_lib.PhaseCheckpoints(
        os.path.join(workdir, "checkpoints", name),
        every=config.checkpoint_every,
        max_to_keep=config.max_to_keep,
        run_id=run_id,
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
        make_batch=mixed_batches(
          data,
          targets,
          config,
          mesh,
          paired=model.contrastive_weight > 0,
          teacher=teacher,
          hard_negatives=config.rank_hard_negatives,
        ),
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
        loss_fn=functools.partial(
          model.loss_fn,
          rank_weight=config.rank_weight,
          rank_temperature=config.rank_temperature,
        ),
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
  "TrainConfig",
  "count_params",
  "evaluate",
  "restore_params",
  "train_dsi",
]
