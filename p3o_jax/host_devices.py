"""How many CPU devices a run makes (`config.mesh.cpu_devices`), decided before JAX starts its
backends.

XLA:CPU runs a small model's matmuls and decode step on about one core, so on a multi-core host
one CPU device per core, with the batch split over them (`mesh.data=-1`), is how sampling,
scoring and the update all use every core; a model whose matmuls already fill the cores gains
nothing from the split and pays its collectives. 'auto' makes one device per core for a policy
of hidden size <= SMALL_HIDDEN and leaves JAX's single device otherwise (bench/rl_iteration.py
measures both). The setting only touches the CPU backend: on a GPU or TPU host the mesh is made
of the accelerators whatever it says.
"""

from __future__ import annotations

import json
import os

import jax

SMALL_HIDDEN = 256
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")  # HF config.json spellings


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def policy_hidden_size(config) -> int | None:
  """The policy's hidden size from config.model.arch, or a local HF folder's config.json; None
  when it cannot be read without loading anything (a hub id)."""
  if not config.model.hf:
    return config.model.arch.get("hidden_size")
  path = os.path.join(config.model.hf, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    hf_config = json.load(f)
  hf_config = hf_config.get("text_config", hf_config)
  return next((int(hf_config[k]) for k in _HIDDEN_KEYS if k in hf_config), None)


def choose(config) -> tuple[int | None, str]:
  """(CPU devices to make, or None to leave JAX's default; why), from config.mesh.cpu_devices."""
  setting = str(config.mesh.get("cpu_devices", "auto")).strip().lower()
  if setting != "auto":
    try:
      count = int(setting)
    except ValueError:
      count = 0
    if count < 1:
      raise ValueError(f"config.mesh.cpu_devices={config.mesh.cpu_devices!r}: expected 'auto' or a positive integer")
    return count, f"mesh.cpu_devices={count}"
  hidden, n = policy_hidden_size(config), cores()
  if hidden is None:
    return None, "mesh.cpu_devices=auto: policy size unknown, one CPU device"
  if n > 1 and hidden <= SMALL_HIDDEN:
    return n, f"mesh.cpu_devices=auto: hidden size {hidden} <= {SMALL_HIDDEN}, one CPU device per core ({n})"
  return None, f"mesh.cpu_devices=auto: hidden size {hidden}, one CPU device"


def configure(config, *, multi_process: bool = False) -> str:
  """Applies `choose` unless the device count is already fixed: by XLA_FLAGS
  (--xla_force_host_platform_device_count), by backends already running, or by a multi-process
  job (each process keeps the devices it was started with). Returns a line saying what held."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return "CPU devices set by XLA_FLAGS"
  if multi_process:
    return "CPU devices as the job started them"
  count, why = choose(config)
  if count is None:
    return why
  from jax._src import xla_bridge  # noqa: PLC0415  (the one public-facing check JAX has for this)
  if xla_bridge.backends_are_initialized():
    return f"{why}; not applied: JAX's backends are already running"
  jax.config.update("jax_num_cpu_devices", count)
  return why
