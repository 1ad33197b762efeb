"""JAX's persistent compilation cache, on by default, and a count of what each stage compiled.

A resumed run, the next stage, or a second `make demo` loads the executables an earlier process
compiled instead of compiling them again. The cache lives under the user's cache folder
(`$XDG_CACHE_HOME/p3o_jax/jax`, else `~/.cache/p3o_jax/jax`); `--compile_cache=DIR` or the
environment variable P3O_JAX_COMPILE_CACHE moves it, and `off` turns it off. Entries are keyed by
the program, the devices and the compiler flags, so a stale entry is never used. In a job of
several processes every one reads the cache and process 0 writes it (JAX's rule); a pod whose
hosts should share entries points `--compile_cache` at a common folder or bucket.
"""

from __future__ import annotations

import collections
import logging
import os

import jax
from etils import epath
from jax import monitoring

log = logging.getLogger(__name__)

_PROGRAMS = "/jax/core/compile/backend_compile_duration"  # every executable obtained, compiled or loaded
_HITS = "/jax/compilation_cache/cache_hits"
_counts: collections.Counter = collections.Counter()
_listening = False


def default_dir() -> str:
  configured = os.environ.get("P3O_JAX_COMPILE_CACHE")
  if configured:
    return configured
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "p3o_jax", "jax")


def enable(directory: str | None = None) -> str | None:
  """Turns the persistent cache on in `directory` (default: `default_dir()`); 'off' leaves it
  off. Returns the folder used, or None."""
  directory = directory or default_dir()
  _listen()
  if directory == "off":
    return None
  try:  # epath: a cache a pod's hosts share may live in a bucket (gs://...)
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
  except (OSError, ImportError) as e:  # a read-only home, a bucket without gcsfs: run without the cache
    log.warning("compilation cache off: cannot create %s (%s)", directory, e)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  # Cache every program: on CPU most compile in well under JAX's default 1 s threshold, and
  # a stage compiles dozens of them.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def _listen() -> None:
  global _listening
  if _listening:
    return
  _listening = True

  def on_duration(event: str, seconds: float, **_) -> None:
    if event == _PROGRAMS:
      _counts["programs"] += 1
      _counts["seconds"] += seconds

  def on_event(event: str, **_) -> None:
    if event == _HITS:
      _counts["hits"] += 1

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_listener(on_event)


def snapshot() -> dict:
  return dict(_counts)


def report(name: str, since: dict) -> dict:
  """Logs and returns what was compiled and what came from the cache since `snapshot()`."""
  now = snapshot()
  programs = now.get("programs", 0) - since.get("programs", 0)
  hits = now.get("hits", 0) - since.get("hits", 0)
  seconds = now.get("seconds", 0.0) - since.get("seconds", 0.0)
  out = {"compiled": programs - hits, "from_cache": hits, "seconds": seconds}
  log.info("%s: %d programs compiled, %d loaded from the compilation cache (%.1f s)", name, out["compiled"],
           hits, seconds)
  return out
