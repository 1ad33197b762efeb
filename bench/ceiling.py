"""This machine's matmul ceiling and memory read bandwidth, and the model FLOPs (and a decode
step's bytes) of each RL phase, so a benchmark can say how far a phase is from the hardware limit
and not only from the peer.

    ceiling = matmul_ceiling("float32")          # FLOP/s of XLA's best square matmul here
    flops = phase_flops(shape, rows=32, prompts=16, prompt=32, new=32)
    share = flops["update"] / seconds / ceiling
    bandwidth = read_bandwidth()                 # bytes/s XLA reads from memory (not cache) here
    share = decode_bytes(shape, 4, rows=16, prompt=32, new=64) / seconds / bandwidth

Decoding a large model is bound by reading its weights from memory once per step, not by its
matmuls: its ceiling is the read bandwidth. That is measured the same way, as the rate of a
jitted sum over an array far larger than the caches (256 MB; all cores, one device).

The ceiling is measured, not read off a datasheet: XLA:CPU's jitted square matmul (all cores,
one device) at the size that runs fastest, best of several runs; bf16 inputs are summed in fp32,
which XLA:CPU runs on the CPU's bf16 matrix units where it has them (AMX, AVX512-BF16). Model FLOPs count the matmuls
only (2 per multiply-add), as MFU does: the weight matmuls of every token that passes a layer
(2 N per token forward, 4 N more backward, N = weights touched per token) plus attention's score
and value products (4 d per layer per (query, key) pair), no recomputation, no softmax or norms.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_ceiling(dtype: str = "float32", sizes=(256, 512, 1024, 2048), seconds: float = 0.4) -> float:
  """Best FLOP/s of a jitted [n, n] @ [n, n] with `dtype` inputs summed in float32 (the way the
  decoder multiplies: models/decoder.py weight_matmul) on the default device, over `sizes`."""
  best = 0.0
  for n in sizes:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    reps = max(2, int(seconds * 50e9 / (2 * n ** 3)))  # about `seconds` at 50 GFLOP/s
    for _ in range(3):
      start = time.perf_counter()
      for _ in range(reps):
        out = f(a, a)
      out.block_until_ready()
      best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
  return best


def read_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
  """Best bytes/s of a jitted float32 sum over a `megabytes` array on the default device: how
  fast XLA streams memory that no cache holds (256 MB is several times any CPU's last level)."""
  x = jnp.ones((megabytes << 18,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return x.nbytes / best


def weights_per_token(shape: dict, lm_head: bool = True) -> int:
  """Weights one token multiplies through (HF NeoX-style shape keys): attention, MLP, head."""
  d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
  return layers * (4 * d * d + 2 * d * f) + (d * shape["vocab_size"] if lm_head else d)


def forward_flops(shape: dict, rows: int, tokens: int, lm_head: bool = True) -> float:
  """A causal forward over rows x tokens: weight matmuls + attention (tokens^2 / 2 pairs)."""
  attention = 4 * shape["hidden_size"] * shape["num_hidden_layers"] * tokens * (tokens + 1) / 2
  return rows * (2 * weights_per_token(shape, lm_head) * tokens + attention)


def decode_flops(shape: dict, prompts: int, rows: int, prompt: int, new: int) -> float:
  """Prefill each prompt once, its last block's queries, MLP and head at the last position
  alone (its logits give token 0; the other positions give keys and values), then one forward
  per further token of each row, the token fed at step t attending to prompt + t keys."""
  d, layers = shape["hidden_size"], shape["num_hidden_layers"]
  prefill = _read_at_flops(shape, tokens=prompts * prompt, read=prompts, pairs=prompts * prompt * (prompt + 1) / 2,
                           read_pairs=prompts * prompt, head=shape["vocab_size"])
  context = sum(prompt + t for t in range(1, new))
  return prefill + rows * (2 * weights_per_token(shape) * (new - 1) + 4 * d * layers * context)


def _read_at_flops(shape: dict, *, tokens: int, read: int, pairs: float, read_pairs: float, head: int) -> float:
  """A pass of `tokens` tokens whose output is read at `read` of them (`Decoder.__call__`'s
  outputs_at): every block but the last on all tokens (`pairs` causal (query, key) pairs each),
  the last block's keys and values on all and the rest of it on the read ones (`read_pairs`
  pairs), and a head of `head` outputs there."""
  d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
  block = 4 * d * d + 2 * d * f
  weights = block * ((layers - 1) * tokens + read) + 2 * d * d * tokens + d * head * read
  return 2 * weights + 4 * d * ((layers - 1) * pairs + read_pairs)


def decode_bytes(shape: dict, weight_bytes: int, *, rows: int, prompt: int, new: int,
                 cache_bytes: int = 4) -> float:
  """Bytes the decode steps after the prefill must read: every weight a token multiplies through
  (`weights_per_token`, in `weight_bytes` each) once per step, and the keys and values of the
  context so far (prompt + t slots at step t, d each per layer, in `cache_bytes` each) for each
  of the `rows`."""
  d, layers = shape["hidden_size"], shape["num_hidden_layers"]
  context = sum(prompt + t for t in range(1, new))
  return weight_bytes * weights_per_token(shape) * (new - 1) + cache_bytes * 2 * layers * d * rows * context


def prompt_once_flops(shape: dict, *, prompts: int, rows: int, prompt: int, new: int, head: str = "lm") -> float:
  """A teacher-forced pass with each prompt run once for its rows' responses (rl/sequences.py).

  head='lm' (log-probs): the prompt's first prompt - 1 tokens through the blocks, but in the last
  block only their keys and values (nothing reads that block's output there); then per row the
  `new` tokens that predict a response token (the prompt's last and the response's first new - 1),
  each attending to the prompt and the response before it, and the LM head on them.
  head='scalar' (reward models): the whole prompt through every block, the `new` response tokens
  after it; in the last block only keys and values, but for the prompt's last token and each
  row's last (`Decoder.__call__`'s outputs_at), which alone go on to the scalar head."""
  if head == "scalar":
    return _read_at_flops(shape, tokens=prompts * prompt + rows * new, read=prompts + rows,
                          pairs=prompts * prompt * (prompt + 1) / 2 + rows * sum(prompt + t for t in range(1, new + 1)),
                          read_pairs=prompts * prompt + rows * (prompt + new), head=1)
  d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
  block = 4 * d * d + 2 * d * f
  prefix = prompts * (prompt - 1)
  weights = block * ((layers - 1) * prefix + layers * rows * new) + 2 * d * d * prefix + rows * new * d * shape["vocab_size"]
  pairs = (layers - 1) * prompts * (prompt - 1) * prompt / 2 + layers * rows * sum(prompt - 1 + t for t in range(1, new + 1))
  return 2 * weights + 4 * d * pairs


def phase_flops(shape: dict, *, rows: int, prompts: int, prompt: int, new: int,
                old_pass: bool = True) -> dict[str, float]:
  """Model FLOPs of one RL iteration's phases as p3o_jax runs them: sample; score (the old
  policy's forward unless skipped, the reference's and the reward model's); update (one forward
  + backward of the policy); the passes run each prompt once (`prompt_once_flops`)."""
  forward = prompt_once_flops(shape, prompts=prompts, rows=rows, prompt=prompt, new=new)
  reward = prompt_once_flops(shape, prompts=prompts, rows=rows, prompt=prompt, new=new, head="scalar")
  return {"sample": decode_flops(shape, prompts, rows, prompt, new),
          "score": (1 + old_pass) * forward + reward,
          "update": 3 * forward}
