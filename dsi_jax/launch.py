"""Several processes of one program on this machine, started the way a pod starts one per host.

`launch(command, num_processes)` runs `command` once per process with the coordinator's
address, the process count and the process's id in its environment (`ENV_*`); the program
calls `initialize_from_env()` first, which joins them through `jax.distributed` (gloo
collectives between CPU processes). If one process fails or is killed, the others are
stopped (they would otherwise wait for it at the next collective) and `launch` returns the
first failure's exit status. This is what `dsi-jax train --num_processes N` does; on a pod,
each host runs the command itself with `--coordinator` and `--process_id`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

ENV_COORDINATOR = "DSI_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DSI_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DSI_JAX_PROCESS_ID"
ENV_LOCAL_DEVICES = "DSI_JAX_LOCAL_DEVICES"


def free_port() -> int:
  """A TCP port on localhost that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(
  command: Sequence[str],
  num_processes: int,
  *,
  local_devices: int | None = None,
  env: Mapping[str, str] | None = None,
  grace_seconds: float = 10.0,
) -> int:
  """Runs `command` as processes 0 .. num_processes - 1 of one job; 0 when all succeed."""
  if num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  base = dict(os.environ if env is None else env)
  base[ENV_COORDINATOR] = f"127.0.0.1:{free_port()}"
  base[ENV_NUM_PROCESSES] = str(num_processes)
  if local_devices is not None:
    base[ENV_LOCAL_DEVICES] = str(local_devices)
  procs = [
    subprocess.Popen(list(command), env={**base, ENV_PROCESS_ID: str(i)})
    for i in range(num_processes)
  ]
  status, first = 130, None
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        first = failed[0]
        status = codes[first]
        break
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.2)
  except KeyboardInterrupt:
    pass
  for p in procs:  # one failed: the others would wait for it at their next collective
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace_seconds
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  if first is not None:
    print(
      f"dsi-jax: process {first} of {num_processes} exited with status {status}; "
      "stopped the others",
      file=sys.stderr,
    )
  return status if status > 0 else 1  # killed by a signal: a failure too


def initialize_from_env() -> bool:
  """Joins the job `launch` started this process in (True), or does nothing (False)."""
  if ENV_PROCESS_ID not in os.environ:
    return False
  from dsi_jax import partitioning

  local = os.environ.get(ENV_LOCAL_DEVICES)
  partitioning.initialize_distributed(
    os.environ[ENV_COORDINATOR],
    int(os.environ[ENV_NUM_PROCESSES]),
    int(os.environ[ENV_PROCESS_ID]),
    local_devices=int(local) if local else None,
  )
  return True
