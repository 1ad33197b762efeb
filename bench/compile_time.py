"""Compile time of an update-like step (forward + backward of the token log-probs) by depth.

    python bench/compile_time.py [--layers 4 32] [--remat]

A tiny-width Llama-style decoder (d=64, 4 heads, 2 kv heads, vocab 256, batch 4 x 64 tokens),
unrolled and with `scan_layers`. Each configuration is lowered and compiled once in a fresh
jit (nothing cached between them); the time from `jax.jit(...).lower(...)` to a compiled
executable is printed, along with the ratio to the shallowest depth. Unrolled, XLA sees every
block: compile time grows with depth. Scanned, it sees one block inside a loop.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from p3o_jax.models import decoder


def compile_seconds(num_layers: int, scan: bool, remat: bool) -> float:
  cfg = decoder.DecoderConfig(vocab_size=256, hidden_size=64, num_layers=num_layers, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, norm="rmsnorm", mlp="swiglu",
                              activation="silu", scan_layers=scan, remat=remat)
  graph, params = decoder.abstract(cfg)
  tokens = jax.ShapeDtypeStruct((4, 64), jnp.int32)

  def update(params, tokens, mask):
    loss = lambda p: -decoder.token_logprobs(graph, p, tokens, mask).mean()
    value, grads = jax.value_and_grad(loss)(params)
    return value, jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

  start = time.perf_counter()
  jax.jit(update).lower(params, tokens, tokens).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
  parser.add_argument("--remat", action="store_true")
  args = parser.parse_args()
  compile_seconds(2, True, args.remat)  # first-use costs (backend start, tracing caches) out of the way
  for scan in (False, True):
    times = {n: compile_seconds(n, scan, args.remat) for n in args.layers}
    base = times[args.layers[0]]
    for n, seconds in times.items():
      print(f"{'scan' if scan else 'unrolled':8s} remat={args.remat!s:5s} layers={n:3d}: "
            f"{seconds:6.2f} s  ({seconds / base:.2f}x layers={args.layers[0]})", flush=True)


if __name__ == "__main__":
  main()
