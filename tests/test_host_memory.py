"""mesh.cpu_reuse_memory: freed host memory kept for XLA:CPU's next call (p3o_jax/host_memory.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from p3o_jax import host_memory
from p3o_jax.config_base import base_config

# A 50 MB block (above glibc's 32 MB mmap limit) malloc'd, written and freed over and over, as
# XLA:CPU does with each call's scratch: its page faults a round once warm, with the
# setting made first (argv[1] == 'reuse', as p3o_jax.main makes it) or not. One thread, so the
# count is exact (XLA's calls may run on any of its threads, each with its own arena).
_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    from p3o_jax import host_memory
    note = host_memory.reuse_freed_memory()[1] if sys.argv[1] == "reuse" else "default"
    libc = host_memory._glibc()
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    def round_trip():
      block = libc.malloc(50_000_000)
      ctypes.memset(block, 1, 50_000_000)  # every page written
      libc.free(block)
    for _ in range(3):
      round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
      round_trip()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    print(50e6 / 4096, faults, note)
""")


def _faults(mode: str):
  env = {**os.environ, "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  pages, faults, note = out.stdout.split(maxsplit=2)
  return float(pages), float(faults), note.strip()


@pytest.mark.skipif(host_memory._glibc() is None, reason="the mallopt knobs are glibc's")
def test_reuse_stops_the_page_faults_of_every_call():
  pages, default, _ = _faults("default")
  _, reused, note = _faults("reuse")
  # By default every round faults the block in anew; kept memory is touched once, then reused.
  assert default > pages / 2, (pages, default)
  assert reused < pages / 100, (pages, reused)
  assert "mesh.cpu_reuse_memory" in note


# An XLA program whose 96 MB scratch (sin(x), materialised for the dot) is more than a worker
# thread's malloc arena holds: the fewest page faults of a warm call, in a fresh process with
# p3o_jax.main's CPU setting made first (argv[1] == 'reuse') or not. The fewest, not the median:
# with both cores busy (another process's matmuls) some warm calls still fault the whole block
# (four in a row, then none, in one of three runs measured so; strace shows the heap growing by
# one block at each, as if the previous call's block were not yet freed), until the kept heap
# holds enough blocks; without the setting every call faults.
_XLA_FAULTS = textwrap.dedent("""
    import resource, sys
    from p3o_jax import host_memory
    from p3o_jax.config_base import base_config
    note = host_memory.configure(base_config()) if sys.argv[1] == "reuse" else "default"
    import jax, jax.numpy as jnp
    scratch = jax.jit(lambda x, w: (jnp.sin(x).reshape(4000, 6000) @ w).sum())
    x, w = jnp.ones((24_000_000,), jnp.float32), jnp.ones((6000, 8), jnp.float32)
    faults = []
    for _ in range(10):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      scratch(x, w).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(96e6 / 4096, min(faults[2:]), note)
""")


@pytest.mark.skipif(host_memory._glibc() is None, reason="the mallopt knobs are glibc's")
def test_an_xla_call_above_a_worker_arena_reuses_its_scratch():
  """The second part of the setting: a one-device call runs on the calling thread, so its scratch
  above 64 MB comes from the kept heap too (on a worker thread it got an mmap of its own)."""
  runs = {}
  for mode in ("default", "reuse"):
    env = {k: v for k, v in os.environ.items() if k != "JAX_CPU_ENABLE_ASYNC_DISPATCH"}
    env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _XLA_FAULTS, mode], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    pages, faults, note = out.stdout.split(maxsplit=2)
    runs[mode] = float(pages), float(faults), note.strip()
  (pages, default, _), (_, reused, note) = runs["default"], runs["reuse"]
  assert default > pages / 2, (pages, default)
  assert reused < pages / 100, (pages, reused)
  assert "calling thread" in note


def test_configure_touches_cpu_runs_only_and_can_be_turned_off(monkeypatch):
  calls = []
  monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: calls.append("malloc") or (True, "freed memory kept"))
  monkeypatch.setattr(host_memory, "run_calls_on_calling_thread", lambda: calls.append("dispatch") or "inline")
  config = base_config()
  assert config.mesh.cpu_reuse_memory is True  # the default
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory.runs_on_cpu() and host_memory.configure(config) == "" and calls == []
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.runs_on_cpu() and host_memory.configure(config) == "freed memory kept; inline"
  assert calls == ["malloc", "dispatch"]
  # Where glibc did not take the malloc part, calls stay where JAX puts them.
  not_glibc = "host memory: not glibc, malloc left as it is"
  monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: (False, not_glibc))
  assert host_memory.configure(config) == "host memory: not glibc, malloc left as it is"
  assert calls == ["malloc", "dispatch"]
  config.mesh.cpu_reuse_memory = False
  assert host_memory.configure(config) == "" and calls == ["malloc", "dispatch"]


def test_a_users_dispatch_choice_wins(monkeypatch):
  monkeypatch.setenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", "1")
  assert "JAX_CPU_ENABLE_ASYNC_DISPATCH" in host_memory.run_calls_on_calling_thread()
  monkeypatch.delenv("JAX_CPU_ENABLE_ASYNC_DISPATCH")
  import jax
  jax.devices()  # this test process's backends run already: too late to change, and it says so
  assert "already running" in host_memory.run_calls_on_calling_thread()


def test_accelerator_plugins_are_recognised():
  names = ["jax-cuda12-plugin", "jax_cuda13_plugin", "jax-rocm7-plugin", "libtpu", "libtpu-nightly"]
  assert all(host_memory._ACCELERATOR_PLUGIN.match(n) for n in names)
  assert not any(host_memory._ACCELERATOR_PLUGIN.match(n) for n in ["jax", "jaxlib", "jax-cuda12-pjrt", "flax"])
