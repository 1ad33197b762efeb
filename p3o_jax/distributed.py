"""Multi-process start-up: JAX's own multi-controller runtime, one process per host (or per GPU).

    python -m p3o_jax.main --distributed ...                       # TPU pod, SLURM, Open MPI: detected
    python -m p3o_jax.main --distributed --coordinator_address=10.0.0.1:1234 \
        --num_processes=2 --process_id=0 ...                        # anything else: say it

Every process runs the same program on its own devices; arrays that span processes are built
from each process's own rows (`sharding.RowSplit`) and only process 0 writes logs, reports and
exports (`is_main`). On CPU the collectives go over gloo.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Sequence

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class DistributedInitError(RuntimeError):
  """The process could not join the job (bad arguments or an unreachable coordinator)."""


def _check(coordinator_address, num_processes, process_id) -> None:
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  named = [k for k, v in given.items() if v is not None]
  if named and len(named) < 3:
    missing = [k for k in given if k not in named]
    raise DistributedInitError(f"{', '.join(named)} given without {', '.join(missing)}: name all three, "
                               "or none to detect the cluster (TPU, SLURM, Open MPI)")
  if num_processes is not None and num_processes < 1:
    raise DistributedInitError(f"--num_processes={num_processes} must be >= 1")
  if process_id is not None and not 0 <= process_id < num_processes:
    raise DistributedInitError(f"--process_id={process_id} is out of range for --num_processes={num_processes} "
                               f"(ids are 0..{num_processes - 1})")
  if coordinator_address is not None and ":" not in coordinator_address:
    raise DistributedInitError(f"--coordinator_address={coordinator_address!r}; expected host:port")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               timeout_s: int = 300) -> None:
  """Joins the multi-process job; with no arguments the cluster is detected (TPU, SLURM, Open MPI).

  Raises DistributedInitError naming the bad value, or the coordinator that did not answer
  within `timeout_s` seconds. If the job is still incomplete after `timeout_s` (a process
  never started), the process says so and exits with status 2 rather than waiting for ever
  (JAX's own deadline aborts the interpreter with a C++ stack trace).
  """
  _check(coordinator_address, num_processes, process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; GPUs/TPUs use their own
  if coordinator_address is not None and process_id != 0:
    _wait_for_coordinator(coordinator_address, timeout_s)
  who = (f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
         if coordinator_address else "this process (cluster detected)")
  watchdog = threading.Timer(timeout_s, _give_up, args=(who, timeout_s))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=int(timeout_s) + 60)
  except Exception as e:  # noqa: BLE001 - re-raised with what was tried
    raise DistributedInitError(f"{who} could not join the job: {type(e).__name__}: {_first_line(e)}") from e
  finally:
    watchdog.cancel()
  log.info("distributed: process %d of %d, %d local devices of %d (%s)", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Polls host:port until it accepts a connection; a clear error after timeout_s."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedInitError(f"the coordinator {address} did not answer within {timeout_s}s ({e}); is "
                                   "process 0 running, and is --coordinator_address its reachable host:port?") from e
      time.sleep(0.5)


def _give_up(who: str, timeout_s: float) -> None:
  sys.stderr.write(f"\nDistributedInitError: {who}: the job was not complete after {timeout_s}s (a process "
                   "never joined: check --num_processes and that every process was started); exiting.\n")
  sys.stderr.flush()
  os._exit(2)  # pylint: disable=protected-access - the main thread is blocked inside JAX


def _first_line(error) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else ""


def is_main() -> bool:
  """Process 0 writes logs, reports and exports; every process computes."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op in one process), e.g. until
  process 0 has finished writing a file the others read next."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
