"""How many CPU devices a run makes (`config.mesh.cpu_devices`), set before JAX starts its
backends.

XLA:CPU makes one device; `mesh.cpu_devices=N` makes N, and with `mesh.data=-1` the batch is then
split over them. Measured on a 2-core CPU (README, Benchmarks): a small model's decode loop runs
on about one core, so 2 devices sample 1.6x faster; the update and the scoring passes, whose
matmuls already use both cores on one device, get slower (two programs compete for the cores and
the gradients are all-reduced), and the demo pipeline as a whole takes 83 s on 2 devices against
80 s on one. So the default is 1. The setting only touches the CPU backend: on a GPU or TPU host
the mesh is made of the accelerators whatever it says.
"""

from __future__ import annotations

import os

import jax


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def parse(setting) -> int:
  """A mesh.cpu_devices value as a positive int ('cores': one per core); ValueError otherwise."""
  text = str(setting).strip().lower()
  if text == "cores":
    return cores()
  if text.isdigit() and int(text) >= 1:
    return int(text)
  raise ValueError(f"must be a positive integer or 'cores' (one CPU device per core), got {setting!r}")


def count(config) -> int:
  """config.mesh.cpu_devices as a positive int; a named error otherwise."""
  setting = config.mesh.get("cpu_devices", "1")
  try:
    return parse(setting)
  except ValueError as e:
    raise ValueError(f"config.mesh.cpu_devices={setting!r}: {e}") from None


def configure(config, *, multi_process: bool = False) -> str:
  """Makes `count(config)` CPU devices unless the count is already fixed: by XLA_FLAGS
  (--xla_force_host_platform_device_count), by a multi-process job (each process keeps the
  devices it was started with) or by backends already running. Returns what held, for the log."""
  wanted = count(config)
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return "CPU devices set by XLA_FLAGS"
  if multi_process:
    return "CPU devices as the job started them"
  if wanted == 1:
    return ""
  from jax._src import xla_bridge  # noqa: PLC0415  (the one check JAX has for this)
  if xla_bridge.backends_are_initialized():
    return f"mesh.cpu_devices={wanted} not applied: JAX's backends are already running"
  jax.config.update("jax_num_cpu_devices", wanted)
  return f"mesh.cpu_devices={wanted}"
