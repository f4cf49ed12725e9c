"""Document ids: a map from item keys to token sequences in a small id vocabulary.

Token 0 is padding, token 1 is end-of-id (eos), and tokens 2 ... num_codes + 1 are the
codes of an id position. An id is a sequence of codes; ids may differ in length (eos marks
the end, so "12" and "123" are distinct ids). On disk the map is a JSON file holding the
codes, so that `"ids": {"img-000123": [3, 0, 7]}` reads as id "307".

Schemes:
  random:    a random permutation of 0 ... N-1 written in base `num_codes`, fixed length.
  clustered: items of the same class get consecutive numbers, fixed length.
  atomic:    one token per item (the decoder's output layer has a row per item; decoding is a
             top-k over it).
  naive:     the item's arbitrary number (its position) as a plain digit string, so ids differ
             in length ("7", "42", "1305"); the DSI paper's "naive string" ids.
  semantic:  hierarchical k-means over item embeddings (DSI): k clusters per level, a cluster
             of at most c items is a leaf whose items are numbered at the last position; items
             with near-identical embeddings share a prefix. Ids differ in length.
  rq:        residual quantisation of the embeddings: `levels` codebooks of `codebook_size`
             codes, then a final token that separates items sharing all codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

PAD = 0
EOS = 1
NUM_SPECIAL = 2
FORMAT = "dsi_jax.docids/1"
SCHEMES = ("random", "clustered", "atomic", "naive", "semantic", "rq")


@dataclasses.dataclass(frozen=True)
class DocidMap:
  """Item keys and their ids (codes, without the special tokens).

  Attributes:
    scheme: how the ids were made ("random", "clustered", ...).
    num_codes: codes per id position; the id vocabulary has `num_codes + 2` tokens.
    keys: item keys, in the order of `codes`.
    codes: per item, its id as a tuple of codes in [0, num_codes).
  """

  scheme: str
  num_codes: int
  keys: tuple[str, ...]
  codes: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    _validate(self.keys, self.codes, self.num_codes, where="DocidMap")

  @property
  def vocab_size(self) -> int:
    return self.num_codes + NUM_SPECIAL

  @property
  def max_length(self) -> int:
    """Longest id in tokens, eos included."""
    return max(len(c) for c in self.codes) + 1

  def __len__(self) -> int:
    return len(self.keys)

  def index(self, key: str) -> int:
    """Row of `key` in `keys` (the item index used by tries and rankings)."""
    return self._index[key]

  @property
  def _index(self) -> dict[str, int]:
    cached = self.__dict__.get("_index_cache")
    if cached is None:
      cached = {k: i for i, k in enumerate(self.keys)}
      object.__setattr__(self, "_index_cache", cached)
    return cached

  def id_string(self, key: str) -> str:
    """Human-readable id, e.g. "3-0-7" (codes joined by "-")."""
    return "-".join(str(c) for c in self.codes[self.index(key)])

  def targets(self, keys: Sequence[str] | None = None) -> np.ndarray:
    """Decoder targets: `[num_keys, max_length]` int32 tokens, eos then pad."""
    rows = range(len(self)) if keys is None else [self.index(k) for k in keys]
    out = np.full((len(rows), self.max_length), PAD, dtype=np.int32)
    for r, i in enumerate(rows):
      c = self.codes[i]
      out[r, : len(c)] = np.asarray(c) + NUM_SPECIAL
      out[r, len(c)] = EOS
    return out

  def to_json(self) -> dict:
    return {
      "format": FORMAT,
      "scheme": self.scheme,
      "num_codes": self.num_codes,
      "ids": {k: list(c) for k, c in zip(self.keys, self.codes)},
    }

  def sha256(self) -> str:
    """Hash of the map's content (scheme, codes and every key's id), recorded by a run."""
    return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

  def save(self, path: str | os.PathLike) -> None:
    """Writes the map as JSON atomically (temp file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".docids-", suffix=".tmp")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(self.to_json(), f)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise

  @classmethod
  def load(cls, path: str | os.PathLike) -> DocidMap:
    """Reads and validates a map written by `save`; raises ValueError naming the file."""
    path = os.fspath(path)

    def no_duplicates(pairs):
      seen = {}
      for k, v in pairs:
        if k in seen:
          raise ValueError(f"{path}: key {k!r} appears more than once")
        seen[k] = v
      return seen

    try:
      with open(path) as f:
        data = json.load(f, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not a JSON docid map ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
      raise ValueError(f"{path}: not a docid map (expected format {FORMAT!r})")
    for field in ("scheme", "num_codes", "ids"):
      if field not in data:
        raise ValueError(f"{path}: missing field {field!r}")
    ids = data["ids"]
    if not isinstance(ids, dict):
      raise ValueError(f"{path}: 'ids' must map item keys to lists of codes")
    keys = tuple(ids)
    codes = []
    for k in keys:
      c = ids[k]
      if not isinstance(c, list) or not all(isinstance(x, int) for x in c):
        raise ValueError(f"{path}: id of {k!r} must be a list of integer codes, got {c!r}")
      codes.append(tuple(c))
    num_codes = data["num_codes"]
    if not isinstance(num_codes, int) or num_codes < 1:
      raise ValueError(f"{path}: num_codes must be a positive integer, got {num_codes!r}")
    _validate(keys, codes, num_codes, where=path)
    return cls(scheme=str(data["scheme"]), num_codes=num_codes, keys=keys, codes=tuple(codes))


def _validate(keys, codes, num_codes: int, *, where: str) -> None:
  if len(keys) != len(codes):
    raise ValueError(f"{where}: {len(keys)} keys but {len(codes)} ids")
  if not keys:
    raise ValueError(f"{where}: empty docid map")
  if len(set(keys)) != len(keys):
    dup = next(k for k in keys if keys.count(k) > 1)
    raise ValueError(f"{where}: key {dup!r} appears more than once")
  seen: dict[tuple[int, ...], str] = {}
  for k, c in zip(keys, codes):
    if not c:
      raise ValueError(f"{where}: id of {k!r} is empty")
    bad = [x for x in c if not 0 <= x < num_codes]
    if bad:
      raise ValueError(f"{where}: id of {k!r} has unknown code {bad[0]} (num_codes={num_codes})")
    if c in seen:
      raise ValueError(f"{where}: {k!r} and {seen[c]!r} share the id {list(c)}")
    seen[c] = k


def _digits(numbers: np.ndarray, base: int, length: int) -> list[tuple[int, ...]]:
  out = np.zeros((len(numbers), length), dtype=np.int64)
  n = numbers.copy()
  for pos in range(length - 1, -1, -1):
    out[:, pos] = n % base
    n //= base
  return [tuple(int(x) for x in row) for row in out]


def _fixed_length(n: int, base: int) -> int:
  return max(1, math.ceil(math.log(n, base) - 1e-9)) if n > 1 else 1


def random_ids(keys: Sequence[str], *, num_codes: int = 10, seed: int = 0) -> DocidMap:
  """Dense random ids: item i gets a random number in [0, N), written in `num_codes` digits."""
  if num_codes < 2:
    raise ValueError(f"num_codes must be >= 2, got {num_codes}")
  numbers = np.random.default_rng(seed).permutation(len(keys))
  length = _fixed_length(len(keys), num_codes)
  return DocidMap("random", num_codes, tuple(keys), tuple(_digits(numbers, num_codes, length)))


def clustered_ids(
  keys: Sequence[str], labels: Sequence[int] | np.ndarray, *, num_codes: int = 10, seed: int = 0
) -> DocidMap:
  """Ids numbered class by class: items of one class get consecutive numbers.

  Classes are taken in sorted order; within a class the order is random (seeded).
  """
  labels = np.asarray(labels)
  if len(labels) != len(keys):
    raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
  if num_codes < 2:
    raise ValueError(f"num_codes must be >= 2, got {num_codes}")
  rng = np.random.default_rng(seed)
  tiebreak = rng.permutation(len(keys))
  order = np.lexsort((tiebreak, labels))  # by label, then random
  numbers = np.empty(len(keys), dtype=np.int64)
  numbers[order] = np.arange(len(keys))
  length = _fixed_length(len(keys), num_codes)
  return DocidMap("clustered", num_codes, tuple(keys), tuple(_digits(numbers, num_codes, length)))


def atomic_ids(keys: Sequence[str]) -> DocidMap:
  """One code per item: item i is the single token i (vocabulary of N + 2 tokens)."""
  return DocidMap("atomic", max(len(keys), 1), tuple(keys), tuple((i,) for i in range(len(keys))))


def naive_ids(keys: Sequence[str], *, num_codes: int = 10) -> DocidMap:
  """Item i gets the digits of i in base `num_codes`, without leading zeros (variable length)."""
  if num_codes < 2:
    raise ValueError(f"num_codes must be >= 2, got {num_codes}")
  codes = []
  for i in range(len(keys)):
    digits = []
    while True:
      i, d = divmod(i, num_codes)
      digits.append(d)
      if i == 0:
        break
    codes.append(tuple(reversed(digits)))
  return DocidMap("naive", num_codes, tuple(keys), tuple(codes))


def _check_embeddings(keys: Sequence[str], embeddings) -> np.ndarray:
  x = np.asarray(embeddings, dtype=np.float32)
  if x.ndim != 2 or len(x) != len(keys):
    raise ValueError(f"embeddings must be [num_items={len(keys)}, dim], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("embeddings contain NaN or infinite values")
  return x


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Cluster labels of the rows of `x` (scikit-learn k-means; fewer clusters if few points)."""
  from sklearn.cluster import KMeans

  k = min(k, len(np.unique(x, axis=0)))
  if k < 2:
    return np.zeros(len(x), dtype=np.int64)
  return KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(x).astype(np.int64)


def semantic_ids(
  keys: Sequence[str],
  embeddings,
  *,
  k: int = 10,
  c: int = 100,
  seed: int = 0,
) -> DocidMap:
  """Hierarchical k-means ids (DSI): `k` clusters per level, leaves of at most `c` items.

  An item's id is the path of cluster numbers down to its leaf, then its number within the
  leaf. Codes run up to max(k, c), so the vocabulary has `max(k, c) + 2` tokens. Clusters that
  k-means cannot split (identical embeddings) are split by position, so every id is distinct.
  """
  if k < 2 or c < 1:
    raise ValueError(f"semantic ids need k >= 2 and c >= 1, got k={k}, c={c}")
  x = _check_embeddings(keys, embeddings)
  codes: list[tuple[int, ...] | None] = [None] * len(keys)

  def assign(rows: np.ndarray, prefix: tuple[int, ...], depth: int) -> None:
    if len(rows) <= c:
      for j, r in enumerate(rows):
        codes[r] = (*prefix, j)
      return
    labels = _kmeans(x[rows], k, seed + depth)
    if len(np.unique(labels)) < 2:  # cannot split by content: split by position
      labels = np.arange(len(rows)) * k // len(rows)
    for cluster in np.unique(labels):
      assign(rows[labels == cluster], (*prefix, int(cluster)), depth + 1)

  assign(np.arange(len(keys)), (), 0)
  return DocidMap("semantic", max(k, c), tuple(keys), tuple(codes))


def rq_ids(
  keys: Sequence[str],
  embeddings,
  *,
  levels: int = 3,
  codebook_size: int = 256,
  seed: int = 0,
) -> DocidMap:
  """Residual-quantisation ids: one k-means codebook per level on the residuals, then a token
  numbering the items that share all `levels` codes (0 for the first, 1 for the next, ...)."""
  if levels < 1 or codebook_size < 2:
    raise ValueError(
      f"rq ids need levels >= 1 and codebook_size >= 2, got {levels}, {codebook_size}"
    )
  residual = _check_embeddings(keys, embeddings).copy()
  from sklearn.cluster import KMeans

  code_columns = []
  for level in range(levels):
    k = min(codebook_size, len(np.unique(residual, axis=0)))
    if k < 2:
      code_columns.append(np.zeros(len(keys), dtype=np.int64))
      continue
    km = KMeans(n_clusters=k, n_init=1, random_state=seed + level).fit(residual)
    code_columns.append(km.labels_.astype(np.int64))
    residual = residual - km.cluster_centers_[km.labels_]
  prefixes = np.stack(code_columns, axis=1)
  seen: dict[tuple[int, ...], int] = {}
  codes = []
  for row in prefixes:
    prefix = tuple(int(v) for v in row)
    n = seen.get(prefix, 0)
    seen[prefix] = n + 1
    codes.append((*prefix, n))
  num_codes = max(codebook_size, max(seen.values()))
  return DocidMap("rq", num_codes, tuple(keys), tuple(codes))


def make_docids(
  scheme: str,
  keys: Sequence[str],
  *,
  labels: Sequence[int] | np.ndarray | None = None,
  embeddings=None,
  num_codes: int = 10,
  seed: int = 0,
) -> DocidMap:
  """Builds a DocidMap with the named scheme (`labels` for clustered, `embeddings` for
  semantic and rq)."""
  if scheme == "random":
    return random_ids(keys, num_codes=num_codes, seed=seed)
  if scheme == "naive":
    return naive_ids(keys, num_codes=num_codes)
  if scheme == "atomic":
    return atomic_ids(keys)
  if scheme == "clustered":
    if labels is None:
      raise ValueError("the 'clustered' id scheme needs class labels")
    return clustered_ids(keys, labels, num_codes=num_codes, seed=seed)
  if scheme in ("semantic", "rq"):
    if embeddings is None:
      raise ValueError(f"the {scheme!r} id scheme needs item embeddings")
    if scheme == "semantic":
      return semantic_ids(keys, embeddings, k=num_codes, seed=seed)
    return rq_ids(keys, embeddings, seed=seed)
  raise ValueError(f"unknown docid scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def from_mapping(
  ids: Mapping[str, Sequence[int]], *, num_codes: int, scheme: str = "custom"
) -> DocidMap:
  """A DocidMap from explicit codes, e.g. `{"a": [0, 1], "b": [2]}`."""
  return DocidMap(
    scheme, num_codes, tuple(ids), tuple(tuple(int(x) for x in c) for c in ids.values())
  )


def extend_ids(
  old: DocidMap,
  keys: Sequence[str],
  *,
  embeddings=None,
  old_embeddings=None,
  seed: int = 0,
) -> DocidMap:
  """`old` with ids for the new `keys`, no old id changed (an index that grows).

  atomic: the next numbers (the vocabulary grows by one token per item). random: numbers not
  yet used, of the same length, drawn at random. semantic: the leaf of the old item nearest by
  cosine over `embeddings` / `old_embeddings`, with its first free last code (the next nearest
  item's leaf where that one is full). Raises ValueError where a scheme has no room left.
  """
  keys = list(keys)
  clash = sorted(set(keys) & set(old.keys)) or sorted(k for k in set(keys) if keys.count(k) > 1)
  if clash:
    raise ValueError(f"key {clash[0]!r} already has an id")
  if old.scheme == "atomic":
    return atomic_ids([*old.keys, *keys])
  used = set(old.codes)
  new: list[tuple[int, ...]] = []
  if old.scheme == "random":
    length = len(old.codes[0])
    capacity = old.num_codes**length
    taken = {sum(d * old.num_codes ** (length - 1 - i) for i, d in enumerate(c)) for c in used}
    free = np.setdiff1d(np.arange(capacity), np.fromiter(taken, np.int64))
    if len(free) < len(keys):
      raise ValueError(
        f"random ids of {length} digits hold {capacity} items; {len(old)} + {len(keys)} do not fit"
      )
    numbers = np.random.default_rng(seed).choice(free, size=len(keys), replace=False)
    new = _digits(numbers, old.num_codes, length)
  elif old.scheme == "semantic":
    x = _check_embeddings(keys, embeddings)
    y = _check_embeddings(old.keys, old_embeddings)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    leaves = [c[:-1] for c in old.codes]
    for row in x:
      for j in np.argsort(-(y @ row), kind="stable"):
        prefix = leaves[j]
        free = [s for s in range(old.num_codes) if (*prefix, s) not in used]
        if free:
          new.append((*prefix, free[0]))
          used.add(new[-1])
          break
      else:
        raise ValueError(f"every leaf of the semantic ids is full ({old.num_codes} codes each)")
  else:
    raise ValueError(f"items cannot be added to {old.scheme} ids")
  return DocidMap(old.scheme, old.num_codes, (*old.keys, *keys), (*old.codes, *new))
