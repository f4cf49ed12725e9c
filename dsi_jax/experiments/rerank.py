"""Retrieve fast, rerank smart on SQuAD v1.1 dev: every first stage alone and re-ranked by a
MiniLM cross-encoder, and the joint model (one MiniLM that retrieves and re-ranks).

Reads a folder written by `experiments.squad.export` (paragraphs, questions of each split and
their relevant paragraphs). First stages: BM25, the zero-shot MiniLM dual encoder and, given
a trained SQuAD DSI run folder, DSI. The cross-encoder starts from all-MiniLM-L6-v2 with a
fresh relevance head and trains with binary cross-entropy on the *training* questions, each
with its paragraph and hard negatives mined from the first stages' rankings of the training
questions (`RerankConfig.negatives`). The joint model trains both losses in one loop
(`cross_training.train_cross_encoder(joint_weight=...)`); its bi-encoder retrieves, its
cross-encoder re-ranks.

Every metric is over all test questions (`max_test_queries` cuts them for smoke runs). Each
distinct (question, paragraph) pair is cross-encoded once (`rerank.CachedScorer`), however
many first stages propose it; latency is measured apart, on the first `latency_queries` test
questions with nothing cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from dsi_jax import cross_training, evaluation, rerank, results, retrieval
from dsi_jax.experiments import squad

DATASET = "squad_v1.1_dev"


@dataclasses.dataclass(frozen=True)
class RerankConfig:
  """The re-ranking experiment.

  k: first-stage candidates re-ranked per question (the paper's K).
  fusion_weights: each re-ranked first stage is reported at these weights of its own score
    (`rerank.fuse`; 0 = the cross-encoder's order alone).
  max_length: word pieces per (question ; paragraph) pair; the paragraph is cut to fit.
  steps, queries_per_batch, negatives_per_query: cross-encoder training (a batch has
    `queries_per_batch * (1 + negatives_per_query)` pairs).
  negatives: `(first stage, count)`: hard negatives per training question from each first
    stage's ranking of the training questions ("bm25", "dual_encoder", "dsi").
  learning_rate, pretrained_lr_multiplier: AdamW's rate for the head; MiniLM's is the product.
  joint_steps, joint_weight: the joint model's steps and its InfoNCE weight (0 steps: none).
  max_test_queries: only the first test questions (smoke runs).
  latency_queries: test questions timed per pipeline, nothing cached, after a warm-up.
  """

  k: int = 20
  fusion_weights: tuple[float, ...] = (0.0, 0.5)
  max_length: int = 128
  steps: int = 300
  queries_per_batch: int = 4
  negatives_per_query: int = 3
  negatives: tuple[tuple[str, int], ...] = (("bm25", 2), ("dual_encoder", 1))
  learning_rate: float = 2e-4
  pretrained_lr_multiplier: float = 0.25
  joint_steps: int = 300
  joint_weight: float = 1.0
  seed: int = 0
  max_test_queries: int | None = None
  latency_queries: int = 32


def load_questions(folder: str):
  """`(keys, documents, splits)` of an exported folder: splits[name] = (questions, relevant
  key sets) for "train" and "test"."""
  data, docids = squad.load_arrays(folder)
  with open(os.path.join(folder, "texts.json")) as f:
    texts = json.load(f)
  if "train_questions" not in texts:
    raise ValueError(f"{folder}: exported before question texts were saved; export it again")
  keys = list(docids.keys)
  splits = {}
  pseudo = squad.load_meta(folder).get("num_pseudo_queries", 0)
  for split in ("train", "test"):
    questions = texts[f"{split}_questions"]
    relevant = getattr(data, f"{split}_relevant")
    if split == "train" and pseudo:  # the questions only, not the pseudo-queries after them
      relevant = relevant[: len(relevant) - pseudo]
    relevant = [{keys[i] for i in r} for r in relevant]
    if len(questions) != len(relevant):
      raise ValueError(f"{folder}: {len(questions)} {split} questions, {len(relevant)} labels")
    splits[split] = (questions, relevant)
  return keys, texts["documents"], splits


def without_test_questions(questions, relevant, test_questions):
  """The training questions (and their relevance sets) whose text is not also a test question
  (SQuAD repeats a few question texts across splits): a re-ranker never trains on the words
  of a test query."""
  test = set(test_questions)
  keep = [i for i, q in enumerate(questions) if q not in test]
  return [questions[i] for i in keep], [relevant[i] for i in keep]


def first_stages(keys, documents, minilm, dsi_run: str | None) -> dict[str, Any]:
  """The first-stage retrievers, each reading question texts."""
  from dsi_jax import runs
  from dsi_jax.baselines.bm25 import BM25

  stages = {
    "bm25": BM25(documents, keys),
    "dual_encoder": squad.MiniLMDualEncoder(documents, keys, minilm=minilm),
  }
  if dsi_run:
    run = runs.load_run(dsi_run)
    if list(run.retriever.keys) != list(keys):
      raise ValueError(f"{dsi_run}: the DSI run indexes other paragraphs than the exported folder")
    stages["dsi"] = retrieval.Prepared(run.retriever, run.prepare_texts)
  return stages


def new_cross_encoder(minilm, config: RerankConfig):
  """A CrossEncoder with MiniLM's weights under a fresh head, and its scorer factory."""
  from dsi_jax.models import cross_encoder

  encoder, bert_params, _ = minilm
  model = cross_encoder.CrossEncoder(encoder.config)
  dummy = np.zeros((1, 8), np.int32)
  params = model.init(jax.random.PRNGKey(config.seed), dummy)["params"]
  return model, cross_encoder.with_pretrained(params, bert_params)


def run(
  folder: str,
  *,
  config: RerankConfig = RerankConfig(),
  dsi_run: str | None = None,
  minilm_path: str | None = None,
  show_progress: bool = True,
) -> list[dict[str, Any]]:
  """Trains the cross-encoder and the joint model, evaluates every pipeline; result rows."""
  from dsi_jax.models import text

  minilm = text.load_minilm(minilm_path)
  tokenizer = minilm[2]
  keys, documents, splits = load_questions(folder)
  item_texts = dict(zip(keys, documents))
  train_q, train_rel = splits["train"]
  test_q, test_rel = splits["test"]
  if config.max_test_queries is not None:
    test_q, test_rel = test_q[: config.max_test_queries], test_rel[: config.max_test_queries]
  train_q, train_rel = without_test_questions(train_q, train_rel, splits["test"][0])
  stages = first_stages(keys, documents, minilm, dsi_run)
  common = dict(dataset=DATASET, db_size=len(keys), num_queries=len(test_q))

  # Hard negatives from the first stages' rankings of the training questions only.
  t0 = time.time()
  sources = dict(config.negatives)
  rankings = {name: stages[name].search(train_q, 20)[0] for name in sources}
  negatives = cross_training.mine_negatives(rankings, train_rel, sources)
  mining_s = time.time() - t0

  def train(joint_weight: float, steps: int):
    model, params = new_cross_encoder(minilm, config)
    scorer = rerank.CrossEncoderScorer(
      model,
      params,
      tokenizer,
      item_texts=item_texts,
      max_length=config.max_length,
      show_progress=show_progress,
    )
    t = time.time()
    params, history = cross_training.train_cross_encoder(
      model,
      params,
      scorer.pair_inputs,
      train_q,
      train_rel,
      negatives,
      keys,
      steps=steps,
      queries_per_batch=config.queries_per_batch,
      negatives_per_query=config.negatives_per_query,
      learning_rate=config.learning_rate,
      pretrained_lr_multiplier=config.pretrained_lr_multiplier,
      seed=config.seed,
      joint_weight=joint_weight,
      embed_inputs=cross_training.embed_inputs_fn(tokenizer, config.max_length),
      item_texts=item_texts,
      show_progress=show_progress,
    )
    scorer = dataclasses.replace(scorer, params=params)
    return scorer, {"train_seconds": round(time.time() - t, 1), "final_bce": history[-1]["bce"]}

  pipelines: list[tuple[str, Any, Any, dict]] = []  # (name, first stage, scorer, extra)
  scorer, info = train(0.0, config.steps)
  for name, stage in stages.items():
    pipelines.append((name, stage, scorer, info))
  if config.joint_steps > 0:
    joint_scorer, joint_info = train(config.joint_weight, config.joint_steps)
    p = joint_scorer.params
    bi = (minilm[0], {"embeddings": p["embeddings"], "Transformer": p["Transformer"]}, tokenizer)
    pipelines.append(
      ("joint", squad.MiniLMDualEncoder(documents, keys, minilm=bi), joint_scorer, joint_info)
    )

  rows = pipeline_rows(
    pipelines,
    test_q,
    test_rel,
    squad.METRICS,
    k=config.k,
    fusion_weights=config.fusion_weights,
    latency_queries=config.latency_queries,
    ids={"dsi": "atomic"},
    common=common,
  )
  rows[0]["negatives_seconds"] = round(mining_s, 1)
  return rows


def pipeline_rows(
  pipelines: Sequence[tuple[str, Any, Any, dict]],
  queries: Sequence[str],
  relevant: Sequence[set],
  metrics: Sequence[str],
  *,
  k: int,
  fusion_weights: Sequence[float],
  latency_queries: int,
  ids: dict[str, str],
  common: dict[str, Any],
) -> list[dict[str, Any]]:
  """For each `(name, first stage, scorer, extra fields)`: a row of the first stage alone (once
  per name) and one per fusion weight re-ranked (`model` "<name>+rerank", or "<name>+" the
  extra field "reranker"), with per-stage latency. Each
  distinct (query, item) pair is scored once per scorer, whichever pipeline proposes it."""
  rows = []
  caches: dict[int, rerank.CachedScorer] = {}  # one per scorer: pipelines share its pairs
  for name, stage, pair_scorer, info in pipelines:
    if not any(r["model"] == name for r in rows):
      t = time.time()
      values = evaluation.evaluate(stage, queries, relevant, metrics)
      first = dict(ids=ids.get(name), seconds=round(time.time() - t, 1), **common)
      rows.append(results.make_row(model=name, setting="first_stage", metrics=values, **first))
    cached = caches.setdefault(id(pair_scorer), rerank.CachedScorer(pair_scorer))
    latency = measure_latency(stage, pair_scorer, queries[:latency_queries], k, common["db_size"])
    for weight in fusion_weights:
      reranked = rerank.Reranked(stage, cached, k=k, fusion_weight=weight)
      t = time.time()
      values = evaluation.evaluate(reranked, queries, relevant, metrics)
      rows.append(
        results.make_row(
          model=f"{name}+{info.get('reranker', 'rerank')}",
          setting=f"rerank k={k}" + (f", fused {weight:g}" if weight else ""),
          ids=ids.get(name),
          metrics=values,
          seconds=round(time.time() - t, 1),
          **latency,
          **info,
          **common,
        )
      )
  return rows


def measure_latency(stage, scorer, queries, k: int, num_items: int) -> dict[str, float]:
  """Per-query milliseconds of each stage (nothing cached, after a warm-up pass) and the
  estimated cost of cross-encoding the whole index instead."""
  rerank.Reranked(stage, scorer, k=k).search(queries[: scorer.query_batch], k)  # compiles
  reranked = rerank.Reranked(stage, scorer, k=k)
  reranked.search(queries, k)
  ms = reranked.latency_ms()
  full = reranked.full_index_ms(num_items)
  return {
    "first_stage_ms": round(ms["first_stage_ms"], 2),
    "rerank_ms": round(ms["rerank_ms"], 1),
    "full_index_ms": round(full, 0),
    "speedup": round(full / ms["total_ms"], 1),
  }


def run_rerank_experiment(
  config: RerankConfig = RerankConfig(),
  *,
  data: str,
  workdir: str,
  dsi_run: str | None = None,
  minilm_path: str | None = None,
  show_progress: bool = True,
) -> dict[str, Any]:
  """The gin entry point (`dsi_jax.run_rerank_experiment`): `run` on the exported folder
  `data`, results written to `workdir/results.json`."""
  from dsi_jax import errors

  errors.writable_folder(workdir, "workdir")
  rows = run(
    data, config=config, dsi_run=dsi_run, minilm_path=minilm_path, show_progress=show_progress
  )
  described = {
    **dataclasses.asdict(config),
    "data": os.path.basename(os.path.normpath(data)),
    "dsi_run": os.path.basename(os.path.normpath(dsi_run)) if dsi_run else None,
  }
  return results.write_report(workdir, rows, described, command=results.invocation())
