"""One training step with LoRA adapters against training every weight: p3o_jax against torch + peft.

    python bench/lora_step.py --shape all [--rank 16] [--rows 32] [--steps 10]

Not run by the tests or CI (peft is in requirements-dev.txt for the adapter export's test).

The same random GPT-NeoX policy as bench/rl_iteration.py (transformers builds it, p3o_jax reads it
with `hf.load`), the same batch: `--rows` rows of 64 tokens, the rows an RL update trains on at
`--prompts 16` (32 prompt + 32 response tokens, K=2). One step = the mean token log-likelihood's
forward and backward, a global-norm clip at 1.0 and AdamW: what a policy-gradient update costs,
without the algorithm's arithmetic. Four trainers, timed in interleaved rounds after 2 warm-up
steps each, medians reported:

  ours full        every weight trained (train_state.make_step, optax AdamW), fp32
  ours LoRA        rank r, alpha 2r on q, k, v, o, up and down (`models/lora.py`): the loss reads
                   each kernel as x W + (x A) s B, W frozen (no gradient of it is formed)
  torch full       transformers' model, torch.optim.AdamW over every weight, eager
  torch + peft     peft's LoRA, rank r, alpha 2r on query_key_value, dense, dense_h_to_4h and
                   dense_4h_to_h (peft puts one rank-r adapter on the fused q|k|v matrix, p3o_jax
                   one on each of q, k and v: its trainable count is printed beside)

Printed: rows of tokens per second per trainer, each side's LoRA against its full step, and
ours against torch's for each. Timings on a shared machine move by 15-30% from run to run; the
four are interleaved so that they share it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_flag  # noqa: E402,F401  (before jax)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from p3o_jax import host_memory, train_state  # noqa: E402
from p3o_jax.config_base import base_config  # noqa: E402
from p3o_jax.models import decoder, hf, lora  # noqa: E402

import rl_iteration  # noqa: E402

TOKENS = rl_iteration.PROMPT + rl_iteration.NEW
OURS_TARGETS = "q,k,v,o,up,down"
PEFT_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def ours(policy_dir: str, tokens: np.ndarray, rank: int):
  """(step function, trainable count) of p3o_jax's step: full (rank 0) or LoRA."""
  cfg, graph, params = hf.load(policy_dir)
  if rank:
    params, _ = lora.attach(params, decoder.logical_axes(graph), rank=rank, alpha=2.0 * rank,
                            targets=lora.parse_targets(OURS_TARGETS))
  optim = base_config().optim
  optim.lr = rl_iteration.LR
  tx = train_state.make_optimizer(optim, 10_000)
  batch = jnp.asarray(tokens)
  mask = jnp.ones_like(batch)

  def loss_fn(p, rows):
    return -decoder.token_logprobs(graph, p, rows, mask).mean(), {}  # the step reads adapters as lora.adapted

  step = jax.jit(train_state.make_step(loss_fn, tx), donate_argnums=0)
  state = [train_state.create(params, tx)]

  def run():
    state[0], metrics = step(state[0], batch)
    jax.block_until_ready(metrics["loss/total"])
  return run, lora.count(lora.trainable(params))


def theirs(policy_dir: str, tokens: np.ndarray, rank: int):
  """(step function, trainable count) of transformers' model: full (rank 0) or peft's LoRA."""
  model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
  if rank:
    import peft  # noqa: PLC0415
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                        target_modules=PEFT_TARGETS))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=rl_iteration.LR, betas=(0.9, 0.95), weight_decay=1e-6)
  batch = torch.as_tensor(tokens, dtype=torch.long)

  def run():
    logits = model(batch).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  return run, sum(p.numel() for p in trainable)


def bench_shape(shape: str, rank: int, rows: int, steps: int) -> dict:
  with tempfile.TemporaryDirectory() as directory:
    policy_dir, _, _ = rl_iteration.build_models(shape, directory)
    vocab = rl_iteration.SHAPES[shape]["vocab_size"]
    tokens = np.random.default_rng(0).integers(1, vocab, size=(rows, TOKENS)).astype(np.int32)
    trainers = {"ours full": ours(policy_dir, tokens, 0), "ours LoRA": ours(policy_dir, tokens, rank),
                "torch full": theirs(policy_dir, tokens, 0), "torch + peft": theirs(policy_dir, tokens, rank)}
    for run, _ in trainers.values():
      for _ in range(2):
        run()
    seconds = {name: [] for name in trainers}
    for _ in range(steps):
      for name, (run, _) in trainers.items():
        start = time.perf_counter()
        run()
        seconds[name].append(time.perf_counter() - start)
  return {name: dict(ms=1e3 * statistics.median(s), tok_s=rows * TOKENS / statistics.median(s),
                     trainable=trainers[name][1]) for name, s in seconds.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="all", choices=["all", *rl_iteration.SHAPES])
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--devices", type=int, default=1, help="host devices (host_flag); one is used")
  args = parser.parse_args()
  memory_note = host_memory.apply()  # as p3o_jax.main does on a CPU
  torch.set_num_threads(os.cpu_count())
  print(f"# LoRA rank {args.rank}: {args.rows} rows of {TOKENS} tokens, fp32, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; {memory_note}")
  for shape in (rl_iteration.SHAPES if args.shape == "all" else [args.shape]):
    result = bench_shape(shape, args.rank, args.rows, args.steps)
    print(f"\n{shape}: {rl_iteration.SHAPES[shape]}")
    print(f"| trainer | step ms | tok/s | trainable params |\n|---|---|---|---|")
    for name, r in result.items():
      print(f"| {name} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {r['trainable']:,} |")
    ms = {name: r["ms"] for name, r in result.items()}
    print(f"LoRA against full: ours {ms['ours full'] / ms['ours LoRA']:.2f}x, "
          f"torch + peft {ms['torch full'] / ms['torch + peft']:.2f}x")
    print(f"ours against torch: full {ms['torch full'] / ms['ours full']:.2f}x, "
          f"LoRA {ms['torch + peft'] / ms['ours LoRA']:.2f}x")


if __name__ == "__main__":
  main()
