"""Keeps freed host memory in the process on CPU runs (`config.mesh.cpu_reuse_memory`).

XLA:CPU allocates each call's scratch buffer with malloc. glibc serves a block above 32 MB with a
fresh mmap and hands it back to the OS when it is freed, so every call touches new pages: one
page fault per 4 kB. The RL update of bench/rl_iteration.py's tiny policy (47 MB of scratch) took
11.6k faults and 42 ms a call; with the setting below, none and 30-31 ms (the whole iteration
1.1-1.2x faster, fp32 and bf16). On a GPU or TPU the scratch is device memory, so only CPU runs
take the setting.

The setting: large blocks come from the heap instead of mmap (glibc's M_MMAP_MAX = 0), and up to
KEEP_FREED_BYTES of free heap is kept instead of returned (M_TRIM_THRESHOLD); the process then
holds on to its peak memory, as tcmalloc and jemalloc do. A block above 64 MB that a worker
thread asks for still gets its own mmap (glibc caps a thread's arena there): the small policy's
162 MB update scratch still faults, unless micro-batches keep it under 64 MB (rl.micro_batches=4:
56 MB, 206 ms against 230-246 ms). Sharing one arena (M_ARENA_MAX = 1) would lift that cap, but
measured, its lock slowed the per-core sampler by 10-30%, and the small policy's whole
iteration gained nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import logging
import os
import re

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
KEEP_FREED_BYTES = 1 << 30
# A JAX plugin for one of these means JAX may pick an accelerator over the CPU.
_ACCELERATOR_PLUGIN = re.compile(r"^(jax[-_](cuda|rocm)\d*[-_]plugin|libtpu([-_]nightly)?)$", re.IGNORECASE)


def _glibc():
  """The C library when it is glibc (the one with these mallopt knobs), else None."""
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    libc.mallopt  # noqa: B018
  except (OSError, AttributeError):
    return None
  return libc


def runs_on_cpu() -> bool:
  """Whether JAX will run on its CPU backend, told before the backends start: JAX_PLATFORMS (or
  jax.config.jax_platforms) names cpu first, or no accelerator plugin is installed."""
  import jax  # noqa: PLC0415  (reading a config option starts no backend)
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not any(_ACCELERATOR_PLUGIN.match(dist.metadata["Name"] or "")
                 for dist in importlib.metadata.distributions())


def reuse_freed_memory() -> str:
  """Applies the setting above to this process; returns what held, for the log."""
  libc = _glibc()
  if libc is None:
    return "host memory: not glibc, malloc left as it is"
  for option, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREED_BYTES)):
    if libc.mallopt(option, value) != 1:
      return f"host memory: glibc refused mallopt({option}, {value}), malloc partly set"
  return f"freed host memory kept for reuse, up to {KEEP_FREED_BYTES >> 20} MB (mesh.cpu_reuse_memory)"


def configure(config) -> str:
  """`reuse_freed_memory` on a CPU run with mesh.cpu_reuse_memory (the default); '' otherwise."""
  if not config.mesh.get("cpu_reuse_memory", True) or not runs_on_cpu():
    return ""
  note = reuse_freed_memory()
  log.info(note)
  return note
