"""The `dsi-jax` command: `demo`, `train` (gin-configured), `search` and `table`."""

from __future__ import annotations

import argparse
import functools
import os
import sys


def _quiet_logs() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import logging

  logging.getLogger("absl").setLevel(logging.WARNING)


def _demo(args) -> int:
  from dsi_jax.experiments import fashion_mnist

  seeds = list(range(args.seeds)) if args.seeds > 0 else [0]
  fashion_mnist.run_demo(
    args.out,
    quick=args.quick,
    seeds=[args.seed + s for s in seeds],
    num_images=args.num_images,
    data_dir=args.data_dir,
    show_progress=not args.no_progress,
  )
  return 0


def _project_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _gin_entry_point():
  """Registers the gin configurables once per process; returns the experiment to run."""
  import gin

  from dsi_jax import train as train_lib
  from dsi_jax.experiments import fashion_mnist, flickr, flickr_rerank, rerank

  for cls in (
    train_lib.TrainConfig,
    fashion_mnist.FashionMnistConfig,
    flickr.FlickrConfig,
    flickr.DualEncoderConfig,
    rerank.RerankConfig,
    flickr_rerank.FlickrRerankConfig,
  ):
    gin.external_configurable(cls, module="dsi_jax")
  run_experiment = gin.external_configurable(fashion_mnist.run_experiment, module="dsi_jax")
  gin.external_configurable(flickr.run_flickr_experiment, module="dsi_jax")
  gin.external_configurable(rerank.run_rerank_experiment, module="dsi_jax")
  gin.external_configurable(flickr_rerank.run_flickr_rerank_experiment, module="dsi_jax")
  # `include 'gin_configs/...'` lines resolve from the working folder or the project root.
  gin.add_config_file_search_path(_project_root())

  def main(experiment=run_experiment):
    """`dsi_jax.main.experiment` names the experiment to run (default: the Fashion-MNIST
    `run_experiment`; e.g. `@dsi_jax.run_flickr_experiment`), whose arguments the gin files
    bind."""
    return experiment()

  return gin.external_configurable(main, module="dsi_jax")


def _start_processes(args) -> int | None:
  """Joins or starts a job of several processes before JAX is used: None to go on training
  in this process, else the exit status of the processes this one launched."""
  from dsi_jax import launch, partitioning

  if args.local_devices is not None and args.local_devices < 1:
    raise ValueError(f"--local_devices must be >= 1, got {args.local_devices}")
  if args.process_id is not None:  # one line per host, as on a pod
    if args.coordinator is None or args.num_processes < 2:
      raise ValueError("--process_id needs --coordinator HOST:PORT and --num_processes >= 2")
    partitioning.initialize_distributed(
      args.coordinator, args.num_processes, args.process_id, local_devices=args.local_devices
    )
  elif launch.initialize_from_env():  # a process that `launch` started
    pass
  elif args.num_processes > 1:  # this machine: start the processes and wait for them
    command = [sys.executable, "-m", "dsi_jax.cli", *args.argv]
    return launch.launch(command, args.num_processes, local_devices=args.local_devices)
  elif args.local_devices is not None:
    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
  return None


def _train(args) -> int:
  import gin

  from dsi_jax import errors

  status = _start_processes(args)
  if status is not None:
    return status
  run = _gin_entry_point()
  gin.clear_config()
  root = _project_root()
  files = []
  for path in args.gin_file:
    found = [p for p in (path, os.path.join(root, path)) if os.path.isfile(p)]
    if not found:
      raise errors.UserError(f"{path}: no such gin file")
    files.append(os.path.abspath(found[0]))
  # `include 'gin_configs/...'` lines name files under the project root: parse from there when
  # the working folder has no gin_configs/ of its own (relative workdirs still resolve from the
  # working folder, since training runs after the parse).
  here = os.getcwd()
  try:
    if not os.path.isdir(os.path.join(here, "gin_configs")):
      os.chdir(root)
    gin.parse_config_files_and_bindings(files, args.gin_bindings)
  except Exception as e:  # gin's parser raises many types (SyntaxError, TokenError, ...)
    first = (str(e).splitlines() or [type(e).__name__])[0]
    raise errors.UserError(f"bad gin configuration: {first}") from None
  finally:
    os.chdir(here)
  run()
  return 0


def _search(args) -> int:
  import json

  from dsi_jax import runs

  if args.k < 1:
    raise ValueError(f"-k must be >= 1, got {args.k}")
  from dsi_jax import index

  if index.is_index(args.run):
    if args.phase:
      raise ValueError("--phase applies to run folders, not to an index")
    run = index.Index.load(args.run)
  else:
    run = runs.load_run(args.run, phase=args.phase)
  texts = [t for t in (args.caption, args.text) if t is not None]
  hits = run.search(images=[args.image] if args.image else [], texts=texts, k=args.k)[0]
  if args.json:
    print(json.dumps(hits))
    return 0
  for hit in hits:
    print(f"{hit['rank']:3d}  {hit['score']:9.3f}  {hit['path'] or hit['key']}")
  return 0


def _index(args) -> int:
  import json

  from dsi_jax import index

  progress = not getattr(args, "no_progress", False)
  if args.action == "build":
    config = index.BuildConfig(
      steps=args.steps, views=args.views or index.BuildConfig.views, ids=args.ids, seed=args.seed
    )
    built = index.Index.build(args.source, args.out, config, show_progress=progress)
    print(json.dumps(index.describe(built), indent=1))
  elif args.action == "add":
    config = index.AddConfig(
      steps=args.steps,
      views=args.views or index.AddConfig.views,
      replay=args.replay,
      seed=args.seed,
    )
    grown = index.Index.add(args.index, args.source, config, show_progress=progress)
    print(json.dumps(index.describe(grown)["log"][-1], indent=1))
  elif args.action == "remove":
    count = index.Index.remove(args.index, args.keys)
    print(f"removed {count} item(s); {len(args.keys) - count} were already removed")
  else:
    print(json.dumps(index.describe(index.Index.load(args.index)), indent=1))
  return 0


def _serve(args) -> int:
  from dsi_jax import serve

  serve.serve(args.index, host=args.host, port=args.port)
  return 0


def _table(args) -> int:
  from dsi_jax import results

  print(results.markdown_table(results.load(args.results)["rows"]))
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="dsi-jax", description="Generative retrieval in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("demo", help="ViT-DSI vs BoVW and pixel kNN on a Fashion-MNIST corpus")
  p.add_argument(
    "--out", default="demo_out", help="output folder (results.json, results.md, loss_curves.png)"
  )
  p.add_argument(
    "--quick", action="store_true", help="a small corpus and model (≤ 3 minutes on 2 cores)"
  )
  p.add_argument(
    "--seeds",
    type=int,
    default=1,
    help="repeat the whole run with this many seeds; report mean ± std",
  )
  p.add_argument("--seed", type=int, default=0, help="first seed")
  p.add_argument(
    "--num-images", type=int, default=None, help="corpus size (default 512; 160 with --quick)"
  )
  p.add_argument(
    "--data-dir", default=None, help="Fashion-MNIST idx files (default: the Debian package's)"
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.set_defaults(fn=_demo)

  p = sub.add_parser("train", help="one experiment from gin files (gin_configs/experiments/*.gin)")
  p.add_argument("--gin_file", action="append", default=[], required=True)
  p.add_argument("--gin_bindings", "--gin.binding", action="append", default=[])
  p.add_argument(
    "--num_processes",
    type=int,
    default=1,
    help="run as this many processes (alone: all on this machine, joined through localhost; "
    "with --process_id: the job's size, one command per host)",
  )
  p.add_argument(
    "--local_devices", type=int, default=None, help="CPU devices per process (CPU only)"
  )
  p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (with --process_id)")
  p.add_argument("--process_id", type=int, default=None, help="this process's id in the job")
  p.set_defaults(fn=_train)

  p = sub.add_parser(
    "search",
    help="top-k items of a trained run for an image, a caption or a text",
    description="Searches the index of a trained run folder (dsi-jax demo's runs/seedN/vit_dsi_*, "
    "a gin experiment's workdir, a Flickr or SQuAD run) or an index (dsi-jax index build).",
  )
  p.add_argument("run", help="a run folder (or a folder holding exactly one run)")
  query = p.add_mutually_exclusive_group(required=True)
  query.add_argument("--image", help="an image file as the query (any size, gray, RGB or RGBA)")
  query.add_argument("--caption", help="a caption as the query (image runs that read text)")
  query.add_argument("--text", help="a text query (text runs, e.g. SQuAD)")
  p.add_argument("-k", type=int, default=10, help="how many items (default 10)")
  p.add_argument(
    "--phase", choices=("fine_tuned", "zero_shot"), default=None, help="default: the last trained"
  )
  p.add_argument(
    "--json",
    action="store_true",
    help='print [{"rank": 1, "key": ..., "score": ..., "path": ... or null}, ...]',
  )
  p.set_defaults(fn=_search)

  p = sub.add_parser("index", help="your own collection: build, add to, remove from an index")
  actions = p.add_subparsers(dest="action", required=True)
  a = actions.add_parser(
    "build",
    help="index a folder of images (optional captions.csv) or a JSONL of documents",
    description="Builds a DSI index of SOURCE: a folder of images (any format OpenCV reads) "
    'or a JSONL file of {"id": ..., "text": ..., "queries": [...]} documents.',
  )
  a.add_argument("source", help="a folder of images or a .jsonl file of documents")
  a.add_argument("--out", required=True, help="the index folder to create (new or empty)")
  a.add_argument(
    "--ids", choices=("atomic", "random", "semantic"), default="atomic", help="default: atomic"
  )
  a = actions.add_parser("add", help="add the items of SOURCE (old ids are kept)")
  a.add_argument("index")
  a.add_argument("source")
  a.add_argument(
    "--replay", type=float, default=1.0, help="old items' views per new view (default 1)"
  )
  for a in actions.choices.values():
    a.add_argument("--steps", type=int, default=None, help="training steps (default: scaled)")
    a.add_argument("--views", type=int, default=None, help="training views per item")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
  a = actions.add_parser("remove", help="take items out at once (no training)")
  a.add_argument("index")
  a.add_argument("keys", nargs="+", metavar="KEY")
  a = actions.add_parser("info", help="what an index holds and how it was made")
  a.add_argument("index")
  p.set_defaults(fn=_index)

  p = sub.add_parser("serve", help="a search page for an index (dsi-jax index build)")
  p.add_argument("index")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--host", default="127.0.0.1", help="default: this machine only")
  p.set_defaults(fn=_serve)

  p = sub.add_parser("table", help="print the results table of a results.json")
  p.add_argument("results")
  p.set_defaults(fn=_table)

  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  _quiet_logs()
  from dsi_jax import errors

  try:
    return args.fn(args)
  except (errors.UserError, FileNotFoundError, ValueError) as e:
    message = (str(e).splitlines() or [type(e).__name__])[0]
    print(f"dsi-jax {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
