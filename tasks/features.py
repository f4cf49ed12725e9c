"""The feature converter that feeds a DSI model from the tasks' features (see `core`)."""

from __future__ import annotations

import seqio
import tensorflow as tf

MODALITIES = ("image", "text", "image+text")


class DSIFeatureConverter(seqio.FeatureConverter):
  """Task features (`inputs`, `targets`[, `text_inputs`]) -> encoder-decoder model features.

  `encoder_input_tokens` is the encoder input: int32 tokens for text, float32 pixels
  `[size, size, 3]` for images (then its "length" is the image side). Decoder features are
  t5x's: `decoder_target_tokens`, `decoder_input_tokens` (targets shifted right, pad first) and
  `decoder_loss_weights`. No packing: every example is one (input, id) pair.
  """

  def __init__(self, modality: str = "image", pack: bool = False, **kwargs):
    if pack:
      raise ValueError("DSIFeatureConverter does not pack examples")
    if modality not in MODALITIES:
      raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    self.modality = modality
    spec = seqio.FeatureConverter.FeatureSpec
    image = modality in ("image", "image+text")
    inputs = spec(dtype=tf.float32, rank=3) if image else spec(dtype=tf.int32)
    self.TASK_FEATURES = {"inputs": inputs, "targets": spec(dtype=tf.int32)}
    self.MODEL_FEATURES = {
      "encoder_input_tokens": inputs,
      "decoder_target_tokens": spec(dtype=tf.int32),
      "decoder_input_tokens": spec(dtype=tf.int32),
      "decoder_loss_weights": spec(dtype=tf.int32),
    }
    if modality == "image+text":
      self.TASK_FEATURES["text_inputs"] = spec(dtype=tf.int32)
      self.MODEL_FEATURES["encoder_text_tokens"] = spec(dtype=tf.int32)
    self.PACKING_FEATURE_DTYPES = {}
    super().__init__(pack=False, **kwargs)

  def _convert_features(self, ds, task_feature_lengths):
    lengths = dict(task_feature_lengths)
    if self.modality != "text":
      lengths.pop("inputs")  # images are not trimmed or padded
    ds = self._pack_or_pad(ds, lengths)

    def convert(ex):
      out = {
        "encoder_input_tokens": ex["inputs"],
        "decoder_target_tokens": ex["targets"],
        "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(ex["targets"]),
        "decoder_loss_weights": seqio.non_padding_position(ex["targets"]),
      }
      if self.modality == "image+text":
        out["encoder_text_tokens"] = ex["text_inputs"]
      return out

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    out = {
      "encoder_input_tokens": task_feature_lengths["inputs"],
      "decoder_target_tokens": task_feature_lengths["targets"],
      "decoder_input_tokens": task_feature_lengths["targets"],
      "decoder_loss_weights": task_feature_lengths["targets"],
    }
    if self.modality == "image+text":
      out["encoder_text_tokens"] = task_feature_lengths["text_inputs"]
    return out
