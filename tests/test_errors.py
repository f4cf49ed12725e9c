"""Bad input through the CLI and the trainer: exit 2, one line on stderr naming the problem,
and nothing half written."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import TINY, tiny_data  # noqa: E402

from dsi_jax import checkpoints, cli
from dsi_jax import docids as docids_lib
from dsi_jax import train as train_lib
from dsi_jax.data import fashion_mnist
from dsi_jax.models import dsi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_GIN = "gin_configs/experiments/fmnist512_clustered.gin"


def listing(folder):
  return sorted(
    os.path.relpath(os.path.join(root, f), folder)
    for root, dirs, files in os.walk(folder)
    for f in files + dirs
  )


def fails(capsys, argv, *expected):
  """Runs `dsi-jax argv`; checks exit 2 and one stderr line holding every `expected` text."""
  capsys.readouterr()
  assert cli.main(argv) == 2, argv
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert err.startswith(f"dsi-jax {argv[0]}: error: "), err
  for text in expected:
    assert text in err, (text, err)
  return err


@pytest.mark.parametrize("k", ["0", "-1"])
def test_search_k_must_be_positive(tmp_path, capsys, k):
  fails(capsys, ["search", str(tmp_path), "--caption", "x", "-k", k], "-k must be >= 1")


def test_search_of_a_folder_that_is_no_run(tmp_path, capsys):
  fails(capsys, ["search", str(tmp_path), "--caption", "x"], str(tmp_path), "not a run folder")


def test_train_gin_files_that_are_missing_or_broken(tmp_path, capsys):
  fails(capsys, ["train", f"--gin_file={tmp_path / 'nope.gin'}"], "nope.gin: no such gin file")
  bad = tmp_path / "bad.gin"
  bad.write_text("dsi_jax.TrainConfig.batch_size = (\n")
  fails(capsys, ["train", f"--gin_file={bad}"], "bad gin configuration")
  fails(capsys, ["train", f"--gin_file={FMNIST_GIN}", "--gin_bindings=nonsense ="], "bad gin")


@pytest.mark.parametrize(
  "binding, expected",
  [
    ("batch_size='abc'", "TrainConfig.batch_size must be an integer, got 'abc'"),
    ("batch_size=0", "TrainConfig.batch_size must be >= 1, got 0"),
    ("learning_rate=-1.0", "TrainConfig.learning_rate must be a number >= 0"),
    ("ranking='best'", "TrainConfig.ranking must be"),
  ],
)
def test_bad_train_config_values_write_nothing(tmp_path, capsys, monkeypatch, binding, expected):
  # Run from outside the repository: the gin file's includes resolve without error lines.
  monkeypatch.chdir(tmp_path)
  workdir = tmp_path / "run"
  argv = [
    "train",
    f"--gin_file={os.path.join(ROOT, FMNIST_GIN)}",
    f"--gin_bindings=dsi_jax.run_experiment.workdir='{workdir}'",
    f"--gin_bindings=dsi_jax.TrainConfig.{binding}",
  ]
  fails(capsys, argv, expected)
  assert not workdir.exists()


def test_output_folder_that_is_a_file(tmp_path, capsys):
  out = tmp_path / "out"
  out.write_text("a file")
  fails(capsys, ["demo", "--quick", "--out", str(out), "--no-progress"], str(out), "is a file")
  assert out.read_text() == "a file"


@pytest.mark.parametrize(
  "content, expected",
  [
    (None, "a folder, not a results.json"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not valid JSON"),
    (b'{"rows": [{"model": "bm25"', "not valid JSON"),
    (b'{"rows": [1, 2]}', "row 0 is not an object"),
    (b'{"rows": [{"db_size": 3, "num_queries": 2}]}', "row 0 has no model"),
    (b'{"rows": []}', "no rows"),
    (b'[{"model": "bm25"}]', "not a results file"),
  ],
)
def test_table_on_files_that_are_not_results(tmp_path, capsys, content, expected):
  path = tmp_path / "results.json"
  if content is None:
    path.mkdir()
  else:
    path.write_bytes(content)
  fails(capsys, ["table", str(path)], str(path), expected)
  fails(capsys, ["table", str(tmp_path / "missing.json")], "missing.json: no such file")


def test_table_of_a_results_file_without_config_prints_its_rows(tmp_path, capsys):
  row = {"model": "bm25", "db_size": 3, "num_queries": 2, "hits@1": 0.5}
  path = tmp_path / "results.json"
  path.write_text(json.dumps({"rows": [row]}))
  assert cli.main(["table", str(path)]) == 0
  assert "| bm25 |" in capsys.readouterr().out


def test_a_checkpoint_that_cannot_be_written_stops_the_run(tmp_path, monkeypatch):
  """The second save fails (as on a full or read-only disk): training stops there with one
  line naming the folder, and the first checkpoint still restores."""
  data = tiny_data()
  ids = docids_lib.random_ids([f"img{i}" for i in range(16)], num_codes=4, seed=0)
  model = dsi.DSIModel(dsi.make_vit_dsi(ids, **TINY), ids)
  config = train_lib.TrainConfig(
    batch_size=8,
    warmup_steps=2,
    index_target_accuracy=1.0,
    index_max_steps=40,
    index_eval_every=5,
    checkpoint_every=5,
    eval_batch_size=8,
  )
  real_save = ocp.CheckpointManager.save
  saved = []

  def failing_save(self, step, *args, **kwargs):
    if saved:
      raise OSError(28, "No space left on device")
    saved.append(step)
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  with pytest.raises(checkpoints.CheckpointWriteError) as info:
    train_lib.train_dsi(model, data, config=config, workdir=str(tmp_path), show_progress=False)
  message = str(info.value)
  assert len(message.splitlines()) == 1
  assert "could not write checkpoint step 10" in message and "No space left" in message
  assert str(tmp_path / "checkpoints" / "zero_shot") in message
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  assert saved == [5]
  restored = checkpoints.PhaseCheckpoints(str(tmp_path / "checkpoints" / "zero_shot"))
  assert restored.manager.latest_step() == 5
  restored.close()
  # A model that the checkpoint does not fit (another num_codes) is refused before orbax
  # reads anything, naming the first array that differs.
  other = docids_lib.random_ids([f"img{i}" for i in range(16)], num_codes=6, seed=0)
  template = dsi.DSIModel(dsi.make_vit_dsi(other, **TINY), other).init(
    jax.random.PRNGKey(0), data.index_inputs.shape
  )
  with pytest.raises(checkpoints.CheckpointMismatch) as info:
    checkpoints.restore_params(str(tmp_path / "checkpoints" / "zero_shot"), template)
  message = str(info.value)
  assert len(message.splitlines()) == 1 and "checkpoint params do not fit the model" in message
  assert "decoder/logits/bias: saved shape (6,), the model's (8,)" in message


def test_a_full_disk_stops_the_command_with_one_line(tmp_path):
  """`dsi-jax train` where no file may grow past 64 KiB (as on a full disk; it holds for root
  too, unlike a read-only folder): exit 2, one error line naming what could not be written
  and where, no traceback, nothing left that a rerun would take for finished work. First the
  dataset cannot be prepared; then (dataset prepared) the first checkpoint cannot be saved."""
  if not os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)):
    pytest.skip("Fashion-MNIST not installed")
  child = (
    "import resource, signal, sys\n"
    "limit = int(sys.argv.pop(1))\n"
    "if limit:\n"
    "  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
    "from dsi_jax import cli\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
  )

  def train(limit, workdir, data_dir):
    argv = [
      "train",
      f"--gin_file={FMNIST_GIN}",
      f"--gin_bindings=dsi_jax.run_experiment.workdir='{workdir}'",
      "--gin_bindings=dsi_jax.FashionMnistConfig.num_images=40",
      "--gin_bindings=dsi_jax.FashionMnistConfig.model={'patch_size': 8, 'width': 32, "
      "'depth': 1, 'mlp_dim': 32, 'num_heads': 2, 'decoder_depth': 1}",
      "--gin_bindings=dsi_jax.TrainConfig.index_max_steps=4",
      "--gin_bindings=dsi_jax.TrainConfig.index_eval_every=2",
      "--gin_bindings=dsi_jax.TrainConfig.checkpoint_every=2",
      "--gin_bindings=dsi_jax.TrainConfig.finetune_max_steps=2",
    ]
    env = {**os.environ, "DSI_JAX_DATA_DIR": str(data_dir)}
    proc = subprocess.run(
      [sys.executable, "-c", child, str(limit), *argv],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    if limit == 0:
      assert proc.returncode == 0, proc.stderr[-3000:]
      return None
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsi-jax train:")]
    assert len(errors) == 1 and errors[0].startswith("dsi-jax train: error: could not write ")
    assert "ERROR" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]

  data_dir = tmp_path / "data"
  error = train(1 << 16, tmp_path / "first", data_dir)
  assert "the dsi_fashion_mnist dataset (File too large)" in error and str(data_dir) in error
  assert not [f for f in listing(data_dir) if f.endswith("dataset_info.json")]  # not prepared

  train(0, tmp_path / "prepare", data_dir)  # the dataset, prepared without a limit
  workdir = tmp_path / "run"
  error = train(1 << 16, workdir, data_dir)
  assert error.startswith("dsi-jax train: error: could not write checkpoint step 2 (")
  assert "File too large" in error and error.endswith(f"({workdir}/checkpoints/zero_shot)")
  assert not [d for d in os.listdir(workdir / "checkpoints" / "zero_shot") if d.isdigit()]
  assert not (workdir / "results.json").exists()


def test_a_changed_corpus_does_not_resume(tmp_path, caplog):
  """Same config, ids and model, other data: the earlier run's checkpoints are replaced."""
  ids = docids_lib.random_ids([f"img{i}" for i in range(16)], num_codes=4, seed=0)
  model = dsi.DSIModel(dsi.make_vit_dsi(ids, **TINY), ids)
  config = train_lib.TrainConfig(
    batch_size=8, warmup_steps=2, index_max_steps=4, index_eval_every=2, eval_batch_size=8
  )
  kwargs = dict(config=config, workdir=str(tmp_path), finetune=False, show_progress=False)
  train_lib.train_dsi(model, tiny_data(seed=0), **kwargs)
  with caplog.at_level("INFO"):
    train_lib.train_dsi(model, tiny_data(seed=0), **kwargs)
  assert "Resuming the run" in caplog.text
  caplog.clear()
  with caplog.at_level("INFO"):
    train_lib.train_dsi(model, tiny_data(seed=1), **kwargs)
  assert "Resuming the run" not in caplog.text and "Replacing checkpoints" in caplog.text


def test_a_resumed_run_logs_each_step_once(tmp_path):
  """Killed after logging steps it had not checkpointed yet, a run redoes those steps on
  resume; TensorBoard gets each (tag, step) once, with the uninterrupted run's values."""
  import tensorflow as tf

  def scalars(folder):
    out = []
    for root, _, files in os.walk(folder):
      for name in sorted(files):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
          for value in event.summary.value:
            out.append((value.tag, event.step, float(tf.make_ndarray(value.tensor))))
    return sorted(out)

  ids = docids_lib.random_ids([f"img{i}" for i in range(16)], num_codes=4, seed=0)
  model = dsi.DSIModel(dsi.make_vit_dsi(ids, **TINY), ids)
  config = train_lib.TrainConfig(
    batch_size=8,
    warmup_steps=2,
    index_target_accuracy=2.0,
    index_max_steps=20,
    index_eval_every=5,
    checkpoint_every=5,
    eval_batch_size=8,
  )
  kwargs = dict(config=config, workdir=str(tmp_path), finetune=False, show_progress=False)
  train_lib.train_dsi(model, tiny_data(), **kwargs)
  logged = scalars(tmp_path / "tensorboard")
  assert [s for t, s, _ in logged if t == "indexing/ia@1"] == [5, 10, 15, 20]
  phase = tmp_path / "checkpoints" / "zero_shot"
  shutil.rmtree(phase / "20")  # as if killed after logging step 20, before its checkpoint
  train_lib.train_dsi(model, tiny_data(), **kwargs)
  resumed = scalars(tmp_path / "tensorboard")
  assert [(t, s) for t, s, _ in resumed] == [(t, s) for t, s, _ in logged]
  np.testing.assert_allclose([v for *_, v in resumed], [v for *_, v in logged], rtol=1e-5)


def test_a_very_wide_image_query_says_what_the_crop_keeps(tmp_path, caplog):
  import cv2
  import numpy as np

  from dsi_jax import runs

  path = tmp_path / "wide.png"
  cv2.imwrite(str(path), np.full((20, 500, 3), 128, np.uint8))
  run = runs.Run(str(tmp_path), "zero_shot", runs.ModelSpec("vit_dsi", image_size=8), *[None] * 3)
  with caplog.at_level("WARNING"):
    pixels = run.prepare_images([str(path)])
  assert pixels.shape == (1, 8, 8, 3)
  assert "a 500 x 20 image; the model sees its centre 20 x 20 square (4 % of it)" in caplog.text
  caplog.clear()
  cv2.imwrite(str(path), np.full((20, 30, 3), 128, np.uint8))
  with caplog.at_level("WARNING"):
    run.prepare_images([str(path)])
  assert "centre" not in caplog.text
