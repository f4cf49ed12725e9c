"""Text DSI on SQuAD v1.1 dev (the original DSI setting): paragraphs -> ids, questions -> ids.

The corpus is the `dsi_jax_squad_<ids>` SeqIO task (2,067 paragraphs; each paragraph's questions
split 0.8 / 0.1 / 0.1). Indexing examples are the first 64 MiniLM word pieces of each paragraph;
retrieval examples are the questions. The model is the borrowed all-MiniLM-L6-v2 encoder with a
fresh docid decoder (`make_minilm_dsi`), trained by `train_dsi` (indexing, then retrieval mixed
with indexing). Baselines on the same test questions: BM25 and the zero-shot MiniLM dual
encoder (cosine of mean-pooled embeddings).

`export` writes the arrays a run needs (`arrays.npz` + `docids.json`), read through the tasks;
`run` trains from such a folder, so training can happen on a machine with JAX but without the
data stack (TensorFlow, SeqIO).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import numpy as np

from dsi_jax import docids as docids_lib
from dsi_jax import metrics as metrics_lib
from dsi_jax import train as train_lib

TEXT_LENGTH = 64
SCHEMES = ("atomic", "naive", "random", "semantic", "rq")
SPLITS = ("train", "val", "test")


MODELS = ("minilm", "t5")  # MiniLM word pieces + MiniLM-DSI; SentencePiece + T5-DSI from scratch


def export(
  scheme: str, out_dir: str, *, text_length: int = TEXT_LENGTH, model: str = "minilm"
) -> str:
  """Reads the SQuAD tasks of `scheme` and saves their arrays in `out_dir`; returns it.

  model: "minilm" (MiniLM word pieces) or "t5" (the corpus's SentencePiece pieces, the
  `dsi_jax_squad_<scheme>_spm` tasks).
  """
  import seqio

  from dsi_jax import tasks

  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
  name = f"dsi_jax_squad_{scheme}" + ("_spm" if model == "t5" else "")
  data, docids = tasks.retrieval_data(name, text_length=text_length)
  corpus = tasks.corpus_data(name)
  vocab = seqio.get_mixture_or_task(f"{name}_indexing").output_features["inputs"].vocabulary
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "model.json"), "w") as f:
    json.dump({"model": model, "vocab_size": vocab.vocab_size, "pad_id": 0}, f)
  arrays = {"index_inputs": data.index_inputs}
  for split in SPLITS:
    relevant = getattr(data, f"{split}_relevant")
    arrays[f"{split}_inputs"] = getattr(data, f"{split}_inputs")
    arrays[f"{split}_relevant"] = np.concatenate(relevant).astype(np.int32)
    arrays[f"{split}_relevant_counts"] = np.asarray([len(r) for r in relevant], np.int32)
  np.savez_compressed(os.path.join(out_dir, "arrays.npz"), **arrays)
  docids.save(os.path.join(out_dir, "docids.json"))
  with open(os.path.join(out_dir, "texts.json"), "w") as f:  # for the baselines
    json.dump(
      {
        "documents": [corpus.texts[k] for k in corpus.corpus.indexed],
        "test_questions": [q.text for q in corpus.corpus.split("test")],
      },
      f,
    )
  return out_dir


def load_arrays(folder: str) -> tuple[train_lib.RetrievalData, docids_lib.DocidMap]:
  """The arrays and ids written by `export` (plain .npz and JSON; no pickle)."""
  with np.load(os.path.join(folder, "arrays.npz"), allow_pickle=False) as z:
    fields = {"index_inputs": z["index_inputs"]}
    for split in SPLITS:
      counts = z[f"{split}_relevant_counts"]
      fields[f"{split}_inputs"] = z[f"{split}_inputs"]
      fields[f"{split}_relevant"] = np.split(z[f"{split}_relevant"], np.cumsum(counts)[:-1])
  return train_lib.RetrievalData(**fields), docids_lib.DocidMap.load(
    os.path.join(folder, "docids.json")
  )


def run(
  folder: str,
  workdir: str | None = None,
  *,
  config: train_lib.TrainConfig | None = None,
  minilm_path: str | None = None,
  show_progress: bool = True,
  max_eval_queries: int | None = None,
  t5_sizes: dict | None = None,
  frozen_encoder: bool = False,
) -> list[dict[str, Any]]:
  """Trains MiniLM-DSI (or T5-DSI, for a folder exported with `model="t5"`) on an exported
  folder; returns result rows (zero-shot and fine-tuned).

  `max_eval_queries` keeps only the first validation and test questions (smoke runs);
  `t5_sizes` override `dsi.T5_DSI_DEFAULTS` (T5.1.1 small); `frozen_encoder` keeps MiniLM
  frozen and trains the docid decoder on its outputs, computed once (what a CPU can afford).
  """
  from dsi_jax.models import dsi

  data, docids = load_arrays(folder)
  meta_path = os.path.join(folder, "model.json")
  meta = {"model": "minilm"}
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  if max_eval_queries is not None:
    for split in ("val", "test"):
      setattr(data, f"{split}_inputs", getattr(data, f"{split}_inputs")[:max_eval_queries])
      setattr(data, f"{split}_relevant", getattr(data, f"{split}_relevant")[:max_eval_queries])
  if meta["model"] == "t5":
    sizes = {**dsi.T5_DSI_DEFAULTS, **(t5_sizes or {})}
    network = dsi.make_t5_dsi(docids, vocab_size=meta["vocab_size"], pad_id=meta["pad_id"], **sizes)
    model = dsi.DSIModel(network, docids)
  else:
    model, _ = dsi.make_minilm_dsi(docids, path=minilm_path, frozen=frozen_encoder)
    if frozen_encoder:
      data = _encoded(data, model.input_encoder, show_progress)
  config = config or train_lib.TrainConfig()
  t0 = time.time()
  result = train_lib.train_dsi(
    model, data, config=config, workdir=workdir, show_progress=show_progress
  )
  rows = train_lib.result_rows(
    result,
    ("hits@1", "hits@10", "mrr@10"),
    model=f"{meta['model']}_dsi" + ("_frozen_encoder" if frozen_encoder else ""),
    dataset="squad_v1.1_dev",
    db_size=len(docids),
    ids=docids.scheme,
    num_queries=len(data.test_inputs),
  )
  rows[-1]["total_seconds"] = round(time.time() - t0, 1)
  return rows


_ENCODED: dict[str, np.ndarray] = {}  # token arrays -> encoder outputs, shared by the schemes


def _encoded(data: train_lib.RetrievalData, encode, show_progress: bool) -> train_lib.RetrievalData:
  """`data` with every token array replaced by the frozen encoder's outputs (computed once per
  distinct array in this process: all schemes share the same texts)."""
  out = dataclasses.replace(data)
  for field in ("index_inputs", "train_inputs", "val_inputs", "test_inputs"):
    tokens = getattr(data, field)
    key = hashlib.sha256(tokens.tobytes() + str(tokens.shape).encode()).hexdigest()
    if key not in _ENCODED:
      if len(_ENCODED) >= 8:
        _ENCODED.clear()
      _ENCODED[key] = encode(tokens, show_progress=show_progress)
    setattr(out, field, _ENCODED[key])
  return out


def baseline_rows(folder: str, *, minilm_path: str | None = None) -> list[dict[str, Any]]:
  """BM25 and the zero-shot MiniLM dual encoder on the exported test questions."""
  from dsi_jax.baselines.bm25 import BM25
  from dsi_jax.models import text

  data, docids = load_arrays(folder)
  with open(os.path.join(folder, "texts.json")) as f:
    texts = json.load(f)
  keys = list(docids.keys)
  relevant = [{keys[i] for i in r} for r in data.test_relevant]
  rows = []
  t0 = time.time()
  ranked, _ = BM25(texts["documents"], keys).search(texts["test_questions"], 10)
  rows.append(("bm25", ranked, time.time() - t0))
  t0 = time.time()
  model, params, tokenizer = text.load_minilm(minilm_path)
  docs = text.embed_texts(model, params, tokenizer, texts["documents"])
  questions = text.embed_texts(model, params, tokenizer, texts["test_questions"])
  order = np.argsort(-(questions @ docs.T), axis=1, kind="stable")[:, :10]
  rows.append(("minilm_dual_encoder", [[keys[j] for j in row] for row in order], time.time() - t0))
  out = []
  for name, ranked, seconds in rows:
    out.append(
      {
        "model": name,
        "setting": "zero_shot",
        "dataset": "squad_v1.1_dev",
        "db_size": len(keys),
        "ids": None,
        "num_queries": len(relevant),
        **metrics_lib.compute_metrics(ranked, relevant, ["hits@1", "hits@10", "mrr@10"]),
        "seconds": round(seconds, 1),
      }
    )
  return out


def default_config(quick: bool = False, model: str = "minilm") -> train_lib.TrainConfig:
  """Two-phase training for the 2,067-paragraph corpus (smaller caps with `quick`).

  Query rankings come from a 10-beam constrained search (MAP@10, Hits@1, Hits@10, MRR@10 need
  the top 10 only). MiniLM's pretrained encoder trains at 0.1 x the rate of the fresh decoder
  (at 3e-4 a borrowed MiniLM tower collapsed in CLIP-DSI); T5-DSI trains from scratch at one
  rate.
  """
  common = dict(ranking="beam", eval_metrics=("map@10", "hits@1", "hits@10", "mrr@10"))
  if quick:
    return train_lib.TrainConfig(
      batch_size=16,
      index_max_steps=20,
      index_eval_every=10,
      finetune_max_steps=10,
      finetune_eval_every=10,
      eval_batch_size=64,
      **common,
    )
  return train_lib.TrainConfig(
    batch_size=64,
    learning_rate=3e-4,
    lr_multipliers=(("encoder", 0.1),) if model == "minilm" else (),
    index_max_steps=6000,
    index_eval_every=250,
    finetune_max_steps=4000,
    finetune_eval_every=250,
    patience=4,
    eval_batch_size=256,
    **common,
  )
