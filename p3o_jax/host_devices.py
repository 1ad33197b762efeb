"""How many CPU devices a run makes (`config.mesh.cpu_devices`), set before JAX starts its
backends.

XLA:CPU makes one device; `mesh.cpu_devices=N` gives the trainer N, and with `mesh.data=-1` the
batch is then split over them, every pass (sampling, scoring, the update) running each device's
rows. Measured on a 2-core CPU (bench/rl_iteration.py --devices 2, medians of 5 runs; README,
Benchmarks; docs/speed.md): with minibatches of 32 rows of 64 tokens a d=128 policy's whole RL
iteration runs about as fast on 2 devices as on one, a d=256 policy's 11-23% slower, now that one
device no longer page-faults its update's scratch (host_memory.py); and the demo (d=64,
minibatches of 16 short rows, 32 update steps per iteration) runs its RL stages 12% slower on 2
devices (each step's all-reduce and dispatch outweigh its small matmuls). A sweep of
d = 64-256 and 4-64 prompts of 8-32 tokens found none whose update 2 devices ran more than a few
percent faster, and several they ran 1.5x slower. So the default is 1. The setting only touches
the CPU backend: on a GPU or TPU host the mesh is made of the accelerators whatever it says.

The sampler may decode on more CPU devices than the trainer uses (`config.sampler.cpu_devices`):
'auto' makes one per core and samples on all of them when the training mesh is one device and
the policy is small (SAMPLE_PER_CORE_MAX_PARAMS), the case measured above; the scoring passes and
the update stay on the trainer's device.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)

# Policies up to this size decode on one CPU device per core under sampler.cpu_devices='auto':
# measured on 2 cores (README, Benchmarks; docs/speed.md), a 0.5M-parameter policy samples
# 1.4-1.6x faster on 2 devices, a 3M one 1.2x, and a Pythia-70M-shaped one (70M) 1.6x slower:
# each device then reads all the weights at every step.
SAMPLE_PER_CORE_MAX_PARAMS = 20_000_000
DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"  # XLA:CPU's, read when its backend starts


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


def is_auto(setting) -> bool:
  """Whether a sampler.cpu_devices value is 'auto' (any case, surrounding spaces ignored)."""
  return str(setting).strip().lower() == "auto"


def _named_count(field: str, setting, also: str = "") -> int:
  try:
    return parse(setting)
  except ValueError as e:
    raise ValueError(f"config.{field}={setting!r}: {e}{also}") from None


def mesh_count(mesh_cfg) -> int:
  """config.mesh.cpu_devices as a positive int; a named error otherwise."""
  return _named_count("mesh.cpu_devices", mesh_cfg.get("cpu_devices", "1"))


def count(config) -> int:
  """The trainer's CPU devices (config.mesh.cpu_devices)."""
  return mesh_count(config.mesh)


def sampler_count(config) -> int:
  """config.sampler.cpu_devices as a positive int ('auto': one per core); a named error otherwise."""
  setting = config.sampler.get("cpu_devices", "auto")
  return cores() if is_auto(setting) else _named_count("sampler.cpu_devices", setting, " (or 'auto')")


def _set_by_xla_flags() -> bool:
  return DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "")


def xla_flags_with_device_count(flags: str, devices: int) -> str:
  """XLA_FLAGS `flags` with the CPU device count set to `devices` (any count already there
  dropped): for the environment of a child process that must make exactly that many."""
  kept = [f for f in flags.split() if DEVICE_COUNT_FLAG not in f]
  return " ".join([f"--{DEVICE_COUNT_FLAG}={devices}", *kept])


def training_devices(mesh_cfg) -> list:
  """The devices the training mesh may span: all of them, except on a single-process CPU run
  whose devices `configure` made, where the first mesh.cpu_devices (the rest are the sampler's)."""
  devices = jax.devices()
  if devices[0].platform != "cpu" or _set_by_xla_flags() or jax.process_count() > 1:
    return devices
  return devices[: mesh_count(mesh_cfg)]


def sampler_devices(config, train_mesh, params) -> list | None:
  """The devices the sampler decodes on when they are not the training mesh's (None: one
  device), else None.

  Only a single-process CPU run whose trainer holds one device samples apart: 'auto' on one
  device per core for a policy of at most SAMPLE_PER_CORE_MAX_PARAMS parameters, N on the
  first N devices. Printed once, with the reason."""
  setting = config.sampler.get("cpu_devices", "auto")
  devices = jax.devices()
  if devices[0].platform != "cpu" or jax.process_count() > 1 or (train_mesh is not None and train_mesh.size > 1):
    return None
  size = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  if is_auto(setting) and size > SAMPLE_PER_CORE_MAX_PARAMS:
    _announce(f"sampler on the trainer's CPU device: {size / 1e6:.1f}M parameters (sampler.cpu_devices=auto "
              f"samples per core up to {SAMPLE_PER_CORE_MAX_PARAMS / 1e6:.0f}M)")
    return None
  wanted = min(sampler_count(config), len(devices))
  if wanted <= 1:
    return None
  _announce(f"sampler on {wanted} CPU devices (sampler.cpu_devices={str(setting).strip().lower()}, "
            f"{size / 1e6:.1f}M parameters); "
            "scoring and the update on the trainer's one")
  return devices[:wanted]


_ANNOUNCED: set[str] = set()


def _announce(message: str) -> None:
  """Prints a device choice once per process (every stage's Roller makes the same one)."""
  if message not in _ANNOUNCED:
    _ANNOUNCED.add(message)
    print(message, flush=True)
    log.info(message)


def configure(config, *, multi_process: bool = False) -> str:
  """Makes the CPU devices the trainer (`count`) and the sampler (`sampler_count`) ask for, the
  larger of the two, unless the count is already fixed: by XLA_FLAGS
  (--xla_force_host_platform_device_count), by a multi-process job (each process keeps the
  devices it was started with) or by backends already running. Returns what held, for the log."""
  wanted = max(count(config), sampler_count(config))
  if _set_by_xla_flags():
    return "CPU devices set by XLA_FLAGS"
  if multi_process:
    return "CPU devices as the job started them"
  if wanted == 1:
    return ""
  from jax._src import xla_bridge  # noqa: PLC0415  (the one check JAX has for this)
  if xla_bridge.backends_are_initialized():
    return f"mesh.cpu_devices={wanted} not applied: JAX's backends are already running"
  jax.config.update("jax_num_cpu_devices", wanted)
  return (f"mesh.cpu_devices={count(config)}, sampler.cpu_devices={config.sampler.get('cpu_devices', 'auto')}: "
          f"{wanted} CPU devices made")
