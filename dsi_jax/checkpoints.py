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

Once a step is on disk, `dsi_jax_sha256.json` beside its items records the sha256 of every file
of the step and of the run's `run.json` (the run it belongs to). Restoring checks both first: a
file changed, missing or added since the save, or a step copied from another run, is refused
with one line naming it. So is a checkpoint whose arrays do not fit the model (checked against
the saved metadata before orbax reads anything).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsi_jax import errors

log = logging.getLogger(__name__)

DIGEST_FILE = "dsi_jax_sha256.json"


class CheckpointWriteError(errors.UserError):
  """A checkpoint could not be written: the run stops, the last good step stays."""


class _WriteFailureReports(logging.Filter):
  """Drops orbax's and asyncio's error reports of a failed write into `directory`: the
  CheckpointWriteError raised for it says the same in one line."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return self.directory not in text


def _drop_closed_loop_reports() -> Any:
  """When a save fails, orbax's other pending writes finish into an event loop that is already
  closed and each reports "Event loop is closed" as an unraisable exception; drops those
  (returns the hook it replaced)."""
  default = sys.unraisablehook

  def hook(report):
    closed = isinstance(report.exc_value, RuntimeError) and "Event loop is closed" in str(
      report.exc_value
    )
    shutdown = isinstance(report.exc_value, ImportError) and "shutting down" in str(
      report.exc_value
    )
    if not (closed or shutdown):
      default(report)

  sys.unraisablehook = hook
  return default


class CheckpointMismatch(errors.UserError):
  """A checkpoint that is not the one its run saved, or does not fit the model."""


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _step_files(step_dir: str) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(root, f), step_dir)
    for root, _, files in os.walk(step_dir)
    for f in files
    if not (root == step_dir and f == DIGEST_FILE)
  )


def write_digest(step_dir: str, run_id: str | None) -> None:
  """Records the sha256 of every file of a saved step and the run it belongs to."""
  from dsi_jax import results

  files = {name: file_sha256(os.path.join(step_dir, name)) for name in _step_files(step_dir)}
  results.write_json({"run": run_id, "files": files}, os.path.join(step_dir, DIGEST_FILE))


def verify_digest(step_dir: str, run_id: str | None) -> bool:
  """Checks a step against its digest; False where it has none. Raises CheckpointMismatch (one
  line naming the file) where a file changed, went missing or was added, or where the step was
  saved by another run than `run_id` (None: not checked)."""
  path = os.path.join(step_dir, DIGEST_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      record = json.load(f)
    saved_run, files = record["run"], dict(record["files"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointMismatch(f"{path}: unreadable checkpoint digest ({e})") from None
  if run_id is not None and saved_run is not None and saved_run != run_id:
    raise CheckpointMismatch(
      f"{step_dir}: this checkpoint was saved by another run (its run.json differs)"
    )
  present = _step_files(step_dir)
  for name in sorted(set(files) | set(present)):
    where = os.path.join(step_dir, name)
    if name not in present:
      raise CheckpointMismatch(f"{where}: missing from the saved checkpoint")
    if name not in files:
      raise CheckpointMismatch(f"{where}: not part of the saved checkpoint")
    if file_sha256(where) != files[name]:
      raise CheckpointMismatch(f"{where}: changed since the checkpoint was saved (sha256 differs)")
  return True


def _subtree(metadata: Any, key: str) -> Any:
  tree = getattr(metadata, "tree", metadata)
  return tree[key]


def check_shapes(saved: Any, template: Any, where: str) -> None:
  """Raises CheckpointMismatch naming the first array whose saved shape differs from the
  model's (or that only one side has), before any array is read."""
  from dsi_jax import partitioning

  def shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {partitioning.path_string(p): tuple(getattr(x, "shape", ())) for p, x in flat}

  have, want = shapes(saved), shapes(template)
  for name in sorted(set(have) | set(want)):
    if name not in have:
      problem = "the model has it, the checkpoint does not"
    elif name not in want:
      problem = "the checkpoint has it, the model does not"
    elif have[name] != want[name]:
      problem = f"saved shape {have[name]}, the model's {want[name]}"
    else:
      continue
    raise CheckpointMismatch(f"{where}: checkpoint params do not fit the model ({name}: {problem})")


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

  def __init__(
    self, directory: str, *, every: int = 0, max_to_keep: int = 2, run_id: str | None = None
  ):
    """run_id: the sha256 of the run's `run.json`, recorded with each step and checked when
    the step is restored."""
    self.directory = errors.writable_folder(os.path.abspath(directory), "checkpoint folder")
    self.every = every
    self.run_id = run_id
    self.failed = False
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_handlers={  # known handlers: item metadata is readable before any save or restore
        "state": ocp.StandardCheckpointHandler(),
        "best": ocp.StandardCheckpointHandler(),
        "progress": ocp.JsonCheckpointHandler(),
      },
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
    quiet = _WriteFailureReports(self.directory)
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    for logger in loggers:
      logger.addFilter(quiet)
    unraisablehook = _drop_closed_loop_reports()
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
      if jax.process_index() == 0:  # one writer of the digest on a multi-host run
        write_digest(self.step_dir(step), self.run_id)
    except Exception as e:  # orbax raises many types; each means this step is not on disk
      self.failed = True  # the filters stay: late reports of this failure are dropped too
      reason = (str(e).splitlines() or [type(e).__name__])[0]
      raise CheckpointWriteError(
        f"could not write checkpoint step {step} ({reason}) ({self.directory})"
      ) from None
    sys.unraisablehook = unraisablehook
    for logger in loggers:
      logger.removeFilter(quiet)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore(self, state_template, best_template=None):
    """`(state, best_params, Progress)` of the latest complete step, or None if there is none.

    Arrays land on the templates' shardings (the current mesh), whatever mesh wrote them.
    """
    step = self.manager.latest_step()
    if step is None:
      return None
    step_dir = self.step_dir(step)
    if not verify_digest(step_dir, self.run_id):  # killed between orbax's commit and the digest
      log.warning("%s: no digest; recording it now (the step itself is complete)", step_dir)
      if jax.process_index() == 0:
        write_digest(step_dir, self.run_id)
    metadata = self.manager.item_metadata(step)
    check_shapes(_subtree(metadata["state"], "params"), state_template.params, step_dir)
    items = {
      "state": ocp.args.StandardRestore(_abstract(state_template)),
      "progress": ocp.args.JsonRestore(),
    }
    has_best = best_template is not None and metadata.get("best") is not None
    if has_best:
      check_shapes(metadata["best"], best_template, step_dir)
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


def restore_params(directory: str, template_params: Any, *, run_id: str | None = None) -> Any:
  """Params of the latest checkpoint of a phase folder, restored onto `template_params`'
  shardings (arrays or `jax.ShapeDtypeStruct`s), whatever mesh wrote them.

  Of a phase that selects its best step (fine-tuning), these are the selected params. The step
  must match its digest (and, given `run_id`, belong to that run); a step without a digest is
  refused (its run was killed before finishing the save: rerun its training command).
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
    step_dir = os.path.join(directory, str(step))
    if not verify_digest(step_dir, run_id):
      raise CheckpointMismatch(
        f"{step_dir}: no {DIGEST_FILE} (the run stopped while saving); rerun its training "
        "command to finish it"
      )
    metadata = manager.item_metadata(step)
    if metadata.get("best") is not None:
      check_shapes(metadata["best"], target, step_dir)
      args = ocp.args.Composite(best=ocp.args.StandardRestore(target))
      return manager.restore(step, args=args)["best"]
    check_shapes(_subtree(metadata["state"], "params"), target, step_dir)
    item = {"params": target}  # only the params of the saved train state
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    args = ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
    return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]


def trained_once(
  directory: str, fingerprint: Any, template: Any, train: Any
) -> tuple[Any, dict[str, Any]]:
  """Parameters trained once and kept in `directory`, e.g. a first stage or a re-ranker of an
  experiment that a later run (after a crash, or with other evaluation settings) reuses.

  If `directory` holds parameters saved under an equal `fingerprint` (anything JSON can hold:
  the settings and data digests the training depends on), they are restored onto `template`'s
  shapes and returned with the `info` saved beside them. Otherwise `train()` returns
  `(params, info)`, which are saved (orbax, into a temporary folder renamed into place: a
  process killed mid-save leaves the old folder or none) and returned; a folder saved under
  another fingerprint is replaced.
  """
  import shutil

  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, "trained.json")
  wanted = json.loads(json.dumps(fingerprint))
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("fingerprint") == wanted:
      params_dir = os.path.join(directory, "params")
      with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir, _abstract(template))
      log.info("%s: trained parameters restored", directory)
      return params, meta.get("info", {})
  params, info = train()
  tmp = f"{directory}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
  with open(os.path.join(tmp, "trained.json"), "w") as f:
    json.dump({"fingerprint": wanted, "info": info}, f)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)
  return params, info
