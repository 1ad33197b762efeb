"""Keeps freed host memory in the process on CPU runs (`config.mesh.cpu_reuse_memory`).

XLA:CPU allocates each call's scratch buffer with malloc. glibc serves a block above 32 MB with a
fresh mmap and hands it back to the OS when it is freed, so every call touches new pages: one
page fault per 4 kB. The RL update of bench/rl_iteration.py's tiny policy (47 MB of scratch) took
11.6k faults and 42 ms a call; with the setting below, none and 30-31 ms (the whole iteration
1.1-1.2x faster, fp32 and bf16). On a GPU or TPU the scratch is device memory, so only CPU runs
take the setting.

The setting, in two parts:
  * large blocks come from the heap instead of mmap (glibc's M_MMAP_MAX = 0), and up to
    KEEP_FREED_BYTES of free heap is kept instead of returned (M_TRIM_THRESHOLD); the process then
    holds on to its peak memory, as tcmalloc and jemalloc do;
  * a one-device call runs on the thread that makes it (JAX's jax_cpu_enable_async_dispatch off),
    so its scratch comes from that heap. JAX otherwise runs it on a worker thread, whose malloc
    arena glibc caps at 64 MB: a bigger block there got an mmap of its own whatever the first
    part says. The small policy's update (162 MB of scratch) took 39.7k faults a call that way;
    on the calling thread, none, and 190 against 220-230 ms in fp32, 121 against 151-175 ms in
    bf16. A call over several devices still runs on worker threads, one per device.
Sharing one malloc arena among all threads (M_ARENA_MAX = 1) would lift the cap too, but
measured, its lock slowed the per-core sampler by 10-30%. A variable JAX_CPU_ENABLE_ASYNC_DISPATCH
set by the user wins over the second part.
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


def reuse_freed_memory() -> tuple[bool, str]:
  """Applies the setting's first part (malloc) to this process; returns whether glibc took it
  and what held, for the log."""
  libc = _glibc()
  if libc is None:
    return False, "host memory: not glibc, malloc left as it is"
  for option, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREED_BYTES)):
    if libc.mallopt(option, value) != 1:
      return False, f"host memory: glibc refused mallopt({option}, {value}), malloc partly set"
  return True, f"freed host memory kept for reuse, up to {KEEP_FREED_BYTES >> 20} MB (mesh.cpu_reuse_memory)"


def run_calls_on_calling_thread() -> str:
  """The setting's second part, before JAX starts its CPU backend; returns what held."""
  import jax  # noqa: PLC0415
  from jax._src import xla_bridge  # noqa: PLC0415  (the one check JAX has for this)
  if "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ:
    return "CPU dispatch as JAX_CPU_ENABLE_ASYNC_DISPATCH says"
  if xla_bridge.backends_are_initialized():
    return "CPU calls left on worker threads: JAX's backends are already running"
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return "one-device calls run on the calling thread"


def apply() -> str:
  """Both parts of the setting, the second only where glibc took the first; returns what held."""
  kept, note = reuse_freed_memory()
  return f"{note}; {run_calls_on_calling_thread()}" if kept else note


def configure(config) -> str:
  """`apply` on a CPU run with mesh.cpu_reuse_memory (the default); '' where it does not apply."""
  if not config.mesh.get("cpu_reuse_memory", True) or not runs_on_cpu():
    return ""
  note = apply()
  log.info(note)
  return note
