"""CLIP-DSI: an image tower and a text tower feed one docid decoder.

A caption or an image goes in, the id of the image comes out. `TwoTowerEncoder` encodes each
input with the tower of its kind (integer arrays are token ids, floating arrays are pixels),
projects both to the decoder's width, and returns the token sequence with its mask, so the
decoder cross-attends to patches or to unpadded word pieces alike.

A training batch may hold both kinds: `inputs` is then a tuple of parts (e.g. `(caption
tokens [n_q, len], images [n_i, h, w, c])`) and `targets` the matching tuple of id rows; the
parts are encoded by their towers, padded to the longest sequence and concatenated on the batch
axis (targets in the same order). Evaluation passes one kind at a time.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dsi_jax import docids as docids_lib
from dsi_jax.models.decoder import DocidDecoder


def is_tokens(x) -> bool:
  """Integer arrays are token ids (text); floating arrays are pixels (images)."""
  return jnp.issubdtype(x.dtype, jnp.integer)


class TwoTowerEncoder(nn.Module):
  """Images and texts -> `(encoded [B, L, width], aux)` with `aux["mask"]` `[B, L]` (True: a
  real patch or token); `aux["pooled"]` `[B, width]` is the masked mean, for contrastive losses.

  image_tower: `(images, train=) -> (tokens [B, P, d_i], aux)` (the ViT, a CLIP vision tower).
  text_tower: `(ids, train=) -> (tokens [B, L, d_t], aux)` (the MiniLM / BERT tower, CLIP's).
  """

  image_tower: nn.Module
  text_tower: nn.Module
  width: int
  text_pad_id: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    self.image_adapter = nn.Dense(self.width, dtype=self.dtype)
    self.text_adapter = nn.Dense(self.width, dtype=self.dtype)

  def encode_one(self, x, *, train: bool):
    if is_tokens(x):
      h, _ = self.text_tower(x, train=train)
      return self.text_adapter(h), x != self.text_pad_id
    h, _ = self.image_tower(x, train=train)
    return self.image_adapter(h), jnp.ones(h.shape[:2], bool)

  def __call__(self, inputs, *, train: bool = False):
    parts = inputs if isinstance(inputs, tuple | list) else (inputs,)
    encoded = [self.encode_one(x, train=train) for x in parts]
    length = max(h.shape[1] for h, _ in encoded)
    hs, masks = [], []
    for h, m in encoded:
      pad = length - h.shape[1]
      hs.append(jnp.pad(h, ((0, 0), (0, pad), (0, 0))))
      masks.append(jnp.pad(m, ((0, 0), (0, pad))))
    h, mask = jnp.concatenate(hs), jnp.concatenate(masks)
    weights = mask[..., None].astype(h.dtype)
    pooled = jnp.sum(h * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)
    return h, {"mask": mask, "pooled": pooled}


def make_clip_dsi(
  docids: docids_lib.DocidMap,
  *,
  image_tower: nn.Module,
  text_tower: nn.Module,
  text_pad_id: int = 0,
  width: int = 256,
  decoder_depth: int = 3,
  mlp_dim: int = 1024,
  num_heads: int = 4,
  dropout: float = 0.1,
  dtype: Any = jnp.float32,
  embedding_ids: bool = False,
):
  """The CLIP-DSI network: both towers (`TwoTowerEncoder`) and a docid decoder of `width`.

  Wrap it as `DSIModel(network, docids, pretrained={"encoder": {"text_tower": ...,
  "image_tower": ...}})` to start from pretrained towers (any subset).
  """
  from dsi_jax.models.dsi import DSINetwork

  encoder = TwoTowerEncoder(image_tower, text_tower, width, text_pad_id, dtype)
  decoder = DocidDecoder(
    vocab_size=docids.vocab_size,
    max_length=docids.max_length,
    width=width,
    depth=decoder_depth,
    mlp_dim=mlp_dim,
    num_heads=num_heads,
    dropout=dropout,
    dtype=dtype,
    embedding_ids=embedding_ids,
  )
  return DSINetwork(encoder=encoder, decoder=decoder)


def make_vit_clip_dsi(
  docids: docids_lib.DocidMap,
  *,
  text_tower: nn.Module,
  image_tower: dict,
  width: int = 256,
  decoder_depth: int = 2,
):
  """CLIP-DSI with a BERT-style `text_tower` (e.g. MiniLM, `text.load_minilm`) and a ViT of
  `image_tower` sizes (`vit.ViT` arguments); a docid decoder of `width` (4 heads, MLP 4 x width)
  and `decoder_depth` layers: the Flickr experiment's network."""
  from dsi_jax.models import vit

  return make_clip_dsi(
    docids,
    image_tower=vit.ViT(**image_tower),
    text_tower=text_tower,
    text_pad_id=text_tower.config.pad_token_id,
    width=width,
    decoder_depth=decoder_depth,
    num_heads=4,
    mlp_dim=4 * width,
  )
