"""Your own collection as a DSI index: build it from a folder, search it, add and remove items.

An index folder holds `index.json` and one *generation*: a run folder (`runs.load_run`'s format:
`model.json`, `docids.json`, `run.json`, `checkpoints/`) plus the items (`items.json`: keys,
texts, known queries, source files; `pixels.npy`: the images as the model sees them, for
thumbnails and for replay when items are added). `index.json` names the generation and the
removed keys:

  INDEX/index.json   {"format": 1, "kind": "images", "generation": "g0002", "removed": [...]}
  INDEX/g0002/       the run folder and the items

Every change is atomic. `build` and `add` train the next generation in a hidden folder, rename
it into place, and only then replace `index.json` (write to a temporary file, rename); `remove`
replaces `index.json` alone. A process killed at any moment leaves `index.json` naming a
complete generation: the old index or the new one, never a mix. Leftovers of a killed write
are cleared by the next one. One writer at a time (a lock file); any number of readers.

Models: images go through the borrowed, frozen DINOv2 tower (block 8, the project's default
image tower) and a docid decoder (`borrowed.make_dinov2_dsi`), trained to index each image and
to find it again from augmented views (crop, flip, colour jitter); texts through the frozen
all-MiniLM-L6-v2 (`borrowed.make_minilm_dsi`), indexed by their first word pieces and trained on
their known queries plus random spans of their text ("document as query"). Ids are atomic.

Removing is immediate (`DSIModel.remove`: the trie and the live mask drop the items, no
training). Adding keeps every old id: the new items get the next atomic ids, their output rows
start from the decoder's state for their own views (IncDSI's observation that an atomic id is
an output row), and a short continual-training phase on the new items' views replays a sample
of old items' views (`AddConfig.replay`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dsi_jax import collection as collection_lib
from dsi_jax import errors, index_training, results, runs
from dsi_jax.errors import UserError

INDEX_FILE = "index.json"
ITEMS_FILE = "items.json"
PIXELS_FILE = "pixels.npy"
EMBEDDINGS_FILE = "embeddings.npy"
ID_SCHEMES = ("atomic", "random", "semantic")
FORMAT = 1
LOCK_FILE = ".lock"
GENERATION = re.compile(r"g\d{4,}")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """How `Index.build` trains.

  steps: training steps of each phase (indexing, then retrieval); None scales them to the
    collection (`default_steps`). views: training queries per item (augmented images, or text
    spans besides a document's known queries). image_size: the side images are resized to
    (a multiple of 14, the tower's patch). text_length: word pieces of a document or query.
  ids: "atomic" (one output row per item), "random" (3 digits for up to 1,000 items, ...) or
    "semantic" (hierarchical k-means over the tower's mean-pooled outputs, 10 clusters per
    level, leaves of up to 100).
  """

  steps: int | None = None
  views: int = 4
  ids: str = "atomic"
  image_size: int = 112
  output_block: int = 8
  text_length: int = 64
  batch_size: int = 32
  learning_rate: float = 1e-3
  seed: int = 0

  def __post_init__(self):
    if self.ids not in ID_SCHEMES:
      raise UserError(f"unknown id scheme {self.ids!r}; use {', '.join(ID_SCHEMES)}")


@dataclasses.dataclass(frozen=True)
class AddConfig:
  """How `Index.add` trains: `steps` of continual training (None: `default_steps` of the new
  items), `views` per new item, and `replay` old items' views per new item's view."""

  steps: int | None = None
  views: int = 4
  replay: float = 1.0

  def __post_init__(self):
    if self.replay < 0:
      raise UserError(f"replay must be >= 0, got {self.replay}")

  batch_size: int = 32
  learning_rate: float = 5e-4
  seed: int = 0


# ----------------------------------------------------------------------------- persistence


def _read_state(path: str) -> dict:
  file = os.path.join(path, INDEX_FILE)
  if not os.path.isfile(file):
    raise UserError(f"{path}: not an index (no {INDEX_FILE}; make one with dsi-jax index build)")
  try:
    with open(file) as f:
      state = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{file}: unreadable ({e})") from None
  if not isinstance(state, dict) or state.get("format") != FORMAT:
    raise UserError(f"{file}: not an index of format {FORMAT}")
  return state


def _next_generation(path: str, state: dict | None) -> str:
  last = int(state["generation"][1:]) if state else 0
  return f"g{last + 1:04d}"


@contextlib.contextmanager
def _writer(path: str):
  """Holds the index's lock; clears what a killed writer left (hidden folders, generations
  `index.json` does not name)."""
  import fcntl

  os.makedirs(path, exist_ok=True)
  lock = open(os.path.join(path, LOCK_FILE), "w")
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.close()
    raise UserError(f"{path}: another process is writing this index") from None
  try:
    current = None
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
      current = _read_state(path)["generation"]
    for name in os.listdir(path):
      stale = name.startswith(".tmp-g") or (GENERATION.fullmatch(name) and name != current)
      if stale and os.path.isdir(os.path.join(path, name)):
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    yield
  finally:
    lock.close()


def _commit(path: str, tmp: str, generation: str, state: dict) -> None:
  """Moves a finished generation into place, then points `index.json` at it."""
  final = os.path.join(path, generation)
  os.rename(tmp, final)
  _fsync_dir(path)
  results.write_json({**state, "generation": generation}, os.path.join(path, INDEX_FILE))
  _fsync_dir(path)


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _save_items(folder: str, items: dict, pixels: np.ndarray | None, embeddings) -> None:
  results.write_json(items, os.path.join(folder, ITEMS_FILE))
  np.save(os.path.join(folder, EMBEDDINGS_FILE), embeddings, allow_pickle=False)
  if pixels is not None:
    np.save(os.path.join(folder, PIXELS_FILE), pixels, allow_pickle=False)


# ----------------------------------------------------------------------------- the index


@dataclasses.dataclass
class Index:
  """A loaded index: `search` it; `Index.build`, `add` and `remove` change it on disk."""

  path: str
  state: dict
  run: runs.Run
  items: dict
  pixels: np.ndarray | None

  @property
  def kind(self) -> str:
    return self.state["kind"]

  @property
  def keys(self) -> list[str]:
    """The live items, in id order."""
    removed = set(self.state["removed"])
    return [k for k in self.items["keys"] if k not in removed]

  def __len__(self) -> int:
    return len(self.keys)

  @classmethod
  def load(cls, path: str) -> Index:
    state = _read_state(path)
    folder = os.path.join(path, state["generation"])
    run = runs.load_run(folder)
    if state["removed"]:
      run.model.remove(state["removed"])
    with open(os.path.join(folder, ITEMS_FILE)) as f:
      items = json.load(f)
    pixels = None
    if os.path.exists(os.path.join(folder, PIXELS_FILE)):
      pixels = np.load(os.path.join(folder, PIXELS_FILE), allow_pickle=False)
    return cls(path, state, run, items, pixels)

  def search(
    self, *, images: Sequence[str] = (), texts: Sequence[str] = (), k: int = 10
  ) -> list[list[dict]]:
    """`[{"rank", "key", "score", "id", "path", "text"}, ...]` per query (images, then texts);
    an image is a file's path or its encoded bytes."""
    return [self._describe(q) for q in self.run.search(images=images, texts=texts, k=k)]

  def search_inputs(self, inputs: np.ndarray, k: int = 10) -> list[list[dict]]:
    """`search` for queries already prepared as model inputs (e.g. an item's own pixels)."""
    ranked, scores = self.run.retriever.search(inputs, k)
    return [
      self._describe(
        [{"rank": i + 1, "key": key, "score": float(s)} for i, (key, s) in enumerate(zip(r, sc))]
      )
      for r, sc in zip(ranked, scores)
    ]

  def _describe(self, query: list[dict]) -> list[dict]:
    paths = self.items.get("paths") or {}
    for hit in query:
      hit["id"] = self.run.model.docids.id_string(hit["key"])
      hit["path"] = paths.get(hit["key"])
      hit["text"] = self.items["texts"][self._rows[hit["key"]]] if self.kind == "texts" else None
    return query

  @functools.cached_property
  def _rows(self) -> dict[str, int]:
    return {key: i for i, key in enumerate(self.items["keys"])}

  def thumbnail(self, key: str) -> np.ndarray | None:
    """The image of `key` as the model saw it (uint8 RGB), for image indexes."""
    if self.pixels is None:
      return None
    return self.pixels[self._rows[key]]

  # -- changes -------------------------------------------------------------------------------
  @staticmethod
  def remove(path: str, keys: Sequence[str]) -> int:
    """Takes `keys` out of the index at once (no training); returns how many were live."""
    with _writer(path):
      state = _read_state(path)
      with open(os.path.join(path, state["generation"], ITEMS_FILE)) as f:
        known = set(json.load(f)["keys"])
      unknown = [k for k in keys if k not in known]
      if unknown:
        raise UserError(f"{path}: no item {unknown[0]!r} in the index")
      removed = set(state["removed"])
      new = [k for k in dict.fromkeys(keys) if k not in removed]
      state = {**state, "removed": sorted(removed | set(new))}
      results.write_json(state, os.path.join(path, INDEX_FILE))
      return len(new)

  @staticmethod
  def build(
    source: str,
    path: str,
    config: BuildConfig = BuildConfig(),
    *,
    show_progress: bool = True,
  ) -> Index:
    """Makes an index of a folder of images or a JSONL of documents (`dsi_jax.collection`)."""
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
      raise UserError(f"{path}: already an index; add to it with dsi-jax index add")
    if os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f"{path}: the index folder is a file")
    if os.path.isdir(path):
      other = [n for n in os.listdir(path) if n != LOCK_FILE and not n.startswith(".tmp-g")]
      if other:
        raise UserError(f"{path}: the folder is not empty; build an index in a new folder")
    items = collection_lib.read_collection(source)
    errors.writable_folder(path, "index folder")
    with _writer(path):
      generation = _next_generation(path, None)
      tmp = os.path.join(path, f".tmp-{generation}")
      t0 = time.time()
      summary, pixels, embeddings = index_training.train_new(
        items, tmp, config, show_progress=show_progress
      )
      record = index_training.items_record(items, pixels)
      _save_items(tmp, record, pixels, embeddings)
      state = {
        "format": FORMAT,
        "kind": items.kind,
        "removed": [],
        "log": [
          {
            "op": "build",
            "source": os.path.abspath(source),
            "items": len(items),
            "skipped": len(items.skipped),
            "seconds": round(time.time() - t0, 1),
            **summary,
          }
        ],
      }
      _commit(path, tmp, generation, state)
    return Index.load(path)

  @staticmethod
  def add(
    path: str, source: str, config: AddConfig = AddConfig(), *, show_progress: bool = True
  ) -> Index:
    """Adds the items of `source` without renumbering the old ones (see the module docstring)."""
    new = collection_lib.read_collection(source)
    with _writer(path):
      state = _read_state(path)
      if new.kind != state["kind"]:
        raise UserError(f"{source}: {new.kind} cannot be added to an index of {state['kind']}")
      old = Index.load(path)
      clash = [k for k in new.keys if k in set(old.items["keys"])]
      if clash:
        raise UserError(f"{source}: item {clash[0]!r} is already in the index (keys must be new)")
      generation = _next_generation(path, state)
      tmp = os.path.join(path, f".tmp-{generation}")
      t0 = time.time()
      embeddings = np.load(
        os.path.join(path, state["generation"], EMBEDDINGS_FILE), allow_pickle=False
      )
      summary, record, pixels, embeddings = index_training.train_added(
        old, embeddings, new, tmp, config, show_progress=show_progress
      )
      _save_items(tmp, record, pixels, embeddings)
      entry = {
        "op": "add",
        "source": os.path.abspath(source),
        "items": len(new),
        "skipped": len(new.skipped),
        "seconds": round(time.time() - t0, 1),
        **summary,
      }
      _commit(path, tmp, generation, {**state, "log": [*state.get("log", []), entry]})
    return Index.load(path)


def is_index(path: str) -> bool:
  return os.path.isfile(os.path.join(path, INDEX_FILE))


def describe(index: Index) -> dict[str, Any]:
  """What `dsi-jax index info` prints: kind, items, removed, generation and the log."""
  return {
    "kind": index.kind,
    "items": len(index),
    "removed": len(index.state["removed"]),
    "generation": index.state["generation"],
    "log": index.state.get("log", []),
  }
