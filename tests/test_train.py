"""The trainer end to end on tiny models (seconds on 2 CPU cores)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsi_jax import batches, cli
from dsi_jax import docids as docids_lib
from dsi_jax import train as train_lib
from dsi_jax.data import fashion_mnist
from dsi_jax.models import dsi

TINY = dict(patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, dropout=0.0, decoder_depth=1)


def tiny_data(n_index=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, size=(n_index + 12, 8, 8, 1)).astype(np.float32)
  rel = [np.array([i % n_index, (i + 1) % n_index]) for i in range(4)]
  return batches.RetrievalData(
    index_inputs=images[:n_index],
    train_inputs=images[n_index : n_index + 4],
    train_relevant=rel,
    val_inputs=images[n_index + 4 : n_index + 8],
    val_relevant=rel,
    test_inputs=images[n_index + 8 :],
    test_relevant=rel,
  )


def test_epoch_indices_cover_every_row_once_per_epoch():
  rows = np.concatenate([batches.epoch_indices(10, 4, s, seed=0) for s in range(5)])  # 2 epochs
  assert sorted(rows[:10].tolist()) == list(range(10))
  assert sorted(rows[10:20].tolist()) == list(range(10))
  np.testing.assert_array_equal(batches.epoch_indices(10, 4, 3, seed=0), rows[12:16])


def test_tiny_model_memorises_16_images(tmp_path):
  data = tiny_data()
  ids = docids_lib.random_ids([f"img{i}" for i in range(16)], num_codes=4, seed=0)
  model = dsi.DSIModel(dsi.make_vit_dsi(ids, **TINY), ids)
  config = train_lib.TrainConfig(
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=10,
    index_target_accuracy=1.0,
    index_max_steps=400,
    index_eval_every=20,
    finetune_max_steps=20,
    finetune_eval_every=10,
    eval_batch_size=16,
  )
  res = train_lib.train_dsi(model, data, config=config, workdir=str(tmp_path), show_progress=False)
  zs = res["zero_shot"]
  assert zs["test"]["ia@1"] == 1.0, zs["history"][-1]
  assert zs["steps"] < 400  # stopped by the accuracy target, not the cap
  # IA@1 checked independently: exact scoring ranks each image's own id first.
  items, _ = model.rank(res["zero_shot_params"], jnp.asarray(data.index_inputs), 1, method="exact")
  np.testing.assert_array_equal(items[:, 0], np.arange(16))
  # What the run leaves behind: ids, checkpoints that restore, TensorBoard events, history.
  assert docids_lib.DocidMap.load(tmp_path / "docids.json") == ids
  restored = train_lib.restore_params(
    str(tmp_path / "checkpoints" / "zero_shot"), res["zero_shot_params"]
  )
  for a, b in zip(
    jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(res["zero_shot_params"])
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  events = [f for _, _, fs in os.walk(tmp_path / "tensorboard") for f in fs if "tfevents" in f]
  assert events
  history = json.loads((tmp_path / "history.json").read_text())
  assert history["zero_shot"][-1]["ia@1"] == 1.0
  assert "fine_tuned" in res and 0.0 <= res["fine_tuned"]["test"]["test/map@10"] <= 1.0


def test_restore_from_empty_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    train_lib.restore_params(str(tmp_path), {})


@pytest.mark.skipif(
  not os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)),
  reason="Fashion-MNIST not installed",
)
def test_gin_train_command_runs_an_experiment(tmp_path):
  workdir = tmp_path / "run"
  argv = [
    "train",
    "--gin_file=gin_configs/experiments/fmnist512_clustered.gin",
    f"--gin_bindings=dsi_jax.run_experiment.workdir='{workdir}'",
    "--gin_bindings=dsi_jax.FashionMnistConfig.num_images=40",
    (
      "--gin_bindings=dsi_jax.FashionMnistConfig.model={'patch_size': 8, 'width': 32, "
      "'depth': 1, 'mlp_dim': 32, 'num_heads': 2, 'decoder_depth': 1}"
    ),
    "--gin_bindings=dsi_jax.TrainConfig.index_max_steps=4",
    "--gin_bindings=dsi_jax.TrainConfig.index_eval_every=2",
    "--gin_bindings=dsi_jax.TrainConfig.finetune_max_steps=2",
    "--gin_bindings=dsi_jax.TrainConfig.finetune_eval_every=2",
  ]
  assert cli.main(argv) == 0
  first = json.loads((workdir / "results.json").read_text())
  # The same command again in the same workdir resumes: both phases are done, nothing retrains.
  assert cli.main(argv) == 0
  assert json.loads((workdir / "results.json").read_text())["rows"] == first["rows"]
  # A different run in the same workdir replaces the earlier run's checkpoints.
  assert cli.main([*argv, "--gin_bindings=dsi_jax.TrainConfig.index_max_steps=6"]) == 0
  report = json.loads((workdir / "results.json").read_text())
  assert [r["setting"] for r in report["rows"]] == ["zero_shot", "fine_tuned"]
  assert report["rows"][0]["db_size"] == 40 and report["config"]["model"]["width"] == 32
  assert report["rows"][0]["steps"] == 6


def test_trained_once_restores_what_it_trained_under_the_same_fingerprint(tmp_path):
  from dsi_jax import checkpoints, workdir

  calls = []

  def train():
    calls.append(1)
    return {"w": jnp.arange(6.0).reshape(2, 3), "b": {"x": jnp.ones(3)}}, {"seconds": 1.5}

  template = {"w": jnp.zeros((2, 3)), "b": {"x": jnp.zeros(3)}}
  folder = str(tmp_path / "stage")
  data = workdir.arrays_sha256(np.arange(4), np.ones((2, 2), np.float32))
  assert data != workdir.arrays_sha256(np.arange(4), np.ones((2, 2), np.float64))
  first, info = checkpoints.trained_once(folder, {"steps": 3, "data": data}, template, train)
  again, info2 = checkpoints.trained_once(folder, {"steps": 3, "data": data}, template, train)
  assert len(calls) == 1 and info2 == info == {"seconds": 1.5}
  np.testing.assert_array_equal(again["w"], first["w"])
  checkpoints.trained_once(folder, {"steps": 4, "data": data}, template, train)  # other settings
  assert len(calls) == 2 and os.listdir(tmp_path) == ["stage"]  # replaced, no leftovers
