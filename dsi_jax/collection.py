"""A user's own collection, read from where it lies: a folder of images or a JSONL of texts.

`read_collection(source)` accepts
- a folder of images (every file OpenCV reads: JPEG, PNG, BMP, TIFF, WebP, ..., any size,
  gray, RGB or RGBA, in sub-folders too), keyed by their path relative to the folder, with
  optional captions in `captions.csv` or `captions.txt` (`image,caption` lines; a header line
  `image,caption` is skipped; several lines per image give several captions; an image is
  named by its path in the folder or, where no other image has it, by its file name alone, as
  in Flickr8k's `captions.txt` beside `Images/`);
- a JSONL file of documents, one `{"id": ..., "text": ..., "queries": [...]}` per line
  (`queries` optional: known questions about the document, used as training queries).

A file that cannot be read is reported in one warning line and skipped; an empty collection,
a duplicate key, or a malformed line is a one-line `UserError` naming the file and line.

Pseudo-queries (`text_spans`): random spans of a document's word pieces ("document as
query", NCI), so a collection of texts without questions can still be trained to retrieve.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from dsi_jax.errors import UserError

log = logging.getLogger(__name__)

CAPTION_FILES = ("captions.csv", "captions.txt")
KINDS = ("images", "texts")


@dataclasses.dataclass(frozen=True)
class Collection:
  """What a source holds.

  kind: "images" or "texts".
  keys: one per item, unique.
  root: the images' folder (`paths` are relative to it); None for texts.
  texts: per key, the document's text (texts) or "" (images).
  queries: per key, known queries: captions of an image, questions about a document.
  skipped: files that could not be read (path, reason).
  """

  kind: str
  keys: tuple[str, ...]
  root: str | None = None
  texts: tuple[str, ...] = ()
  queries: tuple[tuple[str, ...], ...] = ()
  skipped: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown collection kind {self.kind!r}; known: {', '.join(KINDS)}")
    if len(self.texts) != len(self.keys) or len(self.queries) != len(self.keys):
      raise ValueError("a collection needs one text and one query list per key")

  def __len__(self) -> int:
    return len(self.keys)

  def path(self, key: str) -> str:
    """The image file of `key` (image collections)."""
    if self.root is None:
      raise ValueError("a collection of texts has no files")
    return os.path.join(self.root, key)


def read_collection(source: str) -> Collection:
  """Reads a folder of images or a JSONL of documents (see the module docstring)."""
  source = os.fspath(source)
  if os.path.isdir(source):
    return _read_images(source)
  if os.path.isfile(source):
    return _read_jsonl(source)
  raise UserError(f"{source}: no such folder of images or JSONL file")


def _read_images(folder: str) -> Collection:
  from dsi_jax.data import images

  found, skipped = [], []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
      if name.startswith(".") or rel in CAPTION_FILES:
        continue
      path = os.path.join(root, name)
      try:
        with open(path, "rb") as f:
          head = f.read()
        images.decode_image(head, source=rel)
      except (OSError, ValueError) as e:
        reason = str(e).removeprefix(f"{rel}: ")
        log.warning("%s: skipped, %s", path, reason)
        skipped.append((rel, reason))
        continue
      found.append(rel)
  if not found:
    raise UserError(f"{folder}: no readable images in the folder")
  captions = _read_captions(folder, set(found), {rel for rel, _ in skipped})
  return Collection(
    "images",
    tuple(found),
    root=os.path.abspath(folder),
    texts=("",) * len(found),
    queries=tuple(tuple(captions.get(k, ())) for k in found),
    skipped=tuple(skipped),
  )


def _read_captions(folder: str, keys: set[str], skipped: set[str]) -> dict[str, list[str]]:
  present = [n for n in CAPTION_FILES if os.path.isfile(os.path.join(folder, n))]
  if len(present) > 1:
    raise UserError(f"{folder}: both {' and '.join(present)}; keep one")
  if not present:
    return {}
  path = os.path.join(folder, present[0])
  names: dict[str, list[str]] = {}  # file name -> keys (an image in a sub-folder)
  for key in [*keys, *skipped]:
    names.setdefault(os.path.basename(key), []).append(key)
  out: dict[str, list[str]] = {}
  with open(path, newline="", encoding="utf-8") as f:
    for line_no, row in enumerate(csv.reader(f), 1):
      if not row or not "".join(row).strip():
        continue
      if line_no == 1 and [c.strip().lower() for c in row] == ["image", "caption"]:
        continue
      if len(row) < 2 or not row[1].strip():
        raise UserError(f"{path}:{line_no}: expected 'image,caption', got {','.join(row)!r}")
      key, caption = row[0].strip(), ",".join(row[1:]).strip()
      if key not in keys and key not in skipped and len(names.get(key, ())) == 1:
        key = names[key][0]
      if key in skipped:
        continue
      if key not in keys and len(names.get(key, ())) > 1:
        which = ", ".join(sorted(names[key]))
        raise UserError(f"{path}:{line_no}: {key!r} names several images ({which}); give its path")
      if key not in keys:
        raise UserError(f"{path}:{line_no}: {key!r} is not a readable image of the folder")
      out.setdefault(key, []).append(caption)
  return out


def _read_jsonl(path: str) -> Collection:
  keys, texts, queries, seen = [], [], [], {}
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
  with f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{where}: not a JSON object ({e.msg})") from None
      if not isinstance(doc, dict) or "id" not in doc or "text" not in doc:
        raise UserError(f'{where}: expected {{"id": ..., "text": ...}}')
      key, text = doc["id"], doc["text"]
      if not isinstance(key, str | int) or isinstance(key, bool) or not str(key).strip():
        raise UserError(f"{where}: 'id' must be a non-empty string or an integer")
      key = str(key)
      if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: 'text' of {key!r} must be a non-empty string")
      qs = doc.get("queries", [])
      if not isinstance(qs, list) or not all(isinstance(q, str) and q.strip() for q in qs):
        raise UserError(f"{where}: 'queries' of {key!r} must be a list of non-empty strings")
      if key in seen:
        raise UserError(f"{where}: duplicate id {key!r} (first on line {seen[key]})")
      seen[key] = line_no
      keys.append(key)
      texts.append(text)
      queries.append(tuple(qs))
  if not keys:
    raise UserError(f"{path}: no documents in the file")
  return Collection("texts", tuple(keys), texts=tuple(texts), queries=tuple(queries))


def text_spans(
  token_ids: Sequence[int], count: int, rng: np.random.Generator, *, low: int = 8, high: int = 32
) -> list[list[int]]:
  """`count` random spans of `low`..`high` word pieces of a document (all of it when shorter):
  NCI's "document as query" pseudo-queries. Deterministic given `rng`."""
  n = len(token_ids)
  out = []
  for _ in range(count):
    length = min(n, int(rng.integers(low, high + 1)))
    start = int(rng.integers(0, n - length + 1))
    out.append(list(token_ids[start : start + length]))
  return out
