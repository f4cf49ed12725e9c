"""Your own collection: reading sources, building, searching, removing and adding, atomically."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsi_jax import cli, collection, index
from dsi_jax import docids as docids_lib
from dsi_jax.data import images as images_lib
from dsi_jax.errors import UserError
from dsi_jax.models import dsi


def write_images(folder, count, seed, prefix="img"):
  """`count` distinct photos-to-be: smooth random colour fields with a few random discs."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  keys = []
  for i in range(count):
    small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    img = cv2.resize(small, (96, 128), interpolation=cv2.INTER_CUBIC)
    for _ in range(3):
      center = tuple(int(c) for c in rng.integers(10, 90, 2))
      color = tuple(int(c) for c in rng.integers(0, 256, 3))
      cv2.circle(img, center, int(rng.integers(6, 20)), color, -1)
    name = f"{prefix}{i}.png"
    cv2.imwrite(os.path.join(folder, name), img)
    keys.append(name)
  return keys


def augmented_copy(src, dst, seed):
  with open(src, "rb") as f:
    pixels = images_lib.decode_image(f.read())[..., :3]
  view = images_lib.augmented_view(pixels, np.random.default_rng(seed))
  cv2.imwrite(str(dst), cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
  return str(dst)


# ----------------------------------------------------------------------------- sources


def test_default_steps_scale_with_the_collection_and_the_machine():
  from dsi_jax.index_training import default_steps

  assert default_steps(50, "cpu") == 200  # a few items still train
  assert default_steps(1000, "cpu") == default_steps(1000, "gpu") == 1000  # one step per item
  assert default_steps(20_000, "cpu") == 3000  # a CPU build stays bounded
  assert default_steps(20_000, "gpu") == default_steps(20_000, "tpu") == 20_000
  assert default_steps(10**6, "tpu") == 50_000
  assert default_steps(1000) == 1000  # this machine's backend


def test_image_folder_skips_unreadable_files_and_reads_captions(tmp_path, caplog):
  keys = write_images(tmp_path / "photos", 3, seed=0)
  (tmp_path / "photos" / "notes.txt").write_text("not an image")
  (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\x00garbage")
  (tmp_path / "photos" / "captions.csv").write_text(
    f"image,caption\n{keys[0]},a red disc\n{keys[0]},another, with a comma\n"
    f"{keys[2]},blue\nbroken.jpg,ignored\n"
  )
  items = collection.read_collection(str(tmp_path / "photos"))
  assert items.kind == "images" and list(items.keys) == keys
  assert items.queries == (("a red disc", "another, with a comma"), (), ("blue",))
  assert sorted(name for name, _ in items.skipped) == ["broken.jpg", "notes.txt"]
  assert sum("skipped" in r.getMessage() for r in caplog.records) == 2


def test_captions_beside_an_image_sub_folder_name_images_by_file_name(tmp_path):
  # Flickr8k's layout: captions.txt beside Images/, naming each image by its file name.
  keys = write_images(tmp_path / "flickr" / "Images", 2, seed=0)
  write_images(tmp_path / "flickr" / "more", 1, seed=0)  # the same file name as keys[0]
  (tmp_path / "flickr" / "captions.txt").write_text(f"image,caption\n{keys[1]},a blue disc\n")
  items = collection.read_collection(str(tmp_path / "flickr"))
  assert items.queries[list(items.keys).index(f"Images/{keys[1]}")] == ("a blue disc",)
  (tmp_path / "flickr" / "captions.txt").write_text(f"{keys[0]},ambiguous\n")
  with pytest.raises(UserError, match=f"captions.txt:1: '{keys[0]}' names several images"):
    collection.read_collection(str(tmp_path / "flickr"))


@pytest.mark.parametrize(
  "content, message",
  [
    ("", "no documents"),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', ":2: duplicate id 'a'"),
    ('{"id": "a", "text": "x"}\nnot json\n', ":2: not a JSON object"),
    ('{"id": "a"}\n', ':1: expected {"id": ..., "text": ...}'),
    ('{"id": "a", "text": "x", "queries": "q"}\n', "'queries' of 'a'"),
  ],
)
def test_bad_jsonl_is_a_one_line_error_naming_the_line(tmp_path, content, message):
  path = tmp_path / "docs.jsonl"
  path.write_text(content)
  with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")) as e:
    collection.read_collection(str(path))
  assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_empty_or_missing_sources_are_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("x")
  with pytest.raises(UserError, match="no readable images"):
    collection.read_collection(str(tmp_path / "empty"))
  with pytest.raises(UserError, match="no such folder"):
    collection.read_collection(str(tmp_path / "nope"))
  keys = write_images(tmp_path / "p", 1, seed=0)
  (tmp_path / "p" / "captions.txt").write_text(f"{keys[0]}\n")
  with pytest.raises(UserError, match="captions.txt:1: expected 'image,caption'"):
    collection.read_collection(str(tmp_path / "p"))


def test_text_spans_are_deterministic_and_inside_the_document():
  doc = list(range(100, 160))
  a = collection.text_spans(doc, 5, np.random.default_rng(3))
  assert a == collection.text_spans(doc, 5, np.random.default_rng(3))
  for span in a:
    assert 8 <= len(span) <= 32 and doc[doc.index(span[0]) :][: len(span)] == span
  assert collection.text_spans(doc[:5], 2, np.random.default_rng(0)) == [doc[:5]] * 2


# ----------------------------------------------------------------------------- removal


SCHEMES = ("atomic", "random", "naive", "semantic")


def tiny_model(scheme, n):
  keys = [f"k{i}" for i in range(n)]
  if scheme == "semantic":
    emb = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    docids = docids_lib.semantic_ids(keys, emb, k=3, c=3, seed=0)
  elif scheme == "atomic":
    docids = docids_lib.atomic_ids(keys)
  elif scheme == "naive":
    docids = docids_lib.naive_ids(keys, num_codes=4)
  else:
    docids = docids_lib.random_ids(keys, num_codes=4, seed=0)
  kwargs = dict(patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2, dropout=0.0)
  model = dsi.DSIModel(dsi.make_vit_dsi(docids, decoder_depth=1, **kwargs), docids)
  params = model.init(jax.random.PRNGKey(0), (1, 8, 8, 1))
  return model, jax.tree_util.tree_map(lambda x: x * 3.0, params)


_MODELS = {s: tiny_model(s, 20) for s in SCHEMES}
_QUERIES = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1)))


@settings(max_examples=12, deadline=None)
@given(
  scheme=st.sampled_from(SCHEMES),
  batches=st.lists(st.sets(st.integers(0, 19), min_size=1, max_size=8), min_size=1, max_size=3),
  method=st.sampled_from(("exact", "beam")),
)
def test_removed_keys_never_appear_for_any_id_scheme(scheme, batches, method):
  import copy

  base, params = _MODELS[scheme]
  model = copy.copy(base)  # remove() replaces the trie and live mask: a shallow copy suffices
  model.live = base.live.copy()
  gone: set[str] = set()
  for batch in batches:
    keys = [f"k{i}" for i in sorted(batch)]
    model.remove(keys)
    gone |= set(keys)
    items, _ = model.rank(params, _QUERIES, 20, method=method, num_beams=20)
    found = [[model.docids.keys[i] for i in row if i >= 0] for row in items]
    for row in found:
      assert not set(row) & gone
      assert len(row) == len(set(row)) == 20 - len(gone)  # every live item, once


# ----------------------------------------------------------------------------- an image index


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("collection")
  keys = write_images(root / "photos", 8, seed=1)
  path = str(root / "index")
  config = index.BuildConfig(steps=80, views=3, image_size=56)
  built = index.Index.build(str(root / "photos"), path, config, show_progress=False)
  return root, path, keys, built


def test_build_then_search_finds_each_image_from_an_augmented_copy(built, tmp_path):
  root, path, keys, idx = built
  assert idx.kind == "images" and idx.keys == keys and idx.state["generation"] == "g0001"
  queries = [
    augmented_copy(root / "photos" / k, tmp_path / f"q{i}.png", 50 + i) for i, k in enumerate(keys)
  ]
  hits = index.Index.load(path).search(images=queries, k=3)
  assert [h[0]["key"] for h in hits] == keys
  assert hits[0][0]["path"] == os.path.join(str(root / "photos"), keys[0])
  assert hits[0][0]["id"] == "0" and idx.thumbnail(keys[0]).shape == (56, 56, 3)


def test_build_refuses_a_used_folder(built):
  root, path, _, _ = built
  with pytest.raises(UserError, match="already an index"):
    index.Index.build(str(root / "photos"), path)
  (root / "other").mkdir()
  (root / "other" / "mine.txt").write_text("keep me")
  with pytest.raises(UserError, match="not empty"):
    index.Index.build(str(root / "photos"), str(root / "other"))
  assert (root / "other" / "mine.txt").read_text() == "keep me"


def test_remove_is_immediate_and_the_cli_names_unknown_keys(built, tmp_path, capsys):
  root, path, keys, _ = built
  copy = tmp_path / "index"
  shutil.copytree(path, copy)
  query = augmented_copy(root / "photos" / keys[2], tmp_path / "q.png", 7)
  assert index.Index.load(str(copy)).search(images=[query], k=1)[0][0]["key"] == keys[2]
  assert cli.main(["index", "remove", str(copy), keys[2], keys[5]]) == 0
  loaded = index.Index.load(str(copy))
  hits = loaded.search(images=[query], k=8)[0]
  assert len(hits) == 6 and not {h["key"] for h in hits} & {keys[2], keys[5]}
  assert cli.main(["index", "remove", str(copy), "nope.png"]) == 2
  assert "no item 'nope.png'" in capsys.readouterr().err


def test_add_keeps_old_ids_and_finds_new_images(built, tmp_path):
  root, path, keys, idx = built
  copy = str(tmp_path / "index")
  shutil.copytree(path, copy)
  new_keys = write_images(tmp_path / "more", 3, seed=2, prefix="new")
  grown = index.Index.add(
    copy, str(tmp_path / "more"), index.AddConfig(steps=40, views=3), show_progress=False
  )
  assert grown.state["generation"] == "g0002" and grown.keys == keys + new_keys
  old_ids = [idx.run.model.docids.id_string(k) for k in keys]
  assert [grown.run.model.docids.id_string(k) for k in keys] == old_ids
  queries = [
    augmented_copy(tmp_path / "more" / k, tmp_path / f"n{i}.png", 70 + i)
    for i, k in enumerate(new_keys)
  ]
  assert [h[0]["key"] for h in grown.search(images=queries, k=1)] == new_keys
  assert sorted(os.listdir(copy)) == [".lock", "g0001", "g0002", "index.json"]
  with pytest.raises(UserError, match="already in the index"):
    index.Index.add(copy, str(tmp_path / "more"))


def test_sigkill_during_add_leaves_the_old_index_answering_as_before(built, tmp_path):
  root, path, keys, _ = built
  copy = str(tmp_path / "index")
  shutil.copytree(path, copy)
  write_images(tmp_path / "more", 2, seed=3, prefix="late")
  queries = [
    augmented_copy(root / "photos" / k, tmp_path / f"q{i}.png", 90 + i)
    for i, k in enumerate(keys[:3])
  ]
  before = index.Index.load(copy).search(images=queries, k=5)
  with open(os.path.join(copy, index.INDEX_FILE)) as f:
    state = f.read()
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "dsi_jax.cli",
      "index",
      "add",
      copy,
      str(tmp_path / "more"),
      "--steps",
      "2000",
      "--no-progress",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 240
  tmp = os.path.join(copy, ".tmp-g0002")
  while time.time() < deadline and not os.path.isdir(os.path.join(tmp, "checkpoints")):
    assert proc.poll() is None, "index add ended before it could be killed"
    time.sleep(0.5)
  time.sleep(3)  # into training
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(tmp)  # killed half-way: the new generation never went live
  with open(os.path.join(copy, index.INDEX_FILE)) as f:
    assert f.read() == state
  after = index.Index.load(copy).search(images=queries, k=5)
  assert [[h["key"] for h in q] for q in after] == [[h["key"] for h in q] for q in before]
  np.testing.assert_allclose(
    [[h["score"] for h in q] for q in after], [[h["score"] for h in q] for q in before], atol=1e-5
  )
  assert index.Index.remove(copy, [keys[0]]) == 1  # the next write clears the leftovers
  assert not os.path.exists(tmp)


# ----------------------------------------------------------------------------- a text index


def test_a_jsonl_of_documents_is_searched_by_its_questions(tmp_path, capsys):
  docs = [
    ("volcano", "Mount Etna is an active volcano on the east coast of Sicily in Italy."),
    ("jazz", "Louis Armstrong was a trumpeter and singer who shaped early jazz in New Orleans."),
    ("photosynthesis", "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("marathon", "The marathon is a long-distance foot race of 42.195 kilometres."),
  ]
  path = tmp_path / "docs.jsonl"
  path.write_text(
    "".join(json.dumps({"id": k, "text": t, "queries": [f"about {k}"]}) + "\n" for k, t in docs)
  )
  out = str(tmp_path / "index")
  assert (
    cli.main(["index", "build", str(path), "--out", out, "--steps", "60", "--no-progress"]) == 0
  )
  assert json.loads(capsys.readouterr().out)["items"] == 4
  loaded = index.Index.load(out)
  hits = loaded.search(texts=["which volcano is active in Sicily", "who played jazz trumpet"], k=2)
  assert [h[0]["key"] for h in hits] == ["volcano", "jazz"]
  assert hits[0][0]["text"].startswith("Mount Etna")
  assert cli.main(["search", out, "--text", "race of 42 kilometres", "--json", "-k", "1"]) == 0
  assert json.loads(capsys.readouterr().out)[0]["key"] == "marathon"
  import threading

  from dsi_jax import serve

  srv = serve.make_server(loaded, port=0)  # a text query over HTTP
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  try:
    status, reply = post(
      f"http://127.0.0.1:{srv.server_address[1]}", {"text": "sunlight and sugar"}
    )
  finally:
    srv.shutdown()
    srv.server_close()
  assert status == 200 and reply["results"][0]["key"] == "photosynthesis"
  assert reply["results"][0]["thumb"] is None and "Plants" in reply["results"][0]["text"]


# ----------------------------------------------------------------------------- the web page


@pytest.fixture
def server(built):
  import threading

  from dsi_jax import serve

  srv = serve.make_server(index.Index.load(built[1]), port=0)
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{srv.server_address[1]}"
  srv.shutdown()
  srv.server_close()


def post(url, body):
  import urllib.error
  import urllib.request

  request = urllib.request.Request(
    url + "/search", json.dumps(body).encode(), {"Content-Type": "application/json"}
  )
  try:
    with urllib.request.urlopen(request, timeout=120) as reply:
      return reply.status, json.loads(reply.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_the_server_answers_uploads_and_items_and_explains_bad_requests(built, server, tmp_path):
  import base64
  import urllib.request

  root, _, keys, _ = built
  query = augmented_copy(root / "photos" / keys[4], tmp_path / "q.png", 11)
  with open(query, "rb") as f:
    upload = base64.b64encode(f.read()).decode()
  status, reply = post(server, {"image": upload, "k": 3})
  assert status == 200 and reply["results"][0]["key"] == keys[4]
  assert reply["results"][0]["thumb"].startswith("/thumb?key=")
  status, reply = post(server, {"item": keys[6], "k": 2})
  assert status == 200 and reply["results"][0]["key"] == keys[6]
  for body, message in (
    ({"image": base64.b64encode(b"not an image").decode()}, "not an image"),
    ({"image": "%%%"}, "not base64"),
    ({"text": "a red disc"}, "searches by image"),
    ({"item": "nope.png"}, "no item 'nope.png'"),
    ({"text": "x", "image": upload}, "send one of"),
  ):
    status, reply = post(server, body)
    assert status == 400 and message in reply["error"]
  with urllib.request.urlopen(server + "/thumb?key=" + keys[0]) as reply:
    assert reply.headers["Content-Type"] == "image/png" and reply.read()[:4] == b"\x89PNG"
  assert post(server, {"item": keys[1], "k": 1})[0] == 200  # still serving


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (setup.sh)")
def test_headless_chromium_shows_result_thumbnails(built, server):
  root, _, keys, _ = built
  dom = subprocess.run(
    [
      "chromium",
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--virtual-time-budget=20000",
      "--dump-dom",
      f"{server}/?item={keys[3]}",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  ).stdout
  assert dom.count('class="thumb"') == 8  # every live item, as a thumbnail
  assert f'alt="{keys[3]}"' in dom and "#1" in dom and "search with this" in dom


@pytest.mark.slow
@pytest.mark.parametrize("ids", ["random", "semantic"])
def test_add_and_remove_keep_old_ids_for_random_and_semantic_ids(tmp_path, ids):
  topics = ["volcano lava", "jazz trumpet", "marathon race", "sugar plants", "chess opening"]
  docs = tmp_path / "docs.jsonl"
  docs.write_text(
    "".join(
      json.dumps({"id": f"d{i}", "text": f"A text about {t}."}) + "\n" for i, t in enumerate(topics)
    )
  )
  more = tmp_path / "more.jsonl"
  more.write_text(json.dumps({"id": "n0", "text": "Another text about jazz and a trumpet."}) + "\n")
  path = str(tmp_path / "index")
  built = index.Index.build(
    str(docs), path, index.BuildConfig(steps=30, ids=ids), show_progress=False
  )
  old = {k: built.run.model.docids.id_string(k) for k in built.keys}
  index.Index.remove(path, ["d4"])
  grown = index.Index.add(path, str(more), index.AddConfig(steps=25), show_progress=False)
  assert grown.run.model.docids.scheme == ids
  assert {k: grown.run.model.docids.id_string(k) for k in old} == old
  assert grown.keys == ["d0", "d1", "d2", "d3", "n0"]  # d4 stays removed
  hits = grown.search(texts=["jazz trumpet", "chess opening"], k=5)
  assert all(len(q) == 5 and "d4" not in {h["key"] for h in q} for q in hits)
  if ids == "semantic":  # beside its nearest old document
    assert grown.run.model.docids.codes[-1][:-1] in {c[:-1] for c in built.run.model.docids.codes}
