"""SFT with and without packing (sft.packing): real tokens trained per second.

    python bench/sft_packing.py [--examples 512] [--length 256] [--batch 16] [--runs 3]

The small benchmark shape (4 layers, d=256, 4 heads, MLP 1024, vocab 512; fp32) on SFT
examples whose lengths vary as TL;DR's do relative to the row (prompts of 8-200 tokens, answers
of 8-56), one example to a row (`batching.sft_batch`) against several to a row
(`batching.pack_sft`, each a segment of its own). Each run times the forward and backward pass
of the SFT loss over every batch of both, after a compiling pass, and prints the real (non-pad)
tokens per second, the share of each layout's tokens that are real, and the ratio; then the
median over runs.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from p3o_jax import supervised
from p3o_jax.data import batching, synthetic
from p3o_jax.models import decoder

import runs  # bench/, the script's own folder


def examples(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
  """Digit strings as texts: the demo tokenizer writes one token per digit."""
  rng = np.random.default_rng(seed)
  text = lambda n: " ".join(str(d) for d in rng.integers(0, 10, n))
  return ([text(n) for n in rng.integers(8, 201, count)], [text(n) for n in rng.integers(8, 57, count)])


def batches(layout: dict, batch: int) -> list[dict]:
  rows = len(layout["tokens"]) // batch * batch
  return [{name: values[start:start + batch] for name, values in layout.items()} for start in range(0, rows, batch)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--examples", type=int, default=512)
  parser.add_argument("--length", type=int, default=256, help="tokens per row (L)")
  parser.add_argument("--batch", type=int, default=16, help="rows per step")
  parser.add_argument("--runs", type=int, default=3)
  args = parser.parse_args()

  tokenizer = synthetic.build_tokenizer()
  tokenizer.model_max_length = args.length  # the demo's rows are short; these are not
  prompts, completions = examples(args.examples)
  layouts = {"one to a row": batching.sft_batch(tokenizer, prompts, completions, args.length),
             "packed": batching.pack_sft(tokenizer, prompts, completions, args.length)}
  cfg = decoder.DecoderConfig(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                              intermediate_size=1024)
  graph, params = decoder.create(cfg, 0)
  loss = supervised.sft_loss_fn(graph)
  step = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b)[0]))
  print(f"jax {jax.__version__} ({jax.default_backend()}); {args.examples} examples, rows of {args.length} tokens, "
        f"{args.batch} rows a step; small shape, fp32")
  for name, layout in layouts.items():
    print(f"  {name}: {len(layout['tokens'])} rows, {layout['mask'].mean():.0%} of their tokens real")
  ratios = []
  for run in range(args.runs):
    rates = {}
    for name, layout in layouts.items():
      todo = batches(layout, args.batch)
      jax.block_until_ready(step(params, todo[0]))  # compiles
      real = sum(int(b["mask"].sum()) for b in todo)
      start = time.perf_counter()
      for b in todo:
        jax.block_until_ready(step(params, b))
      rates[name] = real / (time.perf_counter() - start)
    ratios.append(rates["packed"] / rates["one to a row"])
    print(f"  run {run + 1}: " + ", ".join(f"{n} {r:,.0f} real tok/s" for n, r in rates.items())
          + f"; packed {ratios[-1]:.2f}x")
  print(f"packed against one to a row: {runs.ratio_summary(ratios)}")


if __name__ == "__main__":
  main()
