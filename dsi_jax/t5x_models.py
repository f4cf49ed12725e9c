"""t5x adapter: dsi_jax networks as t5x models, for `t5x/train.py`, `t5x/eval.py`, `t5x/infer.py`.

`DSIT5XModel` wraps a `DSINetwork` and the `DocidMap` it decodes in t5x's model contract
(`t5x.models.BaseTransformerModel`):

  get_initial_variables  `params` and the `params_axes` collection t5x's partitioner reads (each
                         parameter's logical axes from `dsi_jax.partitioning.logical_axes`, as
                         `AxisMetadata`; the parameters themselves stay plain arrays).
  loss_fn                the token cross-entropy of `DSIModel.loss_fn` (mean over id tokens and
                         eos), with t5x's standard metrics and `sequence_accuracy`.
  score_batch            `[batch]` log-likelihood of each `decoder_target_tokens` row.
  predict_batch_with_aux t5x's own `decoding.beam_search`, constrained by the trie of valid ids.

t5x's beam search has no logit callback, so the constraint lives in `tokens_to_logits`: the
decoding cache carries each beam's trie node (`trie_node`, `[batch * beams]`), which t5x expands,
flattens and reorders with the beams like any other cache entry; each step follows the beam's last
token to its child node and masks every token the trie forbids there. The mask never leaves the
device. t5x normalises what `tokens_to_logits` returns, so the search scores ids by their
probability *within the trie*; the ids it finds are then rescored by their exact (teacher-forced,
full-vocabulary) log-likelihood and ranked by it, so that rankings and scores are those of
`DSIModel.rank` and `score_batch` (with beams >= the number of ids the ranking is exact).

Batches are t5x's, as `dsi_jax.tasks.DSIFeatureConverter` emits them: `encoder_input_tokens`
(float32 pixels `[batch, size, size, 3]` for images, int32 tokens `[batch, length]` for text),
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` (`[batch, length]`).
Decoder features may be longer than the longest id (the extra positions are padding).

For gin (`gin_configs/t5x/`): `corpus_model` builds the model of a registered corpus (its ids,
vocabularies and modality from the registration), `ranking_task` registers `<corpus>_ranking`,
the retrieval task with seqio metrics (Hits@k, MRR@10, MAP@10, Recall@10) over the ranked ids,
and `logical_axis_rules` extends t5x's partitioning rules with dsi_jax's logical axis names.

t5x is not on PyPI; importing this module without it raises an ImportError that says how to
install it. Nothing else in dsi_jax imports this module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

try:
  from t5x import decoding as t5x_decoding
  from t5x import models as t5x_lib_models
  from t5x import partitioning as t5x_partitioning
except ImportError as e:  # pragma: no cover - exercised where t5x is absent
  raise ImportError(
    "dsi_jax.t5x_models needs t5x, which is not on PyPI: `git clone "
    "https://github.com/google-research/t5x` and install it with airio and jestimator as the "
    f"README's 't5x' section shows ({e})"
  ) from e

import flax
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from clu import metrics as clu_metrics
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning

from dsi_jax import docids as docids_lib
from dsi_jax import losses, partitioning
from dsi_jax import metrics as metrics_lib
from dsi_jax import trie as trie_lib
from dsi_jax.models import dsi
from dsi_jax.tasks import core as tasks_core

Params = Mapping[str, Any]
Batch = Mapping[str, jax.Array]

# Logit of a token the trie forbids. Far below t5x's NEG_INF (-1e7, the penalty of a finished
# beam kept alive and of beams that never started), so that a forbidden token is never chosen
# while any other candidate exists.
FORBIDDEN = -1.0e10
# Search scores at or below this are fillers or forbidden paths (t5x marks them with -1e7).
_INVALID_SCORE = float(t5x_decoding.NEG_INF_VALUE) / 2

#: t5x's beam search without its brevity penalty: ids of different lengths are compared by
#: their log-probabilities, as `DSIModel` does.
beam_search = functools.partial(t5x_decoding.beam_search, alpha=0.0)


def params_axes(params: Params) -> dict:
  """The `params_axes` collection of `params`: for each parameter `x`, an entry `x_axes` holding
  `AxisMetadata(names=...)` with its logical axis names, in a tree that mirrors `params`."""
  names = partitioning.logical_axes(params)
  flat = traverse_util.flatten_dict(
    jax.tree_util.tree_map(
      lambda n: flax_partitioning.AxisMetadata(names=tuple(n)),
      names,
      is_leaf=lambda x: isinstance(x, tuple),
    ),
    is_leaf=lambda _, x: isinstance(x, flax_partitioning.AxisMetadata),
  )
  return traverse_util.unflatten_dict({(*k[:-1], f"{k[-1]}_axes"): v for k, v in flat.items()})


class DSIT5XModel(t5x_lib_models.BaseTransformerModel):
  """A `DSINetwork` and its `DocidMap` as a t5x model (see the module docstring)."""

  def __init__(
    self,
    network: dsi.DSINetwork,
    docids: docids_lib.DocidMap,
    optimizer_def: Any,
    *,
    input_vocabulary: seqio.Vocabulary | None = None,
    output_vocabulary: seqio.Vocabulary | None = None,
    modality: str | None = None,
    num_beams: int = 10,
    decode_fn: Callable[..., tuple[jax.Array, jax.Array]] = beam_search,
    rescore: bool = True,
    pretrained: Mapping[str, Any] | None = None,
  ):
    """Args:
    network: the encoder-decoder (`make_vit_dsi`, `make_minilm_dsi(...)[0].network`, ...).
    docids: the ids it decodes (`dsi_jax.tasks.corpus_data(name).docids` for a registered corpus).
    optimizer_def: a t5x optimizer, e.g.
      `t5x.optimizers.OptaxWrapper(dsi_jax.optim.make_optimizer())`.
    input_vocabulary: the tasks' `inputs` vocabulary (default: pass-through for images, bytes
      for text); t5x checks that it equals the task's.
    output_vocabulary: default `DocidVocabulary(docids.num_codes)`, as the tasks use.
    modality: "image" or "text" (default: "text" when the network has a `pad_id`).
    num_beams: beams of `predict_batch` when the caller names none (`num_decodes`).
    decode_fn: t5x's decode function contract; default t5x's `beam_search` without brevity
      penalty. It gets the trie-masking `tokens_to_logits`.
    rescore: rank the ids found by their exact log-likelihood (True) or by the search's
      within-trie scores (False).
    pretrained: parameter subtrees that replace freshly initialised ones, e.g.
      `{"encoder": minilm_params}`.
    """
    modality = modality or ("text" if network.pad_id is not None else "image")
    if modality not in ("image", "text"):
      raise ValueError(
        f"DSIT5XModel supports the 'image' and 'text' modalities, got {modality!r} (an "
        "image+text corpus needs a network with two encoders)"
      )
    if input_vocabulary is None:
      input_vocabulary = (
        tasks_core.TEXT_VOCABULARY if modality == "text" else seqio.PassThroughVocabulary(size=0)
      )
    self.network = network
    self.docids = docids
    self.modality = modality
    self.num_beams = num_beams
    self.rescore = rescore
    self.pretrained = dict(pretrained or {})
    self.trie = trie_lib.build_trie(docids)
    self.FEATURE_CONVERTER_CLS = functools.partial(
      tasks_core.DSIFeatureConverter, modality=modality
    )
    super().__init__(
      module=network,
      input_vocabulary=input_vocabulary,
      output_vocabulary=output_vocabulary or tasks_core.DocidVocabulary(docids.num_codes),
      optimizer_def=optimizer_def,
      decode_fn=decode_fn,
    )

  # -- helpers -----------------------------------------------------------------------------
  @property
  def max_length(self) -> int:
    """Longest id in tokens, eos included: the decoder's length."""
    return self.docids.max_length

  def _decoder_features(self, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(decoder_input_tokens, decoder_target_tokens, decoder_loss_weights)`, cut to the ids'
    length (positions beyond the longest id are padding)."""
    length = batch["decoder_target_tokens"].shape[1]
    if length < self.max_length:
      raise ValueError(
        f"decoder features of length {length} cut ids of up to {self.max_length} tokens (eos "
        f"included): set TASK_FEATURE_LENGTHS['targets'] to at least {self.max_length}"
      )
    targets = batch["decoder_target_tokens"][:, : self.max_length]
    inputs = batch.get("decoder_input_tokens")
    inputs = losses.shift_right(targets) if inputs is None else inputs[:, : self.max_length]
    weights = batch.get("decoder_loss_weights")
    weights = targets != docids_lib.PAD if weights is None else weights[:, : self.max_length]
    return inputs, targets, weights.astype(jnp.float32)

  def _encode(self, params: Params, inputs: jax.Array):
    encoded, _ = self.network.apply({"params": params}, inputs, method=dsi.DSINetwork.encode)
    return encoded  # [b, patches, d], or {"encoded", "mask"} for tokens

  # -- the model contract -------------------------------------------------------------------
  def get_initial_variables(
    self,
    rng: jax.Array,
    input_shapes: Mapping[str, Any],
    input_types: Mapping[str, Any] | None = None,
  ) -> flax.core.FrozenDict:
    """`{"params": ..., "params_axes": ...}`; parameters do not depend on the batch size."""
    input_types = input_types or {}
    encoder_shape = tuple(input_shapes["encoder_input_tokens"])
    decoder_length = tuple(input_shapes["decoder_input_tokens"])[1]
    if decoder_length < self.max_length:
      raise ValueError(
        f"decoder features of length {decoder_length} cut ids of up to {self.max_length} "
        f"tokens: set TASK_FEATURE_LENGTHS['targets'] to at least {self.max_length}"
      )
    default_type = jnp.int32 if self.modality == "text" else jnp.float32
    inputs = jnp.zeros(
      (1, *encoder_shape[1:]), input_types.get("encoder_input_tokens", default_type)
    )
    tokens = jnp.zeros((1, self.max_length), jnp.int32)
    params = self.network.init(rng, inputs, tokens)["params"]
    params = flax.core.unfreeze(params)
    for name, subtree in self.pretrained.items():
      fresh = jax.tree_util.tree_map(jnp.shape, params[name])
      given = jax.tree_util.tree_map(jnp.shape, subtree)
      if fresh != given:
        raise ValueError(f"pretrained {name!r} parameters do not fit the network's {name}")
      params[name] = jax.tree_util.tree_map(jnp.asarray, subtree)
    return flax.core.freeze({"params": params, "params_axes": params_axes(params)})

  def _compute_logits(
    self, params: Params, batch: Batch, dropout_rng: jax.Array | None = None
  ) -> jax.Array:
    """`[batch, max_length, vocab]` teacher-forced logits."""
    decoder_inputs, _, _ = self._decoder_features(batch)
    train = dropout_rng is not None
    return self.network.apply(
      {"params": params},
      batch["encoder_input_tokens"],
      decoder_inputs,
      train=train,
      rngs={"dropout": dropout_rng} if train else {},
    )

  def loss_fn(
    self, params: Params, batch: Batch, dropout_rng: jax.Array | None
  ) -> tuple[jax.Array, dict]:
    """Mean token cross-entropy over the weighted target tokens (ids and eos), as
    `DSIModel.loss_fn`; metrics are t5x's base metrics plus `sequence_accuracy`."""
    logits = self._compute_logits(params, batch, dropout_rng)
    _, targets, weights = self._decoder_features(batch)
    ll = losses.token_log_likelihood(logits, targets)  # [b, length], zero at padding
    loss = -jnp.sum(ll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    segment_ids = {"decoder_target_tokens": targets != docids_lib.PAD}
    if self.modality == "text":
      segment_ids["encoder_input_tokens"] = batch["encoder_input_tokens"] != self.network.pad_id
    metrics = self._compute_metrics(
      logits=logits,
      targets=targets,
      mask=weights,
      loss=loss,
      z_loss=None,
      segment_ids=segment_ids,
    )
    correct = (jnp.argmax(logits, -1) == targets) | (weights == 0)
    metrics["sequence_accuracy"] = clu_metrics.Average.from_model_output(
      jnp.all(correct, axis=-1).astype(jnp.float32)
    )
    # t5x's per-token losses assume a summed loss; this one is already a per-token mean.
    num_weighted = jnp.sum(weights)
    metrics["loss_per_nonpadding_target_token"] = clu_metrics.Average(
      total=loss * num_weighted, count=num_weighted
    )
    metrics["loss_per_all_target_tokens"] = clu_metrics.Average(
      total=loss * num_weighted, count=jnp.asarray(targets.size)
    )
    return loss, metrics

  def score_batch(
    self, params: Params, batch: Batch, return_intermediates: bool = False
  ) -> jax.Array | tuple[jax.Array, dict]:
    """`[batch]` log-likelihood of each `decoder_target_tokens` row (weighted tokens)."""
    logits = self._compute_logits(params, batch)
    _, targets, weights = self._decoder_features(batch)
    token_scores = losses.token_log_likelihood(logits, targets) * weights  # [b, length]
    scores = jnp.sum(token_scores, axis=-1)
    if return_intermediates:
      return scores, {"decoder": {"token_scores": (token_scores,)}}
    return scores

  def predict_batch_with_aux(
    self,
    params: Params,
    batch: Batch,
    rng: jax.Array | None = None,
    decoder_params: MutableMapping[str, Any] | None = None,
    return_all_decodes: bool = False,
    num_decodes: int | None = None,
    prompt_with_targets: bool = False,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Trie-constrained beam search with t5x's `decode_fn`.

    Returns predictions and aux:
      predictions: `[batch, length]` tokens of the best id (id, eos, pad), or with
        `return_all_decodes` `[batch, beams, length]` in t5x's order (best *last*).
      aux["scores"]: their log-likelihoods (`[batch]`, or `[batch, beams]` best last).
      aux["ranked_items"]: `[batch, beams]` item indices (rows of the DocidMap), best first; -1
        where fewer valid ids were found than beams.
      aux["ranked_scores"]: `[batch, beams]` their log-likelihoods, best first (-inf at -1).
    """
    if prompt_with_targets:
      raise ValueError("DSIT5XModel decodes whole ids: prompt_with_targets is not supported")
    num_beams = num_decodes or self.num_beams
    inputs = batch["encoder_input_tokens"]
    b, length = inputs.shape[0], self.max_length
    out_length = batch["decoder_input_tokens"].shape[1]
    encoded = self._encode(params, inputs)
    decode = functools.partial(
      self.network.apply, method=dsi.DSINetwork.decode, decode=True, mutable=["cache"]
    )
    # The cache is made for one candidate per query; t5x adds and flattens the beam axis
    # ([b, ...] -> [b * beams, ...]), which is the decoder's [batch, candidates] order.
    _, init_vars = decode({"params": params}, encoded, jnp.zeros((b, 1, length), jnp.int32))
    # Scalars of the decoder's cache are step counters (the decoder's position, flax's
    # `cache_index`), which t5x's beam axis cannot hold: they stay out of the cache t5x sees
    # and are set from the loop's own index at every step.
    flat = traverse_util.flatten_dict(flax.core.unfreeze(init_vars["cache"]))
    counters = {k: v.dtype for k, v in flat.items() if v.ndim == 0}

    def split_counters(model_cache) -> dict:
      flat = traverse_util.flatten_dict(flax.core.unfreeze(model_cache))
      return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in counters})

    def with_counters(model_cache, step: jax.Array) -> dict:
      flat = traverse_util.flatten_dict(model_cache)
      flat.update({k: step.astype(dtype) for k, dtype in counters.items()})
      return traverse_util.unflatten_dict(flat)

    cache = {
      "model": split_counters(init_vars["cache"]),
      "trie_node": jnp.zeros((b,), jnp.int32),  # root
    }
    trie = self.trie

    def tokens_to_logits(state: t5x_decoding.DecodingState) -> tuple[jax.Array, dict]:
      tokens = state.cur_token  # [b * beams, 1]: each beam's last token (pad at the start)
      step = jnp.asarray(state.cur_index, jnp.int32).reshape(-1)[0]  # tokens decoded so far
      logits, new_vars = decode(
        {"params": params, "cache": with_counters(state.cache["model"], step)},
        encoded,
        tokens.reshape(b, num_beams, 1),
      )
      new_cache = split_counters(new_vars["cache"])
      # The beam's node (at level `step`) after its last token; -1 once it left the trie (a
      # forbidden token) or ended (eos). The same trie operations as `decoding.beam_search`.
      prev = state.cache["trie_node"]  # [b * beams], at level step - 1
      child = trie.child_at(step - 1, jnp.maximum(prev, 0), tokens[:, 0])
      node = jnp.where(step == 0, 0, jnp.where(prev < 0, -1, child))
      allowed = (node >= 0)[:, None] & trie.allowed_at(step, jnp.maximum(node, 0))  # [b*beams, V]
      log_probs = jax.nn.log_softmax(logits.reshape(b * num_beams, -1).astype(jnp.float32))
      masked = jnp.where(allowed, log_probs, FORBIDDEN)
      return masked, {"model": new_cache, "trie_node": node}

    decoder_params = dict(decoder_params or {})
    if rng is not None:
      decoder_params.setdefault("decode_rng", rng)
    decoder_params.setdefault("eos_id", docids_lib.EOS)
    decodes, search_scores = self._decode_fn(
      inputs=jnp.zeros((b, length), jnp.int32),
      cache=cache,
      tokens_to_logits=tokens_to_logits,
      num_decodes=num_beams,
      cache_offset=0,
      **decoder_params,
    )  # [b, beams, length], [b, beams] (best last)
    items = self.trie.lookup(decodes)
    valid = (items >= 0) & (search_scores > _INVALID_SCORE)
    items = jnp.where(valid, items, -1)
    decodes = jnp.where(valid[..., None], decodes, docids_lib.PAD)
    if self.rescore:
      logits = self.network.apply(
        {"params": params}, encoded, losses.shift_right(decodes), method=dsi.DSINetwork.decode
      )  # [b, beams, length, vocab]
      scores = jnp.sum(losses.token_log_likelihood(logits, decodes), axis=-1)
    else:
      scores = search_scores
    scores = jnp.where(valid, scores, -jnp.inf)
    order = jnp.argsort(-scores, axis=1, stable=True)  # best first
    ranked_scores = jnp.take_along_axis(scores, order, 1)
    ranked_items = jnp.take_along_axis(items, order, 1)
    ranked = jnp.take_along_axis(decodes, order[..., None], 1)
    ranked = jnp.pad(ranked, ((0, 0), (0, 0), (0, max(0, out_length - length))))
    aux = {"ranked_items": ranked_items, "ranked_scores": ranked_scores}
    if return_all_decodes:
      return ranked[:, ::-1], {"scores": ranked_scores[:, ::-1], **aux}
    return ranked[:, 0], {"scores": ranked_scores[:, 0], **aux}


# -- gin-friendly constructors ------------------------------------------------------------------
def corpus_name(mixture_or_task: str) -> str:
  """The corpus behind a dsi_jax task or mixture name (`..._indexing`, `..._retrieval` or the
  mixture itself)."""
  for suffix in ("_indexing", "_retrieval"):
    if mixture_or_task.endswith(suffix) and mixture_or_task[: -len(suffix)] in (
      tasks_core.registered_corpora()
    ):
      return mixture_or_task[: -len(suffix)]
  return mixture_or_task


RANKING_METRICS = ("hits@1", "hits@10", "mrr@10", "map@10", "recall@10")


def _relevant_rows(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False):
  """seqio postprocessor of the ranking task: a target becomes its query's relevant rows (as
  strings); predictions (id strings) pass through."""
  if is_target and example is not None:
    return [str(int(r)) for r in np.asarray(example["relevant"]).reshape(-1)]
  return output


def ranking_metrics(
  targets: list[list[str]], predictions: list[str], aux_values: Mapping[str, Any]
) -> dict[str, float]:
  """seqio metric over `aux_values["ranked_items"]` (what `predict_batch_with_aux` returns):
  Hits@1, Hits@10, MRR@10, MAP@10 and Recall@10 against each query's relevant rows."""
  del predictions
  ranked = [[str(int(i)) for i in row if int(i) >= 0] for row in aux_values["ranked_items"]]
  return metrics_lib.compute_metrics(ranked, targets, RANKING_METRICS)


def ranking_task(corpus: str) -> str:
  """Registers (once) and names `<corpus>_ranking`: the corpus's retrieval task with seqio
  metrics over the ranked ids of `predict_batch_with_aux`, for `t5x/eval.py` and the
  inference evaluation of `t5x/train.py`."""
  name = corpus_name(corpus)
  task_name = f"{name}_ranking"
  if task_name not in seqio.TaskRegistry.names():
    retrieval = seqio.get_mixture_or_task(f"{name}_retrieval")
    seqio.TaskRegistry.add(
      task_name,
      source=retrieval.source,
      preprocessors=retrieval.preprocessors,
      output_features=retrieval.output_features,
      postprocess_fn=_relevant_rows,
      metric_fns=[ranking_metrics],
    )
  return task_name


def vit_network(docids: docids_lib.DocidMap, **kwargs: Any) -> dsi.DSINetwork:
  """`make_vit_dsi(docids, **kwargs)`: the seed's ViT-DSI network (sizes from gin)."""
  return dsi.make_vit_dsi(docids, **kwargs)


def minilm_network(
  docids: docids_lib.DocidMap, **kwargs: Any
) -> tuple[dsi.DSINetwork, dict[str, Any]]:
  """Text DSI on all-MiniLM-L6-v2 (`make_minilm_dsi`): the network and its pretrained
  encoder parameters."""
  from dsi_jax.models import borrowed

  model, _ = borrowed.make_minilm_dsi(docids, **kwargs)
  return model.network, model.pretrained


def corpus_model(
  corpus: str,
  network_fn: Callable[[docids_lib.DocidMap], Any],
  optimizer_def: Any,
  **kwargs: Any,
) -> DSIT5XModel:
  """The t5x model for the tasks registered as `corpus` (a dsi_jax mixture or task name).

  The ids, the vocabularies and the modality come from the registration, so they match the
  tasks as t5x checks. `network_fn(docids)` builds the network, or `(network, pretrained)`
  (`vit_network`, `minilm_network`). `kwargs` go to `DSIT5XModel` (`num_beams`, ...).
  """
  name = corpus_name(corpus)
  docids = tasks_core.corpus_data(name).docids
  features = seqio.get_mixture_or_task(name).output_features
  if "text_inputs" in features:
    raise ValueError(f"{name}: image+text corpora are not supported by DSIT5XModel")
  built = network_fn(docids)
  network, pretrained = built if isinstance(built, tuple) else (built, None)
  inputs = features["inputs"]
  modality = "image" if isinstance(inputs, seqio.ContinuousFeature) else "text"
  return DSIT5XModel(
    network,
    docids,
    optimizer_def,
    input_vocabulary=inputs.vocabulary,
    output_vocabulary=features["targets"].vocabulary,
    modality=modality,
    pretrained=pretrained,
    **kwargs,
  )


def logical_axis_rules(
  rules: tuple[tuple[str, Any], ...] | None = None,
) -> tuple[tuple[str, Any], ...]:
  """t5x's standard rules (mesh axes `data`, `model`) plus dsi_jax's own logical names, all
  unpartitioned (for `PjitPartitioner.logical_axis_rules`)."""
  extra = tuple(
    (name, None)
    for name in ("candidates", "patch_h", "patch_w", "channels", "positions", "type_vocab", "proj")
  )
  return tuple(rules or t5x_partitioning.standard_logical_axis_rules()) + extra


__all__ = [
  "FORBIDDEN",
  "DSIT5XModel",
  "beam_search",
  "corpus_model",
  "corpus_name",
  "logical_axis_rules",
  "minilm_network",
  "params_axes",
  "ranking_metrics",
  "ranking_task",
  "vit_network",
]
