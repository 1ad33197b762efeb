"""What computing each prompt once per group saves in the teacher-forced passes and in
reward-model training.

    python bench/prompt_once.py [--prompt 512] [--response 64] [--k 2,4] [--groups 4] [--layers 4] [--width 256]

Every pass over (prompt, response) rows of an RL iteration (reference, old policy, reward model,
the update's forward and backward) can run a group's shared prompt once and its K responses
over the prompt's keys and values, kept once (`decoder.prefixed_forward`, used by rl/sequences.py
whenever the query comes once per group), instead of running the whole concatenated row K
times, as TRL, OpenRLHF and verl's default path do. This times both on the same random
Pythia-style decoder (fp32, one device), at a TL;DR-like shape by default (prompt 512, response
64), forward alone and forward + backward of the per-token log-probs, and prints the speed-up
beside the ratio of model FLOPs (bench/ceiling.py) and the largest difference between the two
results (float32 rounding only). The measured speed-up exceeds the FLOP ratio: attention
multiplies every (query, key) pair and masks the causal half, which the FLOP count leaves out,
and a whole row longer than 512 tokens runs its attention in blocks of 512 queries, recomputed
in the backward pass (decoder.attend). Never run by the tests or CI.

Measured on a 2-core AMD EPYC (Zen 4) VM, defaults (4 layers, d=256, vocab 8192, 4 prompts of
512, responses of 64): K=2 forward 560 -> 165 ms (3.40x), forward + backward 1884 -> 563 ms
(3.34x), 2.00x fewer FLOPs; K=4 forward 1190 -> 220 ms (5.41x), forward + backward 3887 -> 811 ms
(4.79x), 2.94x fewer FLOPs; log-probs within 1e-6. Reward-model training on 4 pairs at that shape
(the Bradley-Terry loss's forward + backward): 1815 -> 789 ms (2.30x; another run 1714 -> 700 ms,
2.45x), the same loss within 1e-7. (Before the prompt's last token moved to the
responses, which lets XLA leave out the prompt's last block: K=2 forward + backward 755 ms, K=4
899 ms.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from p3o_jax import losses, supervised  # noqa: E402
from p3o_jax.models import decoder  # noqa: E402
from p3o_jax.rl import sequences  # noqa: E402

import ceiling  # noqa: E402


def median_ms(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt", type=int, default=512)
  parser.add_argument("--response", type=int, default=64)
  parser.add_argument("--k", default="2,4", help="responses per prompt, comma list")
  parser.add_argument("--groups", type=int, default=4, help="prompts per batch")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=8192)
  args = parser.parse_args()
  shape = dict(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
               num_attention_heads=max(1, args.width // 64), intermediate_size=4 * args.width)
  cfg = decoder.DecoderConfig(vocab_size=args.vocab, hidden_size=args.width, num_layers=args.layers,
                              num_heads=shape["num_attention_heads"], parallel_residual=True, rotary_pct=0.25,
                              activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, model_type="gpt_neox")
  graph, params = decoder.create(cfg)
  print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; jax {jax.__version__} "
        f"({jax.default_backend()}); {args.layers} layers, d={args.width}, vocab {args.vocab}; "
        f"{args.groups} prompts of {args.prompt} tokens, responses of {args.response}; fp32, median of 5", flush=True)
  rng = np.random.default_rng(0)
  logprobs = lambda p, *rows: sequences.response_logprobs(graph, p, *rows)
  passes = {"forward": jax.jit(logprobs),
            "forward + backward": jax.jit(jax.grad(lambda p, *rows: logprobs(p, *rows).sum()))}
  for k in (int(x) for x in args.k.split(",")):
    G, N = args.groups, args.groups * k
    query = jnp.asarray(rng.integers(1, args.vocab, (G, args.prompt)), jnp.int32)
    response = jnp.asarray(rng.integers(1, args.vocab, (N, args.response)), jnp.int32)
    masks = jnp.ones_like(query), jnp.ones_like(response)
    once = (query, masks[0], response, masks[1])
    per_row = (jnp.repeat(query, k, 0), jnp.repeat(masks[0], k, 0), response, masks[1])
    # Every row whole: prompt + response - 1 tokens through every block (forward_flops without a
    # head counts a scalar head at each token: taken off), the LM head on `response` of them.
    length = args.prompt + args.response - 1
    whole = (ceiling.forward_flops(shape, N, length, lm_head=False) - 2 * N * length * args.width
             + 2 * N * args.response * args.width * args.vocab)
    shared = ceiling.prompt_once_flops(shape, prompts=G, rows=N, prompt=args.prompt, new=args.response)
    gap = float(jnp.abs(passes["forward"](params, *once) - passes["forward"](params, *per_row)).max())
    for name, fn in passes.items():
      rows_ms, once_ms = median_ms(fn, params, *per_row), median_ms(fn, params, *once)
      print(f"K={k} {name:>18}: every row whole {rows_ms:8.1f} ms | prompt once {once_ms:8.1f} ms | "
            f"{rows_ms / once_ms:4.2f}x faster (model FLOPs {whole / shared:4.2f}x fewer; largest log-prob "
            f"difference {gap:.1e})", flush=True)

  # Reward-model training: a preference pair's two rows whole (each its own prompt pass) against
  # supervised.reward_loss_fn (the prompt once, both responses after it), forward + backward.
  rm_graph, rm_params = decoder.create(cfg.replace(lm_head=False, scalar_head=True))
  G = args.groups
  query = jnp.asarray(rng.integers(1, args.vocab, (G, args.prompt)), jnp.int32)
  response = jnp.asarray(rng.integers(1, args.vocab, (G, 2, args.response)), jnp.int32)
  pairs = dict(query=query, query_mask=jnp.ones_like(query), response=response, response_mask=jnp.ones_like(response))
  row = lambda i: (jnp.concatenate([query, response[:, i]], 1), jnp.ones((G, args.prompt + args.response), jnp.int32))

  def whole_rows(p):
    chosen, rejected = (sequences.sequence_scores(rm_graph, p, *row(i)) for i in (0, 1))
    return losses.bradley_terry(chosen, rejected)[0]
  once = lambda p: supervised.reward_loss_fn(rm_graph)(p, pairs)[0]
  grads = {name: jax.jit(jax.value_and_grad(fn)) for name, fn in (("whole", whole_rows), ("once", once))}
  gap = abs(float(grads["whole"](rm_params)[0]) - float(grads["once"](rm_params)[0]))
  rows_ms, once_ms = (median_ms(grads[name], rm_params) for name in ("whole", "once"))
  print(f"reward model, {G} pairs, forward + backward: every row whole {rows_ms:8.1f} ms | prompt once {once_ms:8.1f} ms | "
        f"{rows_ms / once_ms:4.2f}x faster (loss difference {gap:.1e})", flush=True)


if __name__ == "__main__":
  main()
