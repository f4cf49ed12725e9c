"""Losses and the pieces they are made of: teacher forcing of id tokens, token log-likelihoods,
pooling and normalisation of embeddings, and CLIP's symmetric InfoNCE loss.

Plain functions of arrays; the networks (`dsi_jax.models`) and the trainers import them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dsi_jax import docids as docids_lib

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the scale exp(logit_scale) at 100
POOLINGS = ("auto", "mean", "pooled")

# ----------------------------------------------------------------------------- id tokens


def shift_right(targets: jax.Array) -> jax.Array:
  """Decoder inputs `[..., length]`: pad, then the targets without their last position."""
  pad = [(0, 0)] * (targets.ndim - 1) + [(1, 0)]
  return jnp.pad(targets[..., :-1], pad, constant_values=docids_lib.PAD)


def token_log_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`[batch, length]` log p(target token), zero at padding."""
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), targets[..., None], -1)[
    ..., 0
  ]
  return jnp.where(targets != docids_lib.PAD, lp, 0.0)


# ----------------------------------------------------------------------------- embeddings


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' mean pooling: the average of `hidden [B, L, H]` where `mask [B, L]`."""
  m = mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` along the last axis (torch's `F.normalize`)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pool(tokens: jax.Array, aux: Mapping[str, Any], pooling: str, mask=None) -> jax.Array:
  """`[B, hidden]` from a tower's `(tokens [B, L, hidden], aux)`.

  "pooled": the tower's `aux["pooled"]`; "mean": the mean over the tokens where `mask [B, L]`
  (all tokens without a mask); "auto": "pooled" when the tower gives it, else "mean".
  """
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}: use one of {POOLINGS}")
  if pooling == "pooled" or (pooling == "auto" and "pooled" in aux):
    if "pooled" not in aux:
      raise ValueError("pooling='pooled' but the tower's aux has no 'pooled' entry")
    return aux["pooled"]
  if mask is None:
    return tokens.mean(axis=1)
  return mean_pool(tokens, mask)


# ----------------------------------------------------------------------------- contrastive


def infonce_loss(
  text_emb: jax.Array,
  image_emb: jax.Array,
  log_scale: jax.Array | float,
  image_ids: jax.Array | None = None,
  *,
  max_log_scale: float = MAX_LOGIT_SCALE,
) -> jax.Array:
  """The symmetric InfoNCE (CLIP) loss of a batch of matched pairs.

  Row `i` of `text_emb` (a caption) matches row `i` of `image_emb` (its image); every other row
  of the batch is a negative. The loss is the mean of the text->image and image->text
  cross-entropies of `exp(log_scale) * text_emb @ image_emb.T`.

  Args:
    text_emb: `[B, D]` unit-norm caption embeddings.
    image_emb: `[B, D]` unit-norm image embeddings.
    log_scale: `[]` log inverse temperature, clipped at `max_log_scale`.
    image_ids: optional `[B]` ids of the images: pairs that share an image (several captions of
      one image, or one pair drawn twice) are not negatives of each other. They are left out of
      each other's softmax denominators; each row keeps its own pair (the diagonal).
    max_log_scale: the clip of `log_scale` (CLIP: log 100).

  Returns:
    The scalar loss (float32).
  """
  if text_emb.ndim != 2 or text_emb.shape != image_emb.shape:
    raise ValueError(
      f"text_emb and image_emb must both be [batch, dim], got {text_emb.shape}, {image_emb.shape}"
    )
  scale = jnp.exp(jnp.minimum(jnp.asarray(log_scale, jnp.float32), max_log_scale))
  logits = scale * jnp.dot(
    text_emb.astype(jnp.float32),
    image_emb.astype(jnp.float32).T,
    precision=jax.lax.Precision.HIGHEST,
  )  # [texts, images]
  b = logits.shape[0]
  diagonal = jnp.eye(b, dtype=bool)
  if image_ids is not None:
    image_ids = jnp.asarray(image_ids)
    if image_ids.shape != (b,):
      raise ValueError(f"image_ids must be [{b}], got {image_ids.shape}")
    same = image_ids[:, None] == image_ids[None, :]
    logits = jnp.where(same & ~diagonal, -jnp.inf, logits)  # symmetric: serves both directions
  positive = jnp.diagonal(logits)
  text_to_image = jax.nn.logsumexp(logits, axis=1) - positive
  image_to_text = jax.nn.logsumexp(logits, axis=0) - positive
  return 0.5 * (text_to_image.mean() + image_to_text.mean())


# ----------------------------------------------------------------------------- ranking


def listwise_distillation(
  student: jax.Array, teacher: jax.Array, mask: jax.Array, temperature: float = 1.0
) -> jax.Array:
  """Listwise distillation: KL(teacher || student) of each row's softmax over its candidates.

  Args:
    student: `[batch, candidates]` the student's log-scores (e.g. id log-likelihoods); its
      softmax is taken as they are.
    teacher: `[batch, candidates]` the teacher's scores (e.g. a dual encoder's cosines);
      its softmax is of `teacher / temperature`.
    mask: `[batch, candidates]` which candidates count; a row with fewer than two (nothing to
      rank, e.g. an indexing example) is left out of the mean.
    temperature: the teacher's softmax temperature.

  Returns:
    The mean KL over the rows that rank (0 where none does), float32.
  """
  if student.shape != teacher.shape or student.shape != mask.shape or student.ndim != 2:
    raise ValueError(
      f"student, teacher and mask must be one [batch, candidates] shape, got "
      f"{student.shape}, {teacher.shape}, {mask.shape}"
    )
  mask = mask.astype(bool)
  # masked candidates get a large finite negative, not -inf: no NaN in values or gradients
  t = jnp.where(mask, teacher.astype(jnp.float32) / temperature, -1e9)
  s = jnp.where(mask, student.astype(jnp.float32), -1e9)
  ranks = mask.sum(axis=-1) >= 2
  log_p = jax.nn.log_softmax(t, axis=-1)
  log_q = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.where(mask, jnp.exp(log_p) * (log_p - log_q), 0.0), axis=-1)
  return jnp.sum(jnp.where(ranks, kl, 0.0)) / jnp.maximum(ranks.sum(), 1)
