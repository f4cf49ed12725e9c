"""Sharding by name: logical axes for every parameter, one rules table, a device mesh.

Every array of a train state gets *logical* axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`,
...) from `PARAM_AXES`, a table keyed by the parameter's path (its last components, as in the
Scenic / big_vision / Hugging Face layouts the models follow). `LOGICAL_RULES` maps logical names
to the mesh axes `data`, `fsdp` and `model`, with flax's semantics (rules are tried in order and
a mesh axis is used at most once per array). Layers never mention the mesh: they name activation
axes with `nn.with_logical_constraint`, which is a no-op unless `axis_rules(mesh)` is active.

Naming axes by path rather than by boxing each initializer keeps parameters plain arrays, so
imported checkpoints (big_vision `.npz`, Hugging Face safetensors) and optimizer states map onto
the same table: Adam's `mu` and `nu` end in the same path as their parameter.

A mesh of shape `(data, fsdp, model)`: `data` splits the batch (pure data parallelism), `fsdp`
splits the batch *and* the `embed` axis of the parameters and optimizer state (ZeRO-3 style),
`model` splits heads, MLP and vocabulary (tensor parallelism). `make_mesh(data=-1)` is plain data
parallelism over every device; one device is the mesh (1, 1, 1).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axes, tried in order (flax `logical_to_mesh_axes` semantics: a mesh axis
# already used by an earlier dimension of the same array is skipped, so activations' `embed`
# stays whole while the batch is split over `fsdp`, and parameters' `embed` is split over it).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("joined_kv", "model"),
  ("vocab", "model"),
  ("kv", None),
  ("length", None),
  ("candidates", None),
  ("patch_h", None),
  ("patch_w", None),
  ("channels", None),
  ("positions", None),
  ("type_vocab", None),
  ("proj", None),
  ("relpos_buckets", None),
)

# Parameter path (a regex searched in "a/b/c" form) -> logical axes; the first match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
  # t5x's T5 layout (dsi_jax.models.t5): 2-D attention kernels, heads x head_dim joined.
  (
    r"(^|/)(attention|self_attention|encoder_decoder_attention)/(query|key|value)/kernel$",
    ("embed", "joined_kv"),
  ),
  (
    r"(^|/)(attention|self_attention|encoder_decoder_attention)/out/kernel$",
    ("joined_kv", "embed"),
  ),
  (r"(^|/)mlp/wi(_\d+)?/kernel$", ("embed", "mlp")),
  (r"(^|/)mlp/wo/kernel$", ("mlp", "embed")),
  (r"(^|/)relpos_bias/rel_embedding$", ("heads", "relpos_buckets")),
  (r"(^|/)logits_dense/kernel$", ("embed", "vocab")),
  # big_vision / Flax MultiHeadDotProductAttention layout: [embed, heads, head_dim] kernels.
  (r"(query|key|value)/kernel$", ("embed", "heads", "kv")),
  (r"(query|key|value)/bias$", ("heads", "kv")),
  (r"out/kernel$", ("heads", "kv", "embed")),
  (r"Dense_0/kernel$", ("embed", "mlp")),  # MLP in
  (r"Dense_0/bias$", ("mlp",)),
  (r"Dense_1/kernel$", ("mlp", "embed")),  # MLP out
  (r"(out|Dense_1)/bias$", ("embed",)),
  (r"(LayerNorm[^/]*|[a-z_]*_norm)/(scale|bias)$", ("embed",)),
  (r"(^|/)embedding/kernel$", ("patch_h", "patch_w", "channels", "embed")),  # ViT stem
  (r"(^|/)embedding/bias$", ("embed",)),
  (r"(token_embedder|word_embeddings|token_embedding)/embedding$", ("vocab", "embed")),
  (r"position_embeddings?/embedding$", ("positions", "embed")),
  (r"class_embedding$", ("embed",)),  # CLIP's class token
  (r"(text|visual)_projection/kernel$", ("embed", "proj")),  # CLIP's projections
  (r"(text|image)_adapter/kernel$", ("proj", "embed")),  # CLIP-DSI: a tower -> decoder width
  (r"(text|image)_adapter/bias$", ("embed",)),
  (r"token_type_embeddings/embedding$", ("type_vocab", "embed")),
  (r"pos_embedding$", (None, "length", "embed")),
  (r"(^|/)(cls_token|register_tokens)$", (None, None, "embed")),  # DINOv2
  (r"LayerScale_\d+/scale$", ("embed",)),
  (r"logits/kernel$", ("embed", "vocab")),
  (r"logits/bias$", ("vocab",)),
  (r"(^|/)id_embedding$", ("vocab", "embed")),  # ids that start from embeddings
  (r"(^|/)id_log_scale$", ()),
)


def make_mesh(
  data: int = -1, fsdp: int = 1, model: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
  """A `(data, fsdp, model)` mesh over `devices` (default: all); one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, model]
  if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape data={data}, fsdp={fsdp}, model={model}: at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh data={data}, fsdp={fsdp}, model={model}: {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"mesh data={shape[0]}, fsdp={shape[1]}, model={shape[2]} needs {math.prod(shape)} "
      f"devices, {len(devices)} are available"
    )
  if len(devices) == len(jax.devices()):
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices)  # topology-aware on TPU / GPU
  else:
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def path_string(path) -> str:
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def logical_axes(tree: Any) -> Any:
  """Logical axis names of every array leaf of `tree` (params, optimizer state, train state).

  Scalars (step counters) get `()`. A leaf of rank >= 1 that no `PARAM_AXES` entry names, or
  whose rank differs from its entry, is an error naming the parameter.
  """

  def axes(path, leaf) -> tuple[str | None, ...]:
    ndim = len(np.shape(leaf))
    if ndim == 0:
      return ()
    name = path_string(path)
    for pattern, names in PARAM_AXES:
      if re.search(pattern, name):
        if len(names) != ndim:
          raise ValueError(f"parameter {name}: rank {ndim}, but PARAM_AXES names {names}")
        return names
    raise ValueError(f"parameter {name} (shape {np.shape(leaf)}) has no entry in PARAM_AXES")

  return jax.tree_util.tree_map_with_path(axes, tree)


def _spec(shape, names, mesh: Mesh, rules, where: str) -> PartitionSpec:
  spec = list(nn.logical_to_mesh_axes(names, rules))
  for i, (size, axes) in enumerate(zip(shape, spec)):
    if axes is None:
      continue
    parts = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    if size % parts:  # e.g. a docid vocabulary of 13 over model=2: keep that axis whole
      log.info(
        "%s: dimension %d of size %d does not split %d ways; replicated", where, i, size, parts
      )
      spec[i] = None
  return PartitionSpec(*spec)


def shardings(tree: Any, mesh: Mesh, rules: Sequence = LOGICAL_RULES) -> Any:
  """`NamedSharding` of every leaf of `tree` on `mesh` from its logical axes and `rules`."""
  names = logical_axes(tree)

  def one(path, leaf, axes):
    return NamedSharding(mesh, _spec(np.shape(leaf), axes, mesh, rules, path_string(path)))

  return jax.tree_util.tree_map_with_path(one, tree, names)


def batch_sharding(mesh: Mesh, rules: Sequence = LOGICAL_RULES) -> NamedSharding:
  """The sharding of a batch's leading axis (`batch` -> `data` x `fsdp`)."""
  return NamedSharding(mesh, PartitionSpec(*nn.logical_to_mesh_axes(("batch",), rules)))


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch is split (global batch sizes must be a multiple of it)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def host_rows(global_batch: int, mesh: Mesh) -> slice:
  """The rows of a global batch that this host reads (`jax.process_index()`'s share)."""
  if global_batch % batch_shards(mesh):
    raise ValueError(
      f"batch size {global_batch} is not a multiple of the mesh's data x fsdp = "
      f"{batch_shards(mesh)}"
    )
  per_host = global_batch // jax.process_count()
  start = jax.process_index() * per_host
  return slice(start, start + per_host)


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
  """One global array per feature (any pytree of them) from every host's rows (`host_rows`),
  sharded on `batch`."""
  sharding = batch_sharding(mesh)

  def one(value):
    value = np.asarray(value)
    shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
    return jax.make_array_from_process_local_data(sharding, value, shape)

  return jax.tree_util.tree_map(one, dict(local))


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Sequence = LOGICAL_RULES) -> Iterator[None]:
  """Activates `mesh` and `rules`, so the layers' `nn.with_logical_constraint` take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_devices: int | None = None,
) -> None:
  """Multi-host start-up: `jax.distributed.initialize` (arguments auto-detected on TPU pods,
  SLURM and Open MPI; pass them elsewhere). Call before anything else touches JAX devices.

  On CPU, processes talk through gloo collectives, and `local_devices` sets how many CPU
  devices each process has (`dsi-jax train --num_processes N --local_devices D` on one
  machine); on TPU and GPU both are the platform's own.
  """
  if local_devices is not None:
    jax.config.update("jax_num_cpu_devices", local_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  log.info("process %d of %d", jax.process_index(), jax.process_count())


# -- several processes ------------------------------------------------------------------------
# Every process runs the same program on its own rows; what it computes on the host (rankings,
# metrics, early stopping) comes out identical everywhere, and one process writes the files.


def is_writer() -> bool:
  """Whether this process writes the run's small files (spec, history, results): process 0."""
  return jax.process_index() == 0


_barriers = itertools.count()
BARRIER_TIMEOUT_S = 3600  # a wait may hold while another process builds a data set


def sync(name: str) -> None:
  """Every process waits here until all have arrived (nothing on a single process).

  A barrier of the coordination service, not a device collective: it may wait for minutes
  (collectives give up after about 30 s), and a process that dies ends it (heartbeats).
  """
  if jax.process_count() > 1:
    from jax._src import distributed  # the one client `jax.distributed.initialize` made

    barrier = f"dsi_jax:{name}:{next(_barriers)}"  # every process passes the same barriers
    distributed.global_state.client.wait_at_barrier(barrier, BARRIER_TIMEOUT_S * 1000)


@contextlib.contextmanager
def writer_first(name: str) -> Iterator[None]:
  """Process 0 runs the block first (e.g. building a corpus cache in a shared folder); the
  others wait for it, then run it too (finding the cache)."""
  if jax.process_index() != 0:
    sync(name)
  yield
  if jax.process_index() == 0:
    sync(name)


def to_host(x: Any) -> np.ndarray:
  """The whole value of an array as numpy on every process, whichever process's devices hold
  its shards (a gather across processes where it spans several)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def array_mesh(tree: Any) -> Mesh | None:
  """The mesh the arrays of `tree` (e.g. params) are laid out on, if they have one."""
  for leaf in jax.tree_util.tree_leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def shared_rows(rows: np.ndarray, mesh: Mesh | None) -> Any:
  """A batch every process holds whole, as one global array whose rows each process's
  devices compute (`rows` itself where a single process runs, or where the batch does not
  split over the mesh's data x fsdp: then every process computes all of it)."""
  if jax.process_count() == 1 or mesh is None or len(rows) % batch_shards(mesh):
    return rows
  rows = np.asarray(rows)
  return global_batch({"x": rows[host_rows(len(rows), mesh)]}, mesh)["x"]
