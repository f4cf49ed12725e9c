"""CLIP-DSI plumbing: two towers, one docid decoder, batches that mix captions and images."""

import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax import batches, optim, partitioning
from dsi_jax import docids as docids_lib
from dsi_jax import train as train_lib
from dsi_jax.models import dsi, multimodal, text, vit


def tiny_clip_dsi(ids, **kw):
  text_tower = text.BertEncoder(
    text.BertConfig(vocab_size=40, hidden=32, layers=1, heads=2, intermediate=64, dropout=0.0)
  )
  image_tower = vit.ViT(patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, dropout=0.0)
  network = multimodal.make_clip_dsi(
    ids,
    image_tower=image_tower,
    text_tower=text_tower,
    width=32,
    decoder_depth=1,
    mlp_dim=64,
    num_heads=2,
    dropout=0.0,
    **kw,
  )
  return dsi.DSIModel(network, ids)


def caption_data(n=8, seed=0):
  """n images; captions are token ids that name their image (2 train, 1 val, 1 test each)."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, size=(n, 8, 8, 3)).astype(np.float32)

  def captions(variant):  # [CLS]=1, then a word naming the image, a variant word, pad 0
    return np.array([[1, 10 + i, 30 + (variant + i) % 8, 2, 0] for i in range(n)], np.int32)

  train = np.concatenate([captions(0), captions(1)])
  return batches.RetrievalData(
    index_inputs=images,
    train_inputs=train,
    train_relevant=[np.array([i % n]) for i in range(2 * n)],
    val_inputs=captions(2),
    val_relevant=[np.array([i]) for i in range(n)],
    test_inputs=captions(3),
    test_relevant=[np.array([i]) for i in range(n)],
  )


def test_encoder_masks_padding_and_mixes_kinds_in_one_batch():
  ids = docids_lib.random_ids([f"img{i}" for i in range(8)], num_codes=4)
  model = tiny_clip_dsi(ids)
  data = caption_data()
  params = model.init(jax.random.PRNGKey(0), batches.example_inputs(data))
  assert set(params["encoder"]) == {"image_tower", "text_tower", "image_adapter", "text_adapter"}
  partitioning.logical_axes(params)  # every parameter is named for sharding
  apply = model.network.apply
  tokens, images = data.train_inputs[:3], data.index_inputs[:2]
  (encoded, _) = apply({"params": params}, (tokens, images), method=dsi.DSINetwork.encode)
  assert encoded["encoded"].shape == (5, 5, 32)  # 5 tokens > 4 patches: images padded
  np.testing.assert_array_equal(encoded["mask"][:3], tokens != 0)
  assert encoded["mask"][3:, :4].all() and not encoded["mask"][3:, 4:].any()
  # Each part encodes as it would alone.
  alone, _ = apply({"params": params}, images, method=dsi.DSINetwork.encode)
  np.testing.assert_allclose(encoded["encoded"][3:, :4], alone["encoded"], atol=1e-5)
  # The loss of a mixed batch is the loss over its parts, in order.
  targets = jnp.asarray(ids.targets())
  mixed = {"inputs": (tokens, images), "targets": (targets[:3], targets[:2])}
  loss, _ = model.loss_fn(params, mixed, None)
  t_loss, _ = model.loss_fn(params, {"inputs": tokens, "targets": targets[:3]}, None)
  i_loss, _ = model.loss_fn(params, {"inputs": images, "targets": targets[:2]}, None)
  np.testing.assert_allclose(loss, (3 * t_loss + 2 * i_loss) / 5, rtol=1e-5)


def test_clip_dsi_learns_images_and_captions_of_8_images(tmp_path):
  ids = docids_lib.random_ids([f"img{i}" for i in range(8)], num_codes=4)
  model = tiny_clip_dsi(ids)
  config = train_lib.TrainConfig(
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=10,
    index_target_accuracy=1.0,
    index_max_steps=300,
    index_eval_every=25,
    finetune_max_steps=200,
    finetune_eval_every=25,
    patience=4,
    eval_batch_size=8,
  )
  res = train_lib.train_dsi(
    model, caption_data(), config=config, workdir=str(tmp_path), show_progress=False
  )
  assert res["zero_shot"]["test"]["ia@1"] == 1.0  # image -> its own id
  ft = res["fine_tuned"]["test"]
  assert ft["ia@1"] == 1.0 and ft["test/hits@1"] == 1.0, ft  # unseen caption -> its image


def test_frozen_towers_keep_their_values_for_the_first_steps():
  ids = docids_lib.random_ids([f"img{i}" for i in range(8)], num_codes=4)
  model = tiny_clip_dsi(ids)
  data = caption_data()
  config = train_lib.TrainConfig(
    batch_size=8,
    warmup_steps=1,
    learning_rate=1e-2,
    freeze=("encoder/text_tower",),
    freeze_steps=2,
  )
  mesh = partitioning.make_mesh()
  state = train_lib.create_state(
    model, batches.example_inputs(data), config, jax.random.PRNGKey(0), mesh
  )
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step = train_lib.make_train_step(model.loss_fn, shardings, mesh)
  batch = batches.mixed_batches(data, ids.targets(), config, mesh)(0)
  batch = partitioning.global_batch(batch, mesh)
  states = [state]
  for _ in range(3):
    states.append(step(states[-1], batch, jax.random.PRNGKey(1))[0])

  def leaves(s, part):
    return jax.tree_util.tree_leaves(s.params["encoder"][part])

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))

  assert same(leaves(states[2], "text_tower"), leaves(states[0], "text_tower"))  # 2 frozen steps
  assert not same(leaves(states[3], "text_tower"), leaves(states[2], "text_tower"))  # then trains
  assert not same(leaves(states[2], "image_tower"), leaves(states[0], "image_tower"))


def test_contrastive_loss_pairs_captions_with_their_images():
  ids = docids_lib.random_ids([f"img{i}" for i in range(8)], num_codes=4)
  data = caption_data()
  plain, contrastive = tiny_clip_dsi(ids), tiny_clip_dsi(ids)
  contrastive.contrastive_weight = 0.5
  params = plain.init(jax.random.PRNGKey(0), batches.example_inputs(data))
  config = train_lib.TrainConfig(batch_size=8)
  mesh = partitioning.make_mesh()
  targets = ids.targets()
  batch = batches.mixed_batches(data, targets, config, mesh, paired=True)(3)
  queries, items = batch["inputs"]
  q_targets, i_targets = batch["targets"]
  np.testing.assert_array_equal(q_targets, i_targets)  # row i: a caption and its own image
  for q, image in zip(queries, items):  # caption word 10 + i names image i
    np.testing.assert_array_equal(image, data.index_inputs[q[1] - 10])
  unpaired = batches.mixed_batches(data, targets, config, mesh)(3)
  assert not np.array_equal(unpaired["targets"][0], unpaired["targets"][1])

  loss0, aux0 = plain.loss_fn(params, batch, None)
  loss1, aux1 = contrastive.loss_fn(params, batch, None)
  assert "contrastive_loss" not in aux0
  np.testing.assert_allclose(aux1["id_loss"], loss0, rtol=1e-6)
  # InfoNCE on the (token-masked) means of the two towers' (adapted) outputs, temperature 0.05.
  (_, enc_aux) = plain.network.apply(
    {"params": params}, batch["inputs"], method=dsi.DSINetwork.encode
  )
  p = enc_aux["pooled"] / np.linalg.norm(enc_aux["pooled"], axis=-1, keepdims=True)
  logits = np.array(p[:4] @ p[4:].T / 0.05)
  shared = (q_targets[:, None] == q_targets[None]).all(-1) & ~np.eye(4, dtype=bool)
  logits[shared] = -np.inf  # two captions of one image are not each other's negatives
  expected = 0.5 * (
    np.mean(jax.nn.logsumexp(logits, 1) - np.diag(logits))
    + np.mean(jax.nn.logsumexp(logits, 0) - np.diag(logits))
  )
  np.testing.assert_allclose(aux1["contrastive_loss"], expected, rtol=1e-4)
  np.testing.assert_allclose(loss1, loss0 + 0.5 * expected, rtol=1e-5)
  # The contrastive term trains both towers.
  grads = jax.grad(lambda pr: contrastive.loss_fn(pr, batch, None)[1]["contrastive_loss"])(params)
  for tower in ("text_tower", "image_tower"):
    assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads["encoder"][tower]))


def test_lr_multipliers_scale_the_updates_of_a_subtree():
  params = {
    "encoder": {"text_tower": {"kernel": jnp.ones((2, 3))}, "text_tower_norm": jnp.ones(3)},
    "decoder": {"kernel": jnp.ones((3, 2))},
  }
  grads = jax.tree_util.tree_map(
    lambda x: jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape), params
  )
  base = optim.make_optimizer(1e-2, warmup_steps=1)
  scaled = optim.make_optimizer(1e-2, warmup_steps=1, lr_multipliers=(("encoder/text_tower", 0.1),))
  u0, _ = base.update(grads, base.init(params), params)
  u1, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(
    u1["encoder"]["text_tower"]["kernel"], 0.1 * u0["encoder"]["text_tower"]["kernel"], rtol=1e-6
  )
  np.testing.assert_array_equal(u1["encoder"]["text_tower_norm"], u0["encoder"]["text_tower_norm"])
  np.testing.assert_array_equal(u1["decoder"]["kernel"], u0["decoder"]["kernel"])


def test_caption_prototypes_rank_an_image_by_its_training_captions():
  import types

  from dsi_jax.data import corpus as corpus_lib
  from dsi_jax.experiments import flickr

  things = ["dog", "guitar", "sailing boat", "bicycle", "birthday cake", "snowy mountain"]
  captions = [
    [
      f"a {t} in the picture",
      f"a photo of a {t}",
      f"there is a {t} here",
      f"the {t} is outside",
      f"someone looks at a {t}",  # the test caption, never seen by the prototypes
    ]
    for t in things
  ]
  keys = [f"img{i}.jpg" for i in range(len(things))]
  corpus = corpus_lib.caption_corpus(keys, captions, num_items=len(keys), seed=0)
  index = {k: i for i, k in enumerate(corpus.indexed)}
  test = corpus.split("test")
  data = types.SimpleNamespace(
    test_inputs=np.zeros((len(test), 4), np.int32),
    test_relevant=[[index[q.relevant[0]]] for q in test],
  )
  minilm = text.load_minilm()
  row = flickr.caption_prototype_row(
    corpus, data, minilm, dataset="toy", db_size=len(keys), num_queries=len(test)
  )
  assert row["model"] == "caption_prototypes" and row["num_queries"] == len(things)
  assert row["recall@1"] == 1.0
  # Wrong images as the relevant ones: the same ranking now misses.
  data.test_relevant = [[(r[0] + 1) % len(keys)] for r in data.test_relevant]
  assert (
    flickr.caption_prototype_row(corpus, data, minilm, dataset="toy", db_size=6, num_queries=6)[
      "recall@1"
    ]
    == 0.0
  )
