"""A run folder that describes itself, and the one way to load it.

The trainer writes, beside `docids.json` and `checkpoints/{zero_shot,fine_tuned}`, a model spec
(`model.json`, `ModelSpec`): which network factory made the model and with which arguments,
what kinds of query it reads, how images and texts were prepared, and the pretrained towers
it needs. `load_run(folder)` rebuilds the network from it, takes parameter shapes from
`jax.eval_shape` (no random init), restores the selected params and returns a `Run` whose
`retriever` answers `search(queries, k)`. `Run.prepare` turns image files and texts into model
inputs through the same functions the SeqIO tasks use (`dsi_jax.data.inputs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from dsi_jax import docids as docids_lib
from dsi_jax import retrieval
from dsi_jax.data import inputs as inputs_lib

SPEC_FILE = "model.json"
SPEC_FORMAT = 1
FACTORIES = ("vit_dsi", "minilm_dsi", "clip_dsi", "t5_dsi", "dinov2_dsi", "dinov2_clip_dsi")
QUERY_KINDS = ("image", "text")
PHASES = ("fine_tuned", "zero_shot")  # the phase a search uses: the last one trained

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a run folder needs to rebuild its model and prepare its queries.

  factory: "vit_dsi" | "minilm_dsi" | "clip_dsi" | "t5_dsi" | "dinov2_dsi" (a frozen DINOv2)
    | "dinov2_clip_dsi" (CLIP-DSI: MiniLM and a frozen DINOv2).
  kwargs: the factory's arguments (JSON values): network sizes, `frozen` for MiniLM-DSI.
  queries: the kinds of query the model reads ("image", "text").
  image_size: images are centre-cropped square and resized to this side (`preprocess_image`).
  text_length: texts are cut or padded to this many tokens.
  tokenizer: "minilm" (all-MiniLM-L6-v2's WordPiece) or None.
  pretrained: towers the model was built on (e.g. "all-MiniLM-L6-v2"), needed at load.
  ranking: how `search` ranks: {"method": "beam" | "exact" | "auto", "num_beams": n}.
  item_dir: a folder holding the items' files, named by their keys (for result paths).
  """

  factory: str
  kwargs: dict = dataclasses.field(default_factory=dict)
  queries: tuple[str, ...] = ("image",)
  image_size: int | None = None
  text_length: int | None = None
  tokenizer: str | None = None
  pretrained: tuple[str, ...] = ()
  ranking: dict = dataclasses.field(default_factory=lambda: {"method": "beam", "num_beams": 10})
  item_dir: str | None = None

  def __post_init__(self):
    if self.factory not in FACTORIES:
      raise ValueError(f"unknown model factory {self.factory!r}; known: {', '.join(FACTORIES)}")
    bad = [q for q in self.queries if q not in QUERY_KINDS]
    if bad or not self.queries:
      raise ValueError(f"query kinds must be among {QUERY_KINDS}, got {list(self.queries)}")
    if "image" in self.queries and not self.image_size:
      raise ValueError("a model of image queries needs image_size")
    if "text" in self.queries and not self.text_length:
      raise ValueError("a model of text queries needs text_length")

  def to_json(self) -> dict:
    return {"format": SPEC_FORMAT, **dataclasses.asdict(self)}

  def sha256(self) -> str:
    """Hash of the spec's content, recorded in the run's `run.json` and checked at load."""
    return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

  @classmethod
  def from_json(cls, data: Any, where: str) -> ModelSpec:
    if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
      raise ValueError(f"{where}: not a model spec of format {SPEC_FORMAT}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields - {"format"})
    if unknown:
      raise ValueError(f"{where}: unknown fields {unknown}")
    values = {k: v for k, v in data.items() if k != "format"}
    for name in ("queries", "pretrained"):
      if name in values:
        values[name] = tuple(values[name])
    try:
      return cls(**values)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: {e}") from None


def save_spec(workdir: str, spec: ModelSpec) -> None:
  from dsi_jax import results

  results.write_json(spec.to_json(), os.path.join(workdir, SPEC_FILE))


def load_spec(workdir: str) -> ModelSpec:
  path = os.path.join(workdir, SPEC_FILE)
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  return ModelSpec.from_json(data, path)


# ----------------------------------------------------------------------------- building


def build_model(spec: ModelSpec, docids: docids_lib.DocidMap, *, minilm_path: str | None = None):
  """`(DSIModel, tokenizer or None)` of `spec` with fresh (or pretrained) towers."""
  from dsi_jax.models import borrowed, dsi

  if spec.factory == "vit_dsi":
    return dsi.DSIModel(dsi.make_vit_dsi(docids, **spec.kwargs), docids), None
  if spec.factory == "minilm_dsi":
    return borrowed.make_minilm_dsi(docids, path=minilm_path, **spec.kwargs)
  if spec.factory == "dinov2_dsi":
    return borrowed.make_dinov2_dsi(docids, **spec.kwargs), None
  if spec.factory == "clip_dsi":
    from dsi_jax.models import multimodal, text

    tower, _, tokenizer = text.load_minilm(minilm_path)
    network = multimodal.make_vit_clip_dsi(docids, text_tower=tower, **spec.kwargs)
    return dsi.DSIModel(network, docids), tokenizer
  if spec.factory == "dinov2_clip_dsi":
    from dsi_jax.models import text

    tower, _, tokenizer = text.load_minilm(minilm_path)
    pad_id = tower.config.pad_token_id
    model = borrowed.make_dinov2_clip_dsi(
      docids, text_tower=tower, text_pad_id=pad_id, **spec.kwargs
    )
    return model, tokenizer
  network = dsi.make_t5_dsi(docids, **spec.kwargs)
  return dsi.DSIModel(network, docids), None


def example_inputs(spec: ModelSpec, model) -> Any:
  """One row of each kind of input the network reads (what `DSIModel.init` traces)."""
  image = np.zeros((1, spec.image_size or 1, spec.image_size or 1, 3), np.float32)
  tokens = np.zeros((1, spec.text_length or 1), np.int32)
  if spec.factory == "clip_dsi":
    return (tokens, image)
  if spec.factory == "dinov2_clip_dsi":  # the frozen tower's token map for one image
    return (tokens, model.input_encoder(image, batch_size=1))
  if spec.factory == "minilm_dsi" and spec.kwargs.get("frozen"):
    width = model.network.decoder.width
    return np.zeros((1, spec.text_length, width), np.float32)
  if spec.factory == "dinov2_dsi":  # the frozen tower's tokens for one image
    return model.input_encoder(image, batch_size=1)
  return tokens if spec.queries == ("text",) else image


def param_template(spec: ModelSpec, model) -> Any:
  """The params' shapes and dtypes, from `jax.eval_shape`: nothing is initialised."""
  inputs = example_inputs(spec, model)
  bare = type(model)(model.network, model.docids)  # no pretrained subtrees to place
  return jax.eval_shape(lambda: bare.init(jax.random.PRNGKey(0), inputs))


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class Run:
  """A loaded run: its folder, spec, model, restored params and a ready retriever."""

  workdir: str
  phase: str
  spec: ModelSpec
  model: Any
  params: Any
  retriever: retrieval.DSIRetriever
  tokenizer: Any = None

  def prepare_images(self, paths: Sequence[str | bytes]) -> np.ndarray:
    """Image files or their bytes (any size, grayscale, RGB or RGBA) -> model inputs, prepared
    as the corpus was: centre-cropped square, resized to the run's side, RGB, in [-1, 1]."""
    from dsi_jax.data import images

    if "image" not in self.spec.queries:
      raise ValueError(f"{self.workdir}: this model reads {', '.join(self.spec.queries)} queries")
    rows = []
    for path in paths:
      if isinstance(path, bytes):  # an upload: the encoded file itself
        pixels, path = images.decode_image(path, source="<uploaded image>"), "<uploaded image>"
      elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
      else:
        with open(path, "rb") as f:
          pixels = images.decode_image(f.read(), source=path)
      height, width = pixels.shape[:2]
      side = min(height, width)
      if side * side < 0.5 * height * width:  # say what the centre crop throws away
        log.warning(
          "%s: a %d x %d image; the model sees its centre %d x %d square (%.0f %% of it)",
          path,
          width,
          height,
          side,
          side,
          100.0 * side / max(height, width),
        )
      rows.append(
        images.preprocess_image(pixels, size=self.spec.image_size, aspect_range=None, source=path)
      )
    return inputs_lib.image_inputs(np.stack(rows))

  def prepare_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Texts -> token rows of the run's tokenizer and length, as the tasks made them."""
    if "text" not in self.spec.queries:
      raise ValueError(f"{self.workdir}: this model reads {', '.join(self.spec.queries)} queries")
    if self.tokenizer is None:
      raise ValueError(f"{self.workdir}: text queries need a tokenizer ({self.spec.factory})")
    rows = [inputs_lib.text_token_ids(self.tokenizer, t) for t in texts]
    return inputs_lib.token_rows(rows, self.spec.text_length)

  def path_of(self, key: str) -> str | None:
    if self.spec.item_dir and os.path.isfile(os.path.join(self.spec.item_dir, key)):
      return os.path.join(self.spec.item_dir, key)
    return None

  def search(self, *, images: Sequence[str] = (), texts: Sequence[str] = (), k: int = 10):
    """`[{"rank", "key", "score", "path"}, ...]` per query (image files first, then texts)."""
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    out = []
    for queries in (
      self.prepare_images(images) if images else None,
      self.prepare_texts(texts) if texts else None,
    ):
      if queries is None:
        continue
      ranked, scores = self.retriever.search(queries, k)
      for keys, sc in zip(ranked, scores):
        out.append(
          [
            {"rank": i + 1, "key": key, "score": float(s), "path": self.path_of(key)}
            for i, (key, s) in enumerate(zip(keys, sc))
          ]
        )
    return out


def find_run(folder: str) -> str:
  """`folder` if it holds a model spec, else its one sub-folder that does."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such run folder")
  if os.path.isfile(os.path.join(folder, SPEC_FILE)):
    return folder
  found = sorted(
    os.path.dirname(os.path.relpath(os.path.join(root, SPEC_FILE), folder))
    for root, _, files in os.walk(folder)
    if SPEC_FILE in files and os.path.isdir(os.path.join(root, "checkpoints"))
  )
  if len(found) == 1:
    return os.path.join(folder, found[0])
  if not found:
    raise FileNotFoundError(f"{folder}: not a run folder (no {SPEC_FILE} in it or below)")
  raise ValueError(f"{folder} holds {len(found)} runs; name one: {', '.join(found)}")


def check_identity(workdir: str, docids: docids_lib.DocidMap, spec: ModelSpec) -> None:
  """Refuses ids or a model spec that are not the ones the run was trained with (the hashes
  its `run.json` recorded; runs that recorded none are not checked)."""
  path = os.path.join(workdir, "run.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      record = json.load(f)
    record = {k: record.get(k) for k in ("docids_sha256", "spec_sha256")}
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
    raise ValueError(f"{path}: unreadable run record ({e})") from None
  for key, name, what, actual in (
    ("docids_sha256", "docids.json", "ids differ", docids.sha256()),
    ("spec_sha256", SPEC_FILE, "model spec differs", spec.sha256()),
  ):
    if record[key] and record[key] != actual:
      raise ValueError(
        f"{os.path.join(workdir, name)}: the {what} from what the run was trained "
        f"with (sha256 recorded in {path}); restore the run's {name}"
      )


def load_run(
  folder: str, *, phase: str | None = None, minilm_path: str | None = None, batch_size: int = 64
) -> Run:
  """Rebuilds the retriever of a run folder (or of the one run below `folder`).

  phase: "fine_tuned" or "zero_shot" (default: the last phase that has a checkpoint).
  """
  from dsi_jax import checkpoints

  workdir = find_run(folder)
  spec = load_spec(workdir)
  docids = docids_lib.DocidMap.load(os.path.join(workdir, "docids.json"))
  check_identity(workdir, docids, spec)
  phases = [phase] if phase else list(PHASES)
  for name in phases:
    if name not in PHASES:
      raise ValueError(f"unknown phase {name!r}; known: {', '.join(PHASES)}")
  found = [p for p in phases if os.path.isdir(os.path.join(workdir, "checkpoints", p))]
  if not found:
    raise FileNotFoundError(f"{workdir}: no {' or '.join(phases)} checkpoint")
  model, tokenizer = build_model(spec, docids, minilm_path=minilm_path)
  record = os.path.join(workdir, "run.json")
  params = checkpoints.restore_params(
    os.path.join(workdir, "checkpoints", found[0]),
    param_template(spec, model),
    run_id=checkpoints.file_sha256(record) if os.path.exists(record) else None,
  )
  retriever = retrieval.DSIRetriever(
    model,
    params,
    method=spec.ranking.get("method", "beam"),
    num_beams=spec.ranking.get("num_beams"),
    batch_size=batch_size,
    encode_inputs=model.input_encoder,
  )
  return Run(workdir, found[0], spec, model, params, retriever, tokenizer)
