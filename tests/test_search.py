"""`dsi-jax search` on the run folders of the demo, the Flickr experiment and the SQuAD tool
(tiny budgets): an indexed item, given as a user would have it, comes back first."""

import dataclasses
import json
import os

import cv2
import numpy as np
import pytest

from dsi_jax import checkpoints, cli, runs
from dsi_jax import docids as docids_lib
from dsi_jax import train as train_lib
from dsi_jax.batches import RetrievalData
from dsi_jax.data import fashion_mnist

TINY_TRAIN = dict(
  batch_size=8,
  learning_rate=1e-3,
  warmup_steps=5,
  index_target_accuracy=1.0,
  index_max_steps=200,
  index_eval_every=20,
  finetune_max_steps=20,
  finetune_eval_every=10,
  eval_batch_size=8,
)


def search_json(capsys, *argv):
  capsys.readouterr()
  assert cli.main(["search", *argv, "--json"]) == 0
  return json.loads(capsys.readouterr().out)


@pytest.mark.skipif(
  not os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)),
  reason="Fashion-MNIST not installed",
)
def test_demo_run_finds_an_indexed_item_from_its_28px_png(tmp_path, capsys):
  out = tmp_path / "demo"
  assert (
    cli.main(["demo", "--quick", "--num-images", "40", "--out", str(out), "--no-progress"]) == 0
  )
  run = out / "runs" / "seed0" / "vit_dsi_clustered"
  corpus = json.loads((run / "corpus" / "corpus.json").read_text())
  images, _ = fashion_mnist.load_fashion_mnist()
  firsts = []
  for key in corpus["indexed"]:
    png = tmp_path / f"{key}.png"
    cv2.imwrite(str(png), images[int(key.split("-")[1])])  # 28 px grayscale, as published
    hits = search_json(capsys, str(run), "--image", str(png), "-k", "5", "--phase", "zero_shot")
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5] and hits[0]["path"] is None
    assert len({h["key"] for h in hits}) == 5
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    firsts.append(hits[0]["key"] == key)
  # Indexing ran until IA@1 >= 0.98 on these 10 items: every one comes back first from its PNG.
  assert all(firsts)
  # The folder of several runs names them; a folder that is no run says so; bad images too.
  assert cli.main(["search", str(out), "--image", str(png)]) == 2
  assert "holds 2 runs" in capsys.readouterr().err
  (tmp_path / "bad.png").write_bytes(b"not an image")
  assert cli.main(["search", str(run), "--image", str(tmp_path / "bad.png")]) == 2
  assert "bad.png: not a decodable image" in capsys.readouterr().err
  assert cli.main(["search", str(run), "--text", "a shoe"]) == 2
  assert "reads image queries" in capsys.readouterr().err


COLOURS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 230, 0)}


def test_clip_dsi_run_finds_images_by_caption_and_by_image(tmp_path, capsys):
  from dsi_jax.data import inputs
  from dsi_jax.experiments import flickr
  from dsi_jax.models import text

  folder = tmp_path / "flickr" / "images"
  folder.mkdir(parents=True)
  keys = [f"{c}.png" for c in COLOURS]
  pixels = np.stack([np.full((16, 16, 3), rgb, np.uint8) for rgb in COLOURS.values()])
  for key, p in zip(keys, pixels):
    cv2.imwrite(str(folder / key), cv2.cvtColor(p, cv2.COLOR_RGB2BGR))
  minilm = text.load_minilm()
  tokenizer = text.load_tokenizer(os.path.join(text.minilm_dir(), text.TOKENIZER_FILE))
  tokenizer.no_truncation()
  tokenizer.no_padding()
  captions = [f"a {c} square" for c in COLOURS]
  tokens = inputs.token_rows([inputs.text_token_ids(tokenizer, c) for c in captions], 8)
  relevant = [np.array([i]) for i in range(4)]
  data = RetrievalData(
    inputs.image_inputs(pixels), tokens, relevant, tokens, relevant, tokens, relevant
  )
  config = flickr.FlickrConfig(
    ids="atomic",
    text_length=8,
    image_tower=dict(patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2, dropout=0.0),
    width=32,
    decoder_depth=1,
    train=train_lib.TrainConfig(**TINY_TRAIN, ranking="beam"),
    text_lr_multiplier=0.1,
    location=str(tmp_path / "flickr"),
  )
  common = dict(dataset="toy", db_size=4, num_queries=4)
  docids = docids_lib.atomic_ids(keys)
  rows = flickr.train_clip_dsi(config, data, docids, minilm, str(tmp_path), False, common)
  assert rows[-1]["recall@1"] == 1.0  # the training captions are the test captions here
  run = str(tmp_path / "clip_dsi")
  for colour, key in zip(COLOURS, keys):
    hits = search_json(capsys, run, "--caption", f"a {colour} square", "-k", "3")
    assert hits[0]["key"] == key and hits[0]["path"] == str(folder / key)
  big = tmp_path / "big_rgba.png"  # another size and an alpha channel: prepared as the corpus
  rgba = np.dstack([np.full((50, 40, 3), (0, 0, 255), np.uint8), np.full((50, 40), 255, np.uint8)])
  cv2.imwrite(str(big), rgba[..., [2, 1, 0, 3]])
  hits = search_json(capsys, str(tmp_path), "--image", str(big), "-k", "2")  # the one run below
  assert hits[0]["key"] == "blue.png"


PARAGRAPHS = [
  "The Normans were the people who gave their name to Normandy in France.",
  "Oxygen is a chemical element with symbol O and atomic number 8.",
  "The Amazon rainforest covers much of the Amazon basin of South America.",
  "Victoria is the capital of the Canadian province of British Columbia.",
]


def squad_folder(folder):
  """A tiny exported SQuAD folder: four paragraphs (their first 24 word pieces), each its
  own query in every split, and their texts (what `squad.export` writes)."""
  from dsi_jax.data import inputs
  from dsi_jax.experiments import squad
  from dsi_jax.models import text

  tokenizer = text.load_tokenizer(os.path.join(text.minilm_dir(), text.TOKENIZER_FILE))
  tokenizer.no_truncation()
  tokenizer.no_padding()
  tokens = inputs.token_rows([inputs.text_token_ids(tokenizer, p) for p in PARAGRAPHS], 24)
  docids = docids_lib.atomic_ids([f"p{i}" for i in range(4)])
  folder.mkdir()
  arrays = {"index_inputs": tokens}
  for split in squad.SPLITS:
    arrays[f"{split}_inputs"] = tokens
    arrays[f"{split}_relevant"] = np.arange(4, dtype=np.int32)
    arrays[f"{split}_relevant_counts"] = np.ones(4, np.int32)
  np.savez(folder / "arrays.npz", **arrays)
  docids.save(str(folder / "docids.json"))
  texts = {"documents": PARAGRAPHS, **{f"{s}_questions": PARAGRAPHS for s in squad.SPLITS}}
  (folder / "texts.json").write_text(json.dumps(texts))
  return folder


def test_squad_run_with_ids_from_embeddings_is_searchable(tmp_path, capsys):
  from dsi_jax.experiments import squad

  folder = squad_folder(tmp_path / "data")
  config = squad.SquadConfig(
    train=train_lib.TrainConfig(
      **TINY_TRAIN, ranking="exact", eval_metrics=("map@10", *squad.METRICS), rank_weight=1.0
    ),
    frozen_encoder=True,
    embedding_ids=True,
    embedding_rows="paragraph",
    teacher="dual_encoder",  # and the ranking loss distilling the dual encoder
  )
  rows = squad.run(str(folder), str(tmp_path / "run"), config=config, show_progress=False)
  assert rows[0]["model"] == (
    "minilm_dsi_frozen_encoder_embedding_ids_of_paragraphs_distilled_from_dual_encoder"
  )
  with pytest.raises(ValueError, match="teacher and TrainConfig.rank_weight"):
    dataclasses.replace(config, teacher=None)
  assert runs.load_spec(str(tmp_path / "run")).kwargs == {"frozen": True, "embedding_ids": True}
  with pytest.raises(ValueError, match="embedding_rows"):
    squad.run(
      str(folder), str(tmp_path / "bad"), config=dataclasses.replace(config, embedding_rows="x")
    )
  for question, key in [("Which element has number 8?", "p1"), ("Where is Victoria?", "p3")]:
    hits = search_json(capsys, str(tmp_path / "run"), "--text", question, "-k", "1")
    assert hits[0]["key"] == key  # questions never trained on


def test_squad_run_finds_a_paragraph_by_its_text(tmp_path, capsys):
  from dsi_jax.experiments import squad

  paragraphs = PARAGRAPHS
  folder = squad_folder(tmp_path / "data")
  config = squad.SquadConfig(
    train=train_lib.TrainConfig(
      **TINY_TRAIN, ranking="beam", eval_metrics=("map@10", *squad.METRICS)
    ),
    frozen_encoder=True,
  )
  squad.run(str(folder), str(tmp_path / "run"), config=config, show_progress=False)
  assert runs.load_spec(str(tmp_path / "run")).kwargs == {"frozen": True}
  for i, p in enumerate(paragraphs):
    hits = search_json(capsys, str(tmp_path / "run"), "--text", p, "-k", "2")
    assert hits[0]["key"] == f"p{i}"
  assert cli.main(["search", str(tmp_path / "run"), "--image", str(folder / "docids.json")]) == 2
  assert "reads text queries" in capsys.readouterr().err
  # Ids permuted among the keys (still a valid map) are refused, naming the file.
  ids_path = tmp_path / "run" / "docids.json"
  original = ids_path.read_text()
  permuted = docids_lib.from_mapping(
    {f"p{i}": [(i + 1) % 4] for i in range(4)}, num_codes=4, scheme="atomic"
  )
  permuted.save(str(ids_path))
  assert cli.main(["search", str(tmp_path / "run"), "--text", paragraphs[0]]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "docids.json: the ids differ from what the run" in err
  ids_path.write_text(original)
  assert search_json(capsys, str(tmp_path / "run"), "--text", paragraphs[0], "-k", "1")
  # So is a model spec edited after training (still a valid spec), naming model.json.
  spec_path = tmp_path / "run" / "model.json"
  spec_text = spec_path.read_text()
  edited = json.loads(spec_text)
  edited["ranking"] = {"method": "beam", "num_beams": 3}
  spec_path.write_text(json.dumps(edited))
  assert cli.main(["search", str(tmp_path / "run"), "--text", paragraphs[0]]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "model.json: the model spec differs from" in err
  spec_path.write_text(spec_text)
  assert search_json(capsys, str(tmp_path / "run"), "--text", paragraphs[0], "-k", "1")
  # So is a checkpoint changed, added to, cut short, or taken from another run.
  phase = tmp_path / "run" / "checkpoints" / "fine_tuned"
  step = phase / max(os.listdir(phase), key=lambda d: int(d) if d.isdigit() else -1)
  files = [os.path.join(r, f) for r, _, fs in os.walk(step) for f in fs]
  data_file = max(files, key=os.path.getsize)
  run_json = tmp_path / "run" / "run.json"
  original_run = run_json.read_text()
  other_run = json.loads(original_run)
  other_run["train_config"]["seed"] += 1
  digest = step / checkpoints.DIGEST_FILE

  def flip_a_byte():
    blob = bytearray(open(data_file, "rb").read())
    blob[len(blob) // 2] ^= 1
    open(data_file, "wb").write(bytes(blob))

  cases = [
    (flip_a_byte, "changed since the checkpoint was saved", data_file),
    (
      lambda: (step / "best" / "extra").write_text("x"),
      "not part of the saved checkpoint",
      "extra",
    ),
    (lambda: run_json.write_text(json.dumps(other_run)), "saved by another run", str(step)),
    (lambda: digest.unlink(), "rerun its training command", str(step)),
  ]
  for tamper, expected, where in cases:
    saved = {f: open(f, "rb").read() for f in [*files, str(run_json)]}
    tamper()
    capsys.readouterr()
    assert cli.main(["search", str(tmp_path / "run"), "--text", paragraphs[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and where in err, err
    if (step / "best" / "extra").exists():
      (step / "best" / "extra").unlink()
    for f, blob in saved.items():
      open(f, "wb").write(blob)
    assert search_json(capsys, str(tmp_path / "run"), "--text", paragraphs[0], "-k", "1")
