"""The Flickr8k-1k experiment end to end with tiny budgets (slow: compiles MiniLM, a ViT and a
decoder for both methods)."""

import json
import os

import pytest

from dsi_jax import cli

pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif("DSI_JAX_FLICKR8K_DIR" not in os.environ, reason="Flickr8k-1k not found"),
]


def test_gin_experiment_reports_both_methods_and_search_finds_images(tmp_path, capsys):
  argv = [
    "train",
    "--gin_file=gin_configs/experiments/flickr8k1k_clip_dsi.gin",
    f"--gin_bindings=dsi_jax.run_flickr_experiment.workdir='{tmp_path}'",
    "--gin_bindings=dsi_jax.FlickrConfig.max_eval_queries=64",
    "--gin_bindings=dsi_jax.DualEncoderConfig.steps=4",
    "--gin_bindings=dsi_jax.run_flickr_experiment.show_progress=False",
    "--gin_bindings=dsi_jax.FlickrConfig.image_tower={'depth': 1, 'width': 32, "
    "'mlp_dim': 64, 'num_heads': 2}",
    "--gin_bindings=dsi_jax.FlickrConfig.width=64",
    "--gin_bindings=dsi_jax.FlickrConfig.decoder_depth=1",
    "--gin_bindings=dsi_jax.TrainConfig.index_max_steps=4",
    "--gin_bindings=dsi_jax.TrainConfig.index_eval_every=4",
    "--gin_bindings=dsi_jax.TrainConfig.finetune_max_steps=4",
    "--gin_bindings=dsi_jax.TrainConfig.finetune_eval_every=4",
    "--gin_bindings=dsi_jax.TrainConfig.batch_size=8",
  ]
  assert cli.main(argv) == 0
  report = json.loads((tmp_path / "results.json").read_text())
  rows = {(r["model"], r["setting"]): r for r in report["rows"]}
  assert set(rows) == {
    ("clip_dsi", "zero_shot"),
    ("clip_dsi", "fine_tuned"),
    ("dual_encoder", "fine_tuned"),
    ("caption_prototypes", "no training, no pixels"),
  }
  for row in rows.values():
    assert row["db_size"] == 1000 and row["num_queries"] == 64
    for metric in ("recall@1", "recall@5", "recall@10"):
      assert 0.0 <= row[metric] <= 1.0, (row["model"], metric)
    assert row["recall@1"] <= row["recall@5"] <= row["recall@10"]
    if row["model"] != "caption_prototypes":  # text only: it has no image queries
      assert 0.0 <= row["ia@1"] <= 1.0, row["model"]
  # The text-only reference is far above chance (3 training captions per image, MiniLM).
  assert rows[("caption_prototypes", "no training, no pixels")]["recall@10"] > 0.5
  assert rows[("dual_encoder", "fine_tuned")]["ia@1"] == 1.0  # an image is nearest itself
  # `dsi-jax search` on the trained workdir: k distinct image files, best first.
  capsys.readouterr()
  assert cli.main(["search", str(tmp_path), "--caption", "a dog runs on the grass", "-k", "5"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 5
  paths = [line.split()[-1] for line in lines]
  scores = [float(line.split()[1]) for line in lines]
  assert len(set(paths)) == 5 and all(os.path.isfile(p) for p in paths)
  assert scores == sorted(scores, reverse=True)
  assert cli.main(["search", str(tmp_path), "--image", paths[0], "-k", "3"]) == 0
  assert len(capsys.readouterr().out.strip().splitlines()) == 3
  assert cli.main(["search", str(tmp_path), "--image", str(tmp_path / "nope.jpg")]) == 2
