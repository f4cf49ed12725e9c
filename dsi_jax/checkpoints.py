"""Preemption-safe checkpoints of a training phase, through an orbax `CheckpointManager`.

One manager per phase folder (`checkpoints/zero_shot`, `checkpoints/fine_tuned`). Each step
holds three items:
  state     the train state (params, optimizer state, step), sharded as the mesh says;
  best      the params with the best validation score so far (phases that select one);
  progress  JSON: how far the phase got (`phase_step`, which also fixes the data order, since
            batches are a function of the step), the dropout RNG key, the evaluation history,
            the early-stopping counters, and `done` once the phase has finished.
Orbax writes a step into a temporary folder and renames it when complete, so a process killed
mid-save leaves no step behind that a restart would restore (only a temporary folder, which
the next manager deletes). Restoring takes the *current* mesh's shardings from a template, so a
checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsi_jax import errors

log = logging.getLogger(__name__)

ITEMS = ("state", "best", "progress")


class CheckpointWriteError(errors.UserError):
  """A checkpoint could not be written: the run stops, the last good step stays."""


@dataclasses.dataclass
class Progress:
  """Where a phase stands; saved as JSON beside the state."""

  phase_step: int = 0  # steps done in this phase = the next batch's index
  rng: list[int] = dataclasses.field(default_factory=list)  # key data of the dropout RNG
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)
  best_value: float | None = None  # None: nothing selected yet
  best_eval: dict[str, float] = dataclasses.field(default_factory=dict)
  since_best: int = 0
  loss_sum: float = 0.0  # training loss since the last evaluation (its mean is logged there)
  loss_count: int = 0
  seconds: float = 0.0  # training time so far
  done: bool = False


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`'s arrays: where restored arrays should land."""

  def one(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  return jax.tree_util.tree_map(one, tree)


class PhaseCheckpoints:
  """Saves and restores one phase's (state, best params, progress) every `every` steps."""

  def __init__(self, directory: str, *, every: int = 0, max_to_keep: int = 2):
    self.directory = errors.writable_folder(os.path.abspath(directory), "checkpoint folder")
    self.every = every
    self.failed = False
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
      ),
    )

  def due(self, phase_step: int) -> bool:
    return self.every > 0 and phase_step % self.every == 0

  def save(self, state, best_params, progress: Progress) -> None:
    """Writes step `state.step` and waits for it: a save that fails raises
    CheckpointWriteError at once (the run stops; the last complete step stays restorable)."""
    items = {
      "state": ocp.args.StandardSave(state),
      "progress": ocp.args.JsonSave(dataclasses.asdict(progress)),
    }
    if best_params is not None:
      items["best"] = ocp.args.StandardSave(best_params)
    step = int(state.step)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # orbax raises many types; each means this step is not on disk
      self.failed = True
      reason = (str(e).splitlines() or [type(e).__name__])[0]
      raise CheckpointWriteError(
        f"could not write checkpoint step {step} ({reason}) ({self.directory})"
      ) from None

  def restore(self, state_template, best_template=None):
    """`(state, best_params, Progress)` of the latest complete step, or None if there is none.

    Arrays land on the templates' shardings (the current mesh), whatever mesh wrote them.
    """
    step = self.manager.latest_step()
    if step is None:
      return None
    items = {
      "state": ocp.args.StandardRestore(_abstract(state_template)),
      "progress": ocp.args.JsonRestore(),
    }
    has_best = best_template is not None and "best" in self.manager.item_metadata(step)
    if has_best:
      items["best"] = ocp.args.StandardRestore(_abstract(best_template))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    progress = Progress(**restored["progress"])
    log.info("%s: resuming at step %d (phase step %d)", self.directory, step, progress.phase_step)
    return restored["state"], (restored["best"] if has_best else None), progress

  def close(self) -> None:
    if not self.failed:
      self.manager.wait_until_finished()
    try:
      self.manager.close()
    except Exception:  # after a failed save, closing may report the same failure again
      if not self.failed:
        raise


def restore_params(directory: str, template_params: Any) -> Any:
  """Params of the latest checkpoint of a phase folder, restored onto `template_params`'
  shardings (arrays or `jax.ShapeDtypeStruct`s), whatever mesh wrote them.

  Of a phase that selects its best step (fine-tuning), these are the selected params.
  """
  directory = os.path.abspath(directory)
  target = _abstract(template_params)
  handlers = {  # known handlers: orbax then reads the metadata without a warning per item
    "state": ocp.PyTreeCheckpointHandler(),
    "best": ocp.StandardCheckpointHandler(),
    "progress": ocp.JsonCheckpointHandler(),
  }
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint found")
    try:
      if manager.item_metadata(step).get("best") is not None:
        args = ocp.args.Composite(best=ocp.args.StandardRestore(target))
        return manager.restore(step, args=args)["best"]
      item = {"params": target}  # only the params of the saved train state
      restore_args = ocp.checkpoint_utils.construct_restore_args(item)
      args = ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
      return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
    except (ValueError, KeyError) as e:
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f"{directory}: checkpoint params do not fit the model ({msg})") from None
