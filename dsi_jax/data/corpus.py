"""A retrieval corpus: which items are indexed, which queries exist, and what is relevant.

A `Corpus` holds keys, never pixels or long texts: the items themselves stay in the tfds data
set they were sampled from (looked up by key), so a corpus is a small JSON file. Each query
is either another item of the data set (`item`, image -> image retrieval) or a text (`text`,
a caption or a question), and lists the keys of its relevant indexed items.

Samplers, one per kind of relevance (DESIGN.md):
  class_corpus:     same class = relevant (Fashion-MNIST, image folders); class-balanced.
  category_corpus:  shares at least one object category = relevant (COCO instances).
  caption_corpus:   a caption's own image is relevant (Flickr, COCO captions).
  qa_corpus:        a question's paragraph is relevant (SQuAD).

`save_corpus` writes the corpus and its DocidMap into one folder, atomically, so that an
evaluation months later reads exactly the same corpus and ids (`load_corpus`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dsi_jax import docids as docids_lib

QUERY_SPLITS = ("train", "validation", "test")
FORMAT = "dsi_jax.corpus/1"
CORPUS_FILE = "corpus.json"
DOCIDS_FILE = "docids.json"


@dataclasses.dataclass(frozen=True)
class Query:
  """One query: an item of the data set (`item`) or a text (`text`), and its relevant keys."""

  key: str
  relevant: tuple[str, ...]
  item: str | None = None
  text: str | None = None


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Indexed items and train / validation / test queries.

  Attributes:
    indexed: keys of the items to retrieve (the ids of the DocidMap).
    queries: split name ("train", "validation", "test") -> its queries.
    labels: class of each indexed item, where the data set has classes (for clustered ids).
    source: where the items come from and how they were sampled (data set, split, seed, ...).
  """

  indexed: tuple[str, ...]
  queries: Mapping[str, tuple[Query, ...]]
  labels: Mapping[str, int] | None = None
  source: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _validate(self, where="Corpus")

  def query_relevance(self, split: str) -> list[set[str]]:
    """Per query of `split`, the set of relevant indexed keys."""
    return [set(q.relevant) for q in self.split(split)]

  def split(self, name: str) -> tuple[Query, ...]:
    if name not in QUERY_SPLITS:
      raise ValueError(f"split must be one of {', '.join(QUERY_SPLITS)}, got {name!r}")
    return self.queries.get(name, ())

  @property
  def item_keys(self) -> list[str]:
    """Every data-set item the corpus reads: the indexed items, then the query items."""
    keys = list(self.indexed)
    for name in QUERY_SPLITS:
      keys.extend(q.item for q in self.split(name) if q.item is not None)
    return keys

  def make_docids(self, scheme: str, *, num_codes: int = 10, seed: int = 0):
    """The DocidMap of the indexed items with the named scheme."""
    labels = None if self.labels is None else [self.labels[k] for k in self.indexed]
    return docids_lib.make_docids(
      scheme, self.indexed, labels=labels, num_codes=num_codes, seed=seed
    )

  def to_json(self) -> dict:
    return {
      "format": FORMAT,
      "source": dict(self.source),
      "indexed": list(self.indexed),
      "labels": None if self.labels is None else dict(self.labels),
      "queries": {
        name: [
          {k: v for k, v in dataclasses.asdict(q).items() if v is not None}
          | {"relevant": list(q.relevant)}
          for q in self.split(name)
        ]
        for name in QUERY_SPLITS
      },
    }

  @classmethod
  def from_json(cls, data: Any, *, where: str) -> Corpus:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
      raise ValueError(f"{where}: not a corpus file (expected format {FORMAT!r})")
    try:
      queries = {
        name: tuple(
          Query(
            key=str(q["key"]),
            relevant=tuple(str(r) for r in q["relevant"]),
            item=q.get("item"),
            text=q.get("text"),
          )
          for q in data["queries"][name]
        )
        for name in QUERY_SPLITS
      }
      labels = data["labels"]
      return cls(
        indexed=tuple(str(k) for k in data["indexed"]),
        queries=queries,
        labels=None if labels is None else {str(k): int(v) for k, v in labels.items()},
        source=dict(data.get("source") or {}),
      )
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{where}: missing or malformed field ({e!r})") from None


def _validate(corpus: Corpus, *, where: str) -> None:
  if not corpus.indexed:
    raise ValueError(f"{where}: the corpus has no indexed items")
  indexed = set(corpus.indexed)
  if len(indexed) != len(corpus.indexed):
    dup = next(k for k in corpus.indexed if corpus.indexed.count(k) > 1)
    raise ValueError(f"{where}: indexed key {dup!r} appears more than once")
  unknown_splits = set(corpus.queries) - set(QUERY_SPLITS)
  if unknown_splits:
    raise ValueError(f"{where}: unknown query split {sorted(unknown_splits)[0]!r}")
  seen: set[str] = set()
  for name in QUERY_SPLITS:
    for q in corpus.queries.get(name, ()):
      if q.key in seen:
        raise ValueError(f"{where}: query {q.key!r} appears more than once")
      seen.add(q.key)
      if (q.item is None) == (q.text is None):
        raise ValueError(f"{where}: query {q.key!r} needs exactly one of 'item' and 'text'")
      if q.item is not None and q.item in indexed:
        raise ValueError(f"{where}: query {q.key!r} is the indexed item {q.item!r}")
      if not q.relevant:
        raise ValueError(f"{where}: query {q.key!r} has no relevant indexed item")
      missing = [r for r in q.relevant if r not in indexed]
      if missing:
        raise ValueError(f"{where}: query {q.key!r} names {missing[0]!r}, which is not indexed")
  if corpus.labels is not None:
    missing = [k for k in corpus.indexed if k not in corpus.labels]
    if missing:
      raise ValueError(f"{where}: indexed item {missing[0]!r} has no label")


# --------------------------------------------------------------------------------------------
# Persistence: a folder holding corpus.json and docids.json, replaced as a whole.


def save_corpus(directory: str | os.PathLike, corpus: Corpus, docids) -> None:
  """Writes `corpus.json` and `docids.json` into `directory`, atomically as a pair.

  Both files are written into a temporary sibling folder that then replaces `directory`, so a
  reader sees the old pair or the new pair, never a mixture or a half-written file.
  """
  directory = os.path.abspath(os.fspath(directory))
  if tuple(docids.keys) != tuple(corpus.indexed):
    raise ValueError("the DocidMap's keys must be the corpus's indexed keys, in order")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}-")
  try:
    with open(os.path.join(tmp, CORPUS_FILE), "w") as f:
      json.dump(corpus.to_json(), f)
    docids.save(os.path.join(tmp, DOCIDS_FILE))
    if os.path.exists(directory):
      old = tmp + ".old"
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_corpus(directory: str | os.PathLike) -> tuple[Corpus, docids_lib.DocidMap]:
  """Reads a folder written by `save_corpus`; ValueError naming the file if it is invalid."""
  directory = os.fspath(directory)
  path = os.path.join(directory, CORPUS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no corpus file")
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a valid corpus JSON file ({e})") from None
  try:
    corpus = Corpus.from_json(data, where=path)
  except ValueError as e:
    msg = str(e)
    raise ValueError(msg if msg.startswith(path) else f"{path}: {msg}") from None
  docids = docids_lib.DocidMap.load(os.path.join(directory, DOCIDS_FILE))
  if tuple(docids.keys) != corpus.indexed:
    raise ValueError(f"{directory}: docids.json does not hold the corpus's indexed keys")
  return corpus, docids


# --------------------------------------------------------------------------------------------
# Sampling.


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
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


def _check_fractions(indexed_fraction: float, query_splits: Sequence[float]) -> None:
  if not 0.0 < indexed_fraction < 1.0:
    raise ValueError(f"indexed_fraction={indexed_fraction} must lie strictly between 0 and 1")
  if len(query_splits) != 3 or min(query_splits) < 0 or abs(sum(query_splits) - 1.0) > 1e-6:
    raise ValueError(f"query_splits={query_splits} must be 3 non-negative fractions summing to 1")


def _check_size(num_items: int | None, available: int, what: str) -> int:
  if available == 0:
    raise ValueError(f"the data set has no {what}: empty corpus")
  if num_items is None:
    return available
  if num_items < 1:
    raise ValueError(f"num_items={num_items} must be positive")
  if num_items > available:
    raise ValueError(f"num_items={num_items} exceeds the {available} {what} of the data set")
  return num_items


def _check_keys(keys: Sequence[str]) -> None:
  if len(set(keys)) != len(keys):
    dup = next(k for k in keys if list(keys).count(k) > 1)
    raise ValueError(f"item key {dup!r} appears more than once in the data set")


def class_corpus(
  keys: Sequence[str],
  labels: Sequence[int] | np.ndarray,
  *,
  num_items: int,
  indexed_fraction: float = 0.25,
  query_splits: Sequence[float] = (0.8, 0.1, 0.1),
  seed: int = 0,
  source: Mapping[str, Any] | None = None,
) -> Corpus:
  """A class-balanced corpus; a query is relevant to every indexed item of its class.

  Each class gets `num_items // num_classes` items, the remainder going one each to the first
  classes (in sorted label order). Within a class, `indexed_fraction` of the items are indexed
  and the rest are queries, split by `query_splits` into train / validation / test; every split
  gets at least one item of each class when the class has enough queries.
  """
  keys = list(keys)
  labels = np.asarray(labels).reshape(-1)
  if len(keys) != len(labels):
    raise ValueError(f"{len(keys)} items but {len(labels)} labels")
  _check_keys(keys)
  _check_size(num_items, len(keys), "items")
  _check_fractions(indexed_fraction, query_splits)
  classes = np.unique(labels)
  if num_items < 2 * len(classes):
    raise ValueError(
      f"num_items={num_items} is below 2 * num_classes = {2 * len(classes)}: each class needs "
      "at least one indexed item and one query"
    )
  rng = np.random.default_rng(seed)
  per_class, remainder = divmod(num_items, len(classes))
  indexed: list[int] = []
  queries: dict[str, list[int]] = {name: [] for name in QUERY_SPLITS}
  for c, label in enumerate(classes):
    members = np.flatnonzero(labels == label)
    want = per_class + (1 if c < remainder else 0)
    if len(members) < want:
      raise ValueError(
        f"num_items={num_items} needs {want} items of class {label}, which has only {len(members)}"
      )
    chosen = rng.choice(members, size=want, replace=False)
    num_indexed, num_queries = split_counts(want, (indexed_fraction, 1.0 - indexed_fraction))
    indexed.extend(chosen[:num_indexed].tolist())
    bounds = np.cumsum([num_indexed, *split_counts(num_queries, query_splits)])
    for name, lo, hi in zip(QUERY_SPLITS, bounds[:-1], bounds[1:]):
      queries[name].extend(chosen[lo:hi].tolist())
  indexed.sort()
  by_label: dict[int, list[str]] = {}
  for i in indexed:
    by_label.setdefault(int(labels[i]), []).append(keys[i])
  return Corpus(
    indexed=tuple(keys[i] for i in indexed),
    queries={
      name: tuple(
        Query(key=keys[i], item=keys[i], relevant=tuple(by_label[int(labels[i])]))
        for i in sorted(rows)
      )
      for name, rows in queries.items()
    },
    labels={keys[i]: int(labels[i]) for i in indexed},
    source=_source(source, num_items=num_items, seed=seed, relevance="class"),
  )


def category_corpus(
  keys: Sequence[str],
  categories: Sequence[Sequence[int]],
  *,
  num_items: int,
  indexed_fraction: float = 0.25,
  query_splits: Sequence[float] = (0.8, 0.1, 0.1),
  seed: int = 0,
  source: Mapping[str, Any] | None = None,
) -> Corpus:
  """A random corpus of items with object categories; relevant = shares >= 1 category.

  Items without any category are never sampled. A query whose categories no indexed item
  shares has nothing to retrieve and is dropped (the count is kept in `source`).
  """
  keys = list(keys)
  if len(keys) != len(categories):
    raise ValueError(f"{len(keys)} items but {len(categories)} category lists")
  _check_keys(keys)
  eligible = [i for i, c in enumerate(categories) if len(c)]
  _check_size(num_items, len(eligible), "items with object categories")
  _check_fractions(indexed_fraction, query_splits)
  rng = np.random.default_rng(seed)
  chosen = rng.choice(np.asarray(eligible), size=num_items, replace=False)
  num_indexed, num_queries = split_counts(num_items, (indexed_fraction, 1.0 - indexed_fraction))
  indexed = sorted(chosen[:num_indexed].tolist())
  by_category: dict[int, list[str]] = {}
  for i in indexed:
    for c in sorted(set(categories[i])):
      by_category.setdefault(int(c), []).append(keys[i])
  bounds = np.cumsum([num_indexed, *split_counts(num_queries, query_splits)])
  queries, dropped = {}, 0
  for name, lo, hi in zip(QUERY_SPLITS, bounds[:-1], bounds[1:]):
    split = []
    for i in sorted(chosen[lo:hi].tolist()):
      rel = {k for c in set(categories[i]) for k in by_category.get(int(c), ())}
      if rel:
        split.append(Query(key=keys[i], item=keys[i], relevant=tuple(sorted(rel))))
      else:
        dropped += 1
    queries[name] = tuple(split)
  return Corpus(
    indexed=tuple(keys[i] for i in indexed),
    queries=queries,
    source=_source(
      source, num_items=num_items, seed=seed, relevance="category", dropped_queries=dropped
    ),
  )


def caption_corpus(
  keys: Sequence[str],
  captions: Sequence[Sequence[str]],
  *,
  num_items: int | None = None,
  captions_per_split: Sequence[int] = (3, 1, 1),
  seed: int = 0,
  source: Mapping[str, Any] | None = None,
) -> Corpus:
  """Every sampled image is indexed; its captions are queries (3 train, 1 val, 1 test).

  A caption's relevant item is its own image. Images with fewer captions than
  `sum(captions_per_split)` give what they have, train first.
  """
  keys = list(keys)
  if len(keys) != len(captions):
    raise ValueError(f"{len(keys)} images but {len(captions)} caption lists")
  _check_keys(keys)
  num_items = _check_size(num_items, len(keys), "images")
  rng = np.random.default_rng(seed)
  chosen = sorted(rng.choice(len(keys), size=num_items, replace=False).tolist())
  queries: dict[str, list[Query]] = {name: [] for name in QUERY_SPLITS}
  bounds = np.cumsum([0, *captions_per_split])
  for i in chosen:
    caps = list(captions[i])
    for name, lo, hi in zip(QUERY_SPLITS, bounds[:-1], bounds[1:]):
      for j in range(lo, min(hi, len(caps))):
        queries[name].append(Query(key=f"{keys[i]}#{j}", text=caps[j], relevant=(keys[i],)))
  return Corpus(
    indexed=tuple(keys[i] for i in chosen),
    queries={name: tuple(qs) for name, qs in queries.items()},
    source=_source(source, num_items=num_items, seed=seed, relevance="own image"),
  )


def qa_corpus(
  keys: Sequence[str],
  questions: Sequence[Sequence[tuple[str, str]]],
  *,
  num_items: int | None = None,
  query_splits: Sequence[float] = (0.8, 0.1, 0.1),
  seed: int = 0,
  source: Mapping[str, Any] | None = None,
) -> Corpus:
  """Documents are indexed; each document's questions `(id, text)` are split 0.8/0.1/0.1."""
  keys = list(keys)
  if len(keys) != len(questions):
    raise ValueError(f"{len(keys)} documents but {len(questions)} question lists")
  _check_keys(keys)
  num_items = _check_size(num_items, len(keys), "documents")
  _check_fractions(0.5, query_splits)
  rng = np.random.default_rng(seed)
  chosen = sorted(rng.choice(len(keys), size=num_items, replace=False).tolist())
  queries: dict[str, list[Query]] = {name: [] for name in QUERY_SPLITS}
  for i in chosen:
    qs = list(questions[i])
    order = rng.permutation(len(qs))
    bounds = np.cumsum([0, *split_counts(len(qs), query_splits)])
    for name, lo, hi in zip(QUERY_SPLITS, bounds[:-1], bounds[1:]):
      for j in sorted(order[lo:hi].tolist()):
        qid, text = qs[j]
        queries[name].append(Query(key=str(qid), text=text, relevant=(keys[i],)))
  return Corpus(
    indexed=tuple(keys[i] for i in chosen),
    queries={name: tuple(qs) for name, qs in queries.items()},
    source=_source(source, num_items=num_items, seed=seed, relevance="own paragraph"),
  )


def _source(source: Mapping[str, Any] | None, **fields) -> dict[str, Any]:
  return {**(source or {}), **fields}
