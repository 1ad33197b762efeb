"""A peer (transformers, TRL: torch underneath) timed beside p3o_jax in a benchmark.

`run_apart` runs the peer in a fresh process of its own: glibc's malloc setting cannot be undone
in a process once made, and torch's worker threads must not spin beside ours.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings

import torch
import transformers

from p3o_jax import host_memory


def quiet_torch() -> None:
  """Torch on every core; transformers' and TRL's logs, progress bars and deprecations off."""
  torch.set_num_threads(os.cpu_count())
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers / TRL


def _child(fn, malloc: str, args: tuple):
  if malloc == "reuse":
    host_memory.reuse_freed_memory()
  quiet_torch()
  return fn(*args)


def run_apart(fn, malloc: str, *args):
  """fn(*args) in a fresh process, with glibc's malloc as the peer's users run it ('default') or
  with the setting p3o_jax makes on a CPU ('reuse', p3o_jax/host_memory.py)."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(_child, (fn, malloc, args))
