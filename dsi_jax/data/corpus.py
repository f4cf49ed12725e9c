"""A labelled image corpus split into indexed items and train/val/test queries.

Relevance is by class: a query is relevant to every *indexed* item with the same label.
`sample_corpus` draws a class-balanced subset of a labelled data set; `ImageCorpus.save`
and `ImageCorpus.load` keep the split as plain JSON next to the source data set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np

SPLITS = ("indexed", "query_train", "query_val", "query_test")
QUERY_SPLITS = {"train": "query_train", "val": "query_val", "test": "query_test"}
_FORMAT = "dsi_jax.ImageCorpus"
_VERSION = 1


@dataclasses.dataclass(eq=False)
class ImageCorpus:
  """A sampled corpus.

  Attributes:
    images: uint8 `[n, height, width]` or `[n, height, width, channels]`.
    labels: int64 `[n]`, the class of each item.
    keys: `n` unique item keys, e.g. "item-012345".
    indexed: int64 `[num_indexed]`, positions (into `images`) of the items to retrieve.
    query_train: int64 `[num_train]`, positions of the training queries.
    query_val: int64 `[num_val]`, positions of the validation queries.
    query_test: int64 `[num_test]`, positions of the test queries.
    source_indices: int64 `[n]`, the position of each item in the data set it was sampled
      from; `arange(n)` if not given.
  """

  images: np.ndarray
  labels: np.ndarray
  keys: list[str]
  indexed: np.ndarray
  query_train: np.ndarray
  query_val: np.ndarray
  query_test: np.ndarray
  source_indices: np.ndarray | None = None

  def __post_init__(self) -> None:
    n = len(self.images)
    self.labels = np.asarray(self.labels, dtype=np.int64)
    self.keys = list(self.keys)
    if self.source_indices is None:
      self.source_indices = np.arange(n, dtype=np.int64)
    self.source_indices = np.asarray(self.source_indices, dtype=np.int64)
    if not (
      self.labels.shape == (n,) and len(self.keys) == n and self.source_indices.shape == (n,)
    ):
      raise ValueError(
        f"images ({n}), labels {self.labels.shape}, keys ({len(self.keys)}) and "
        f"source_indices {self.source_indices.shape} must have the same length"
      )
    if len(set(self.keys)) != n:
      raise ValueError("keys must be unique")
    seen = np.zeros(n, dtype=bool)
    for name in SPLITS:
      idx = np.asarray(getattr(self, name), dtype=np.int64).reshape(-1)
      if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} has indices outside 0..{n - 1}")
      if np.unique(idx).size != idx.size or seen[idx].any():
        raise ValueError(f"{name} repeats an item or overlaps another split")
      seen[idx] = True
      setattr(self, name, idx)

  @property
  def indexed_keys(self) -> list[str]:
    """Keys of the indexed items, in `indexed` order."""
    return [self.keys[i] for i in self.indexed]

  def query_indices(self, split: str) -> np.ndarray:
    """Positions `[num_queries]` of the queries of `split` ("train", "val" or "test")."""
    if split not in QUERY_SPLITS:
      raise ValueError(f"split must be one of {sorted(QUERY_SPLITS)}, got {split!r}")
    return getattr(self, QUERY_SPLITS[split])

  def _indexed_keys_by_label(self) -> dict[int, set[str]]:
    by_label: dict[int, set[str]] = {}
    for i in self.indexed:
      by_label.setdefault(int(self.labels[i]), set()).add(self.keys[i])
    return by_label

  def relevant_keys(self, i: int) -> set[str]:
    """Keys of the indexed items with the same label as item `i` (item `i` included if indexed)."""
    label = self.labels[i]
    return {self.keys[j] for j in self.indexed if self.labels[j] == label}

  def query_relevance(self, split: str) -> list[set[str]]:
    """For each query of `split` ("train", "val" or "test"), the set of relevant keys."""
    by_label = self._indexed_keys_by_label()
    return [set(by_label.get(int(self.labels[i]), ())) for i in self.query_indices(split)]

  def save(self, path: str | os.PathLike) -> None:
    """Writes keys, source indices, labels and splits (not the pixels) as JSON, atomically."""
    path = os.fspath(path)
    data = {
      "format": _FORMAT,
      "version": _VERSION,
      "keys": self.keys,
      "source_indices": [int(i) for i in self.source_indices],
      "labels": [int(y) for y in self.labels],
      "splits": {name: [self.keys[i] for i in getattr(self, name)] for name in SPLITS},
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".corpus-", suffix=".json.tmp")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(data, f)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

  @classmethod
  def load(cls, path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> ImageCorpus:
    """Reads a corpus saved by `save`.

    Args:
      path: The JSON file.
      images: The source data set `[num_source, ...]` the corpus was sampled from.
      labels: Its labels `[num_source]`; must agree with the saved labels.

    Raises:
      ValueError: Naming `path`, if the file is not valid or does not fit `images`/`labels`.
    """
    path = os.fspath(path)
    try:
      with open(path) as f:
        data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a valid corpus JSON file ({e})") from e

    def fail(msg: str) -> ValueError:
      return ValueError(f"{path}: {msg}")

    if not isinstance(data, dict) or data.get("format") != _FORMAT:
      raise fail(f"not a {_FORMAT} file")
    if data.get("version") != _VERSION:
      raise fail(f"unsupported version {data.get('version')!r}, expected {_VERSION}")
    try:
      keys = [str(k) for k in data["keys"]]
      source = np.asarray(data["source_indices"], dtype=np.int64).reshape(-1)
      saved_labels = np.asarray(data["labels"], dtype=np.int64).reshape(-1)
      splits = {name: list(data["splits"][name]) for name in SPLITS}
    except (KeyError, TypeError, ValueError) as e:
      raise fail(f"missing or malformed field ({e!r})") from e
    n = len(keys)
    if source.shape != (n,) or saved_labels.shape != (n,):
      raise fail(f"{n} keys but {source.size} source_indices and {saved_labels.size} labels")
    if len(set(keys)) != n:
      raise fail("duplicate keys")
    if n and (source.min() < 0 or source.max() >= len(images)):
      raise fail(f"source indices out of range for a data set of {len(images)} images")
    if len(labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not np.array_equal(np.asarray(labels)[source], saved_labels):
      raise fail("saved labels do not match the given data set (a different data set?)")
    position = {k: i for i, k in enumerate(keys)}
    seen: set[str] = set()
    split_indices = {}
    for name, split_keys in splits.items():
      unknown = [k for k in split_keys if k not in position]
      if unknown:
        raise fail(f"split {name} has unknown keys, e.g. {unknown[0]!r}")
      repeated = seen.intersection(split_keys) or (len(set(split_keys)) != len(split_keys))
      if repeated:
        raise fail(f"split {name} repeats a key or shares keys with another split")
      seen.update(split_keys)
      split_indices[name] = np.asarray([position[k] for k in split_keys], dtype=np.int64)
    return cls(
      images=images[source],
      labels=saved_labels,
      keys=keys,
      source_indices=source,
      **split_indices,
    )


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
  """Splits `n` items by `fractions`, each positive fraction getting at least one if possible.

  Largest-remainder rounding (ties to the earlier part), then each empty part with a positive
  fraction takes one item from the largest part, as long as that part keeps at least one.
  """
  exact = [n * f for f in fractions]
  counts = [int(np.floor(x)) for x in exact]
  order = sorted(range(len(fractions)), key=lambda j: (-(exact[j] - counts[j]), j))
  for j in order[: n - sum(counts)]:
    counts[j] += 1
  for j, f in enumerate(fractions):
    if f > 0 and counts[j] == 0:
      donor = max(range(len(counts)), key=lambda d: (counts[d], -d))
      if counts[donor] < 2:
        break
      counts[donor] -= 1
      counts[j] += 1
  return counts


def sample_corpus(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  num_items: int,
  indexed_fraction: float = 0.25,
  query_splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
  seed: int = 0,
  key_prefix: str = "item",
) -> ImageCorpus:
  """Samples a class-balanced corpus and splits it, per class, into indexed items and queries.

  Each class gets `num_items // num_classes` items, the remainder going one each to the first
  classes (in sorted label order). Within a class, `indexed_fraction` of the items are indexed
  and the rest are queries, split by `query_splits` into train/val/test; every split gets at
  least one item of each class when the class has enough queries.

  Args:
    images: Source images `[num_source, height, width]` or `[num_source, height, width, c]`.
    labels: Source labels `[num_source]`.
    num_items: How many items to sample in total.
    indexed_fraction: Fraction of each class that is indexed (to be retrieved).
    query_splits: Train/val/test fractions of the remaining queries; must sum to 1.
    seed: Seed for `np.random.default_rng`; the same arguments give the same corpus.
    key_prefix: Keys are `f"{key_prefix}-{source_index:06d}"`.

  Returns:
    The corpus; items are ordered by source index.

  Raises:
    ValueError: Naming the offending setting, if the request cannot be met.
  """
  labels = np.asarray(labels).reshape(-1)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  classes = np.unique(labels)
  num_classes = len(classes)
  if num_items > len(images):
    raise ValueError(f"num_items={num_items} exceeds the {len(images)} available images")
  if num_items < 2 * num_classes:
    raise ValueError(
      f"num_items={num_items} is below 2 * num_classes = {2 * num_classes}: each class needs "
      "at least one indexed item and one query"
    )
  if not 0.0 < indexed_fraction < 1.0:
    raise ValueError(f"indexed_fraction={indexed_fraction} must lie strictly between 0 and 1")
  if len(query_splits) != 3 or min(query_splits) < 0 or abs(sum(query_splits) - 1.0) > 1e-6:
    raise ValueError(f"query_splits={query_splits} must be 3 non-negative fractions summing to 1")

  rng = np.random.default_rng(seed)
  per_class, remainder = divmod(num_items, num_classes)
  parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
  for c, label in enumerate(classes):
    members = np.flatnonzero(labels == label)
    want = per_class + (1 if c < remainder else 0)
    if len(members) < want:
      raise ValueError(
        f"num_items={num_items} needs {want} items of class {label}, which has only {len(members)}"
      )
    chosen = rng.choice(members, size=want, replace=False)
    num_indexed, num_queries = _split_counts(want, (indexed_fraction, 1.0 - indexed_fraction))
    sizes = [num_indexed] + _split_counts(num_queries, query_splits)
    bounds = np.cumsum([0] + sizes)
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
      parts[name].append(chosen[lo:hi])

  source = np.sort(np.concatenate([np.concatenate(p) for p in parts.values()]))
  position = np.full(len(images), -1, dtype=np.int64)
  position[source] = np.arange(len(source))
  splits = {name: np.sort(position[np.concatenate(p)]) for name, p in parts.items()}
  return ImageCorpus(
    images=np.asarray(images)[source],
    labels=labels[source].astype(np.int64),
    keys=[f"{key_prefix}-{i:06d}" for i in source],
    source_indices=source,
    **splits,
  )
