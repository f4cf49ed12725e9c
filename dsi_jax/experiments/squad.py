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
import json
import os
import time
from typing import Any

import numpy as np

from dsi_jax import batches, evaluation, results, runs
from dsi_jax import docids as docids_lib
from dsi_jax import train as train_lib
from dsi_jax.batches import RetrievalData

TEXT_LENGTH = 64
SCHEMES = ("atomic", "naive", "random", "semantic", "rq")
SPLITS = ("train", "val", "test")
METRICS = ("hits@1", "hits@10", "mrr@10")


MODELS = ("minilm", "t5")  # MiniLM word pieces + MiniLM-DSI; SentencePiece + T5-DSI from scratch


def export(
  scheme: str,
  out_dir: str,
  *,
  text_length: int = TEXT_LENGTH,
  model: str = "minilm",
  pseudo_queries=None,
) -> str:
  """Reads the SQuAD tasks of `scheme` and saves their arrays in `out_dir`; returns it.

  model: "minilm" (MiniLM word pieces) or "t5" (the corpus's SentencePiece pieces, the
  `dsi_jax_squad_<scheme>_spm` tasks).
  pseudo_queries: a `tasks.PseudoQueries`: each paragraph's sentences and word-piece spans
    follow the training questions (`tasks.add_pseudo_queries`).
  """
  import seqio

  from dsi_jax import tasks

  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
  name = f"dsi_jax_squad_{scheme}" + ("_spm" if model == "t5" else "")
  meta: dict[str, Any] = {"model": model, "pad_id": 0}
  if pseudo_queries is not None:
    tasks.add_pseudo_queries(name, pseudo_queries)
    meta["pseudo_queries"] = dataclasses.asdict(pseudo_queries)
  data, docids = tasks.retrieval_data(name, text_length=text_length)
  corpus = tasks.corpus_data(name)
  meta["num_pseudo_queries"] = len(data.train_inputs) - len(corpus.corpus.split("train"))
  vocab = seqio.get_mixture_or_task(f"{name}_indexing").output_features["inputs"].vocabulary
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "model.json"), "w") as f:
    json.dump({**meta, "vocab_size": vocab.vocab_size}, f)
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
        **{
          f"{split}_questions": [q.text for q in corpus.corpus.split(name)]
          for split, name in zip(SPLITS, ("train", "validation", "test"))
        },
      },
      f,
    )
  return out_dir


def load_meta(folder: str) -> dict[str, Any]:
  """The folder's `model.json` (which model's tokens; pseudo-queries, if any)."""
  path = os.path.join(folder, "model.json")
  if not os.path.isfile(path):
    return {"model": "minilm"}
  with open(path) as f:
    return json.load(f)


def load_arrays(folder: str) -> tuple[RetrievalData, docids_lib.DocidMap]:
  """The arrays and ids written by `export` (plain .npz and JSON; no pickle)."""
  with np.load(os.path.join(folder, "arrays.npz"), allow_pickle=False) as z:
    fields = {"index_inputs": z["index_inputs"]}
    for split in SPLITS:
      counts = z[f"{split}_relevant_counts"]
      fields[f"{split}_inputs"] = z[f"{split}_inputs"]
      fields[f"{split}_relevant"] = np.split(z[f"{split}_relevant"], np.cumsum(counts)[:-1])
  return RetrievalData(**fields), docids_lib.DocidMap.load(os.path.join(folder, "docids.json"))


@dataclasses.dataclass(frozen=True)
class SquadConfig:
  """One SQuAD DSI run on an exported folder.

  frozen_encoder: MiniLM stays frozen and the docid decoder trains on its outputs, computed
    once (what a CPU can afford).
  t5_sizes: overrides of `dsi.T5_DSI_DEFAULTS` (T5.1.1 small) for folders exported for T5.
  max_eval_queries: keep only the first validation and test questions (smoke runs).
  embedding_ids: atomic ids that start from MiniLM's paragraph embeddings (MiniLM-DSI only):
    step 0 ranks by the cosine of question and paragraph embeddings, indexing and fine-tuning
    improve on it.
  embedding_rows: where those embeddings come from: "index", the indexing input (the first
    64 word pieces); "paragraph" (frozen encoder), the whole paragraph as the dual encoder
    embeds it (up to 256 word pieces).
  teacher: "dual_encoder" (frozen encoder): the ranking loss (`train.rank_weight`) distils the
    zero-shot MiniLM dual encoder's scores of each training query (questions and
    pseudo-queries, mean-pooled MiniLM outputs) against whole-paragraph embeddings.
  """

  train: train_lib.TrainConfig = train_lib.TrainConfig()
  frozen_encoder: bool = False
  t5_sizes: dict | None = None
  max_eval_queries: int | None = None
  minilm_path: str | None = None
  embedding_ids: bool = False
  embedding_rows: str = "index"
  teacher: str | None = None

  def __post_init__(self):
    if (self.teacher is not None) != (self.train.rank_weight > 0):
      raise ValueError("SquadConfig.teacher and TrainConfig.rank_weight > 0 go together")
    if self.teacher not in (None, "dual_encoder"):
      raise ValueError(f"SquadConfig.teacher must be 'dual_encoder', not {self.teacher!r}")
    if self.teacher and not self.frozen_encoder:
      raise ValueError("SquadConfig.teacher needs the frozen encoder (its outputs embed queries)")
    if self.embedding_rows not in ("index", "paragraph"):
      raise ValueError(
        f"SquadConfig.embedding_rows must be 'index' or 'paragraph', not {self.embedding_rows!r}"
      )
    if self.embedding_ids and self.embedding_rows == "paragraph" and not self.frozen_encoder:
      raise ValueError("SquadConfig.embedding_rows='paragraph' needs the frozen encoder")


def model_spec(meta: dict, config: SquadConfig, text_length: int) -> runs.ModelSpec:
  """The run's spec: MiniLM-DSI (frozen or not) on MiniLM word pieces, or T5-DSI."""
  from dsi_jax.models import dsi

  ranking = {"method": config.train.ranking, "num_beams": 10}
  if config.embedding_ids and meta["model"] == "t5":
    raise ValueError("embedding_ids: ids start from MiniLM's embeddings (model minilm), not T5's")
  if meta["model"] == "t5":
    sizes = {**dsi.T5_DSI_DEFAULTS, **(config.t5_sizes or {})}
    kwargs = {"vocab_size": meta["vocab_size"], "pad_id": meta["pad_id"], **sizes}
    return runs.ModelSpec(
      "t5_dsi", kwargs, queries=("text",), text_length=text_length, ranking=ranking
    )
  kwargs = {"frozen": True} if config.frozen_encoder else {}
  if config.embedding_ids:
    kwargs["embedding_ids"] = True
  return runs.ModelSpec(
    "minilm_dsi",
    kwargs,
    queries=("text",),
    text_length=text_length,
    tokenizer="minilm",
    pretrained=("all-MiniLM-L6-v2",),
    ranking=ranking,
  )


def run(
  folder: str, workdir: str | None = None, *, config: SquadConfig, show_progress: bool = True
) -> list[dict[str, Any]]:
  """Trains MiniLM-DSI (or T5-DSI, for a folder exported with `model="t5"`) on an exported
  folder into `workdir` (a run folder `dsi-jax search` opens); returns result rows (zero-shot
  and fine-tuned)."""
  data, docids = load_arrays(folder)
  meta = load_meta(folder)
  if config.max_eval_queries is not None:
    n = config.max_eval_queries
    for split in ("val", "test"):
      setattr(data, f"{split}_inputs", getattr(data, f"{split}_inputs")[:n])
      setattr(data, f"{split}_relevant", getattr(data, f"{split}_relevant")[:n])
  spec = model_spec(meta, config, int(data.index_inputs.shape[1]))
  model, _ = runs.build_model(spec, docids, minilm_path=config.minilm_path)
  if config.frozen_encoder:
    data = batches.encode_data(
      data, model.input_encoder, encoder="all-MiniLM-L6-v2", show_progress=show_progress
    )
  embedding_rows, teacher = None, None
  if (config.embedding_ids and config.embedding_rows == "paragraph") or config.teacher:
    # each paragraph's embedding from its whole text (MiniLM reads up to 256 word pieces), as
    # the dual encoder ranks by; the indexing input keeps the first 64
    from dsi_jax.models import text

    with open(os.path.join(folder, "texts.json")) as f:
      documents = json.load(f)["documents"]
    vectors = text.embed_texts(*text.load_minilm(config.minilm_path), documents)
    if config.embedding_ids and config.embedding_rows == "paragraph":
      embedding_rows = (vectors[:, None, :], None)  # one "token" each: its own mean
    if config.teacher:
      teacher = _pooled_unit(data.train_inputs) @ vectors.T
  t0 = time.time()
  result = train_lib.train_dsi(
    model,
    data,
    config=config.train,
    workdir=workdir,
    show_progress=show_progress,
    spec=spec,
    embedding_rows=embedding_rows,
    teacher=teacher,
  )
  rows = results.phase_rows(
    result,
    METRICS,
    model=f"{meta['model']}_dsi"
    + ("_frozen_encoder" if config.frozen_encoder else "")
    + ("_embedding_ids" if config.embedding_ids else "")
    + ("_of_paragraphs" if config.embedding_ids and config.embedding_rows == "paragraph" else "")
    + (f"_distilled_from_{config.teacher}" if config.teacher else ""),
    dataset="squad_v1.1_dev",
    db_size=len(docids),
    ids=docids.scheme,
    num_queries=len(data.test_inputs),
  )
  if meta.get("num_pseudo_queries"):
    for row in rows:  # e.g. "4 sentence/span"
      pq = meta["pseudo_queries"]
      row["pseudo_queries"] = f"{pq['per_item']} " + "/".join(v for v, _ in pq["views"])
  rows[-1]["total_seconds"] = round(time.time() - t0, 1)
  return rows


def _pooled_unit(encoded: np.ndarray, batch: int = 4096) -> np.ndarray:
  """Unit mean-pooled rows of frozen MiniLM outputs `[n, length, width]` (padding is zero):
  all-MiniLM-L6-v2's sentence embeddings of those tokens."""
  from dsi_jax.losses import l2_normalize, mean_pool

  out = []
  for i in range(0, len(encoded), batch):
    x = np.asarray(encoded[i : i + batch], np.float32)
    out.append(np.asarray(l2_normalize(mean_pool(x, np.any(x != 0, axis=-1)))))
  return np.concatenate(out)


class MiniLMDualEncoder:
  """all-MiniLM-L6-v2 as it comes: cosine of mean-pooled embeddings (a zero-shot retriever)."""

  def __init__(self, documents, keys, minilm_path: str | None = None, minilm=None):
    """minilm: `(BertEncoder, params, tokenizer)` to embed with (default: `load_minilm`'s;
    the joint model's bi-encoder passes its own trained encoder)."""
    from dsi_jax.models import text

    self.minilm = text.load_minilm(minilm_path) if minilm is None else minilm
    self.keys = list(keys)
    self.docs = text.embed_texts(*self.minilm, list(documents))

  def search(self, questions, k: int):
    from dsi_jax import retrieval
    from dsi_jax.models import text

    queries = text.embed_texts(*self.minilm, list(questions))
    return retrieval.topk_keys(queries @ self.docs.T, self.keys, k)


def baseline_rows(folder: str, *, minilm_path: str | None = None) -> list[dict[str, Any]]:
  """BM25 and the zero-shot MiniLM dual encoder on the exported test questions."""
  from dsi_jax.baselines.bm25 import BM25

  data, docids = load_arrays(folder)
  with open(os.path.join(folder, "texts.json")) as f:
    texts = json.load(f)
  keys = list(docids.keys)
  relevant = [{keys[i] for i in r} for r in data.test_relevant]
  rows = []
  for name, make in (
    ("bm25", lambda: BM25(texts["documents"], keys)),
    ("minilm_dual_encoder", lambda: MiniLMDualEncoder(texts["documents"], keys, minilm_path)),
  ):
    t0 = time.time()
    values = evaluation.evaluate(make(), texts["test_questions"], relevant, METRICS)
    rows.append(
      results.make_row(
        model=name,
        setting="zero_shot",
        dataset="squad_v1.1_dev",
        db_size=len(keys),
        num_queries=len(relevant),
        metrics=values,
        seconds=round(time.time() - t0, 1),
      )
    )
  return rows


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
