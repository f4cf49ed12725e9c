"""A tiny ViT-DSI (or, with `--kind clip`, CLIP-DSI) training run in its own process, for
tests/test_scaling.py and tests/test_multihost.py.

    python tests/mesh_child.py --devices 8 --mesh 2,2,2 --workdir W --out OUT.npz [...]
    python tests/mesh_child.py --processes 2 --devices 4 --mesh 8,1,1 ...

`--devices N` simulates N CPU devices (XLA_FLAGS is set before JAX is imported), in each of
`--processes` processes (started by `dsi_jax.launch`, joined through localhost). Writes to
`--out` the final params (flattened by path), the training loss history, test predictions and
the partition spec of every train-state array.
"""

import argparse
import json
import os
import sys


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--mesh", default="1,1,1", help="data,fsdp,model")
  p.add_argument("--workdir", default=None)
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--finetune_steps", type=int, default=0)
  p.add_argument("--checkpoint_every", type=int, default=0)
  p.add_argument("--restore", default=None, help="predict from this phase checkpoint folder")
  p.add_argument("--processes", type=int, default=1, help="processes of --devices devices each")
  p.add_argument("--pid_dir", default=None, help="each process writes its pid to PID_DIR/<id>")
  p.add_argument(
    "--kind", default="vit", choices=("vit", "clip"), help="clip: captions and images mixed"
  )
  args = p.parse_args()
  from dsi_jax import launch

  if args.pid_dir and launch.ENV_PROCESS_ID in os.environ:
    with open(os.path.join(args.pid_dir, os.environ[launch.ENV_PROCESS_ID]), "w") as f:
      f.write(str(os.getpid()))

  if args.processes > 1 and launch.ENV_PROCESS_ID not in os.environ:
    sys.exit(launch.launch([sys.executable, *sys.argv], args.processes, local_devices=args.devices))
  if not launch.initialize_from_env() and args.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

  import jax
  import numpy as np

  from dsi_jax import batches, partitioning, retrieval
  from dsi_jax import docids as docids_lib
  from dsi_jax import train as train_lib
  from dsi_jax.models import dsi

  assert len(jax.local_devices()) == args.devices, jax.local_devices()
  assert jax.process_count() == args.processes
  if args.kind == "clip":  # 16 images; caption token rows; batches of both kinds, paired
    from test_clip_dsi import caption_data, tiny_clip_dsi

    data = caption_data(n=16)
    ids = docids_lib.random_ids([f"img{i}" for i in range(16)], num_codes=4, seed=0)
    model = tiny_clip_dsi(ids)
    model.contrastive_weight = 0.1
  else:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(32 + 24, 8, 8, 3)).astype(np.float32)
    rel = [np.array([i % 32, (i + 5) % 32]) for i in range(8)]
    data = batches.RetrievalData(
      index_inputs=images[:32],
      train_inputs=images[32:40],
      train_relevant=rel,
      val_inputs=images[40:48],
      val_relevant=rel,
      test_inputs=images[48:],
      test_relevant=rel,
    )
    ids = docids_lib.random_ids([f"img{i}" for i in range(32)], num_codes=4, seed=0)  # vocab 6
    network = dsi.make_vit_dsi(
      ids, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, dropout=0.1, decoder_depth=1
    )
    model = dsi.DSIModel(network, ids)
  data_, fsdp, model_ = (int(x) for x in args.mesh.split(","))
  mesh = partitioning.make_mesh(data_, fsdp, model_, devices=jax.devices()[: data_ * fsdp * model_])

  def ranked(params):  # through the harness's retriever: each process ranks its share
    retriever = retrieval.DSIRetriever(model, params, method="beam", batch_size=8)
    return retriever.rank(data.test_inputs, 8)

  if args.restore:  # predictions of a saved checkpoint, restored onto this process's mesh
    template = model.init(jax.random.PRNGKey(1), batches.example_inputs(data))
    params = train_lib.restore_params(args.restore, template)
    items, scores = ranked(params)
    np.savez(args.out, items=items, scores=scores)
    return

  config = train_lib.TrainConfig(
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=2,
    index_target_accuracy=2.0,  # never reached: exactly `steps` steps
    index_max_steps=args.steps,
    index_eval_every=args.steps,
    finetune_max_steps=args.finetune_steps,
    finetune_eval_every=max(1, args.finetune_steps // 2),
    patience=100,
    eval_batch_size=8,
    checkpoint_every=args.checkpoint_every,
  )
  losses = []
  original_step = train_lib.make_train_step

  def recording_step(*a, **kw):  # records every step's loss
    step = original_step(*a, **kw)

    def run(state, batch, rng):
      state, aux = step(state, batch, rng)
      losses.append(float(aux["loss"]))
      return state, aux

    return run

  train_lib.make_train_step = recording_step
  res = train_lib.train_dsi(
    model,
    data,
    config=config,
    workdir=args.workdir,
    finetune=args.finetune_steps > 0,
    show_progress=False,
    mesh=mesh,
  )
  final = res["fine_tuned_params"] if args.finetune_steps else res["zero_shot_params"]
  flat = {
    partitioning.path_string(p): partitioning.to_host(x)
    for p, x in jax.tree_util.tree_flatten_with_path(final)[0]
  }
  items, scores = ranked(final)
  if not partitioning.is_writer():
    return
  specs = {
    partitioning.path_string(p): [str(x.sharding.spec), list(x.addressable_shards[0].data.shape)]
    for p, x in jax.tree_util.tree_flatten_with_path(final)[0]
  }
  np.savez(
    args.out,
    losses=np.asarray(losses),
    items=items,
    scores=scores,
    specs=json.dumps(specs),
    **{f"param:{k}": v for k, v in flat.items()},
  )
  print("done", len(losses), file=sys.stderr)


if __name__ == "__main__":
  main()
