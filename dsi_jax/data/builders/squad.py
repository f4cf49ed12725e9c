"""`dsi_squad`: SQuAD v1.1 paragraphs (the documents) with their questions (the queries).

Source: a SQuAD v1.1 JSON file (`{"data": [{"title", "paragraphs": [{"context", "qas":
[{"id", "question", ...}]}]}]}`), or a folder of them. Each file is one split, named after the
file: a name containing "train" gives `train`, "dev" or "val" gives `validation`, "test" gives
`test` (the official `train-v1.1.json` and `dev-v1.1.json`, or `squad_v1.1_dev.json`).

One example per paragraph, in file order: `key` (`<title>/<paragraph index within the
article>`), `title`, `text` (the paragraph), `questions` (`{"id", "question"}` in file order;
answers are not kept).
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from dsi_jax.data.builders import base


def split_of(path: str) -> str:
  """The split a SQuAD file holds, from its name ("train", "dev"/"val", "test")."""
  name = os.path.basename(path).lower()
  for marker, split in (("train", "train"), ("dev", "validation"), ("val", "validation")):
    if marker in name:
      return split
  if "test" in name:
    return "test"
  raise ValueError(f"{path}: cannot tell the split from the file name (train, dev, val, test)")


def read_squad(path: str) -> list[tuple[str, str, str, list[dict[str, str]]]]:
  """Reads a SQuAD v1.1 file: `[(key, title, paragraph, [{"id", "question"}])]` in file order.

  Raises:
    ValueError: If the file is not JSON or lacks `data`, `paragraphs`, `context`, `qas`, or a
      question's `id` or `question`.
  """
  data = base.read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise ValueError(f"{path}: not a SQuAD file, missing the list 'data'")
  paragraphs = []
  for a, article in enumerate(data["data"]):
    if not isinstance(article, dict) or "paragraphs" not in article:
      raise ValueError(f"{path}: data[{a}] lacks 'paragraphs'")
    title = str(article.get("title", f"article-{a}"))
    for p, paragraph in enumerate(article["paragraphs"]):
      where = f"{path}: data[{a}].paragraphs[{p}]"
      if not isinstance(paragraph, dict) or "context" not in paragraph or "qas" not in paragraph:
        raise ValueError(f"{where} lacks 'context' or 'qas'")
      questions = []
      for q, qa in enumerate(paragraph["qas"]):
        if not isinstance(qa, dict) or "id" not in qa or "question" not in qa:
          raise ValueError(f"{where}.qas[{q}] lacks 'id' or 'question'")
        questions.append({"id": str(qa["id"]), "question": str(qa["question"])})
      paragraphs.append((f"{title}/{p}", title, str(paragraph["context"]), questions))
  return paragraphs


class DsiSquad(base.LocalBuilder):
  """SQuAD v1.1: one example per paragraph, with the questions asked about it."""

  name = "dsi_squad"
  SOURCE_MAY_BE_FILE = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Point `source=` at a SQuAD v1.1 JSON file (train-v1.1.json, dev-v1.1.json), or `source=` /
  `manual_dir` at a folder of them.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="SQuAD v1.1 paragraphs and their questions, from local JSON files.",
      features=tfds.features.FeaturesDict(
        {
          "key": tfds.features.Tensor(shape=(), dtype=tf.string, doc="<title>/<paragraph>"),
          "title": tfds.features.Text(),
          "text": tfds.features.Text(doc="the paragraph"),
          "questions": tfds.features.Sequence(
            {
              "id": tfds.features.Tensor(shape=(), dtype=tf.string),
              "question": tfds.features.Text(),
            }
          ),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
      homepage="https://rajpurkar.github.io/SQuAD-explorer/",
      license="CC BY-SA 4.0",
    )

  def _source_splits(self, source: str) -> dict[str, dict[str, Any]]:
    if os.path.isdir(source):
      paths = sorted(
        os.path.join(source, name) for name in os.listdir(source) if name.endswith(".json")
      )
      if not paths:
        raise FileNotFoundError(f"{source}: no SQuAD .json file")
    else:
      paths = [source]
    splits: dict[str, dict[str, Any]] = {}
    for path in paths:
      split = split_of(path)
      if split in splits:
        raise ValueError(
          f"{path}: split {split} also comes from {splits[split]['annotation_file']}"
        )
      splits[split] = {"annotation_file": path}
    return splits

  def _generate_examples(self, annotation_file: str):
    for key, title, text, questions in read_squad(annotation_file):
      yield key, {"key": key, "title": title, "text": text, "questions": questions}
