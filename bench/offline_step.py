"""Offline preference training steps, DPO and KTO: p3o_jax (`rl.algo=dpo` / `kto`) against TRL's
DPOTrainer and KTOTrainer.

    pip install --no-deps -r requirements-bench.txt   # TRL + accelerate; --no-deps keeps the pinned torch
    python bench/offline_step.py --shape all [--algorithms dpo,kto] [--pairs 16] [--steps 6] [--runs 3]

Not run by the tests or CI (TRL is not in requirements-dev.txt).

Both sides train the SAME random GPT-NeoX policy (bench/rl_iteration.py's shapes: transformers
builds it, p3o_jax reads it with `hf.load`) on the same data: `--pairs` pairs a step of a 32-token
prompt and two 32-token responses, random characters of rl_iteration's one-character-per-token
tokenizer, so that text and ids agree. Each response ends in EOS, as TRL appends it (33 response
tokens). AdamW, grad-norm clip 1.0, beta 0.1, fp32 weights and activations (`--precision bf16`:
TRL's bf16=True autocast, ours model.matmul_dtype=bfloat16).

  dpo   sigmoid DPO on `--pairs` pairs a step.
  kto   KTO on the same pairs unpaired (each chosen response desirable, each rejected one
        undesirable: TRL's unpaired format for TRL, `preference.unpair` for ours), 2 x `--pairs`
        responses a step, each with a response to another prompt for the KL reference point,
        which both run forward only (TRL: the completion of the batch's previous row, its
        sequential sampling; ours: the next row's with another prompt).

One step = the policy's log-probs of the step's responses, the loss, the backward and the
optimizer update. The reference's log-probs are computed once before training on both sides
(TRL's precompute_ref_log_probs=True; p3o_jax's preference.py always does), timed apart: ours
after its compile, TRL's with the trainer's set-up (tokenizing the dataset). `--trl-ref-every-step`
adds TRL's default, a reference forward inside every step, as a second TRL row.

What is matched and what is not:
  * TRL runs each (prompt, response) row whole: for DPO every prompt goes through the policy twice
    a step (its concatenated forward of 2B rows). p3o_jax runs each prompt once for both
    responses over its keys and values (docs/design.md): the same log-probs up to float32
    rounding. For KTO both run every row whole.
  * TRL tokenizes its dataset once before training and pads each batch to its longest row (all
    rows have the same length here); p3o_jax tokenizes each batch when it is drawn, as
    preference.py does, inside the timed step (about 1 ms).
  * Torch runs eagerly on every core; ours is one jitted program (`supervised.make_train_step`)
    on one device, under the host-memory setting `python -m p3o_jax.main` makes on a CPU; TRL runs
    in a process of its own with glibc's malloc, as its users run it.

Printed per shape and algorithm: rows per second (pairs for DPO, responses for KTO; median and
best step) of each side, the ratio, the first step (ours compiles), the reference pass, and ours'
model FLOP/s as a share of this machine's matmul ceiling (FLOPs as p3o_jax runs the pass: for DPO
each prompt once, bench/ceiling.py).
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

import datasets  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from p3o_jax import host_memory, preference, sharding, supervised, train_state  # noqa: E402
from p3o_jax.config_base import base_config  # noqa: E402
from p3o_jax.models import hf  # noqa: E402
from p3o_jax.rl import algorithms  # noqa: E402

import ceiling  # noqa: E402
import peer_process  # noqa: E402
import rl_iteration  # noqa: E402
import runs  # noqa: E402

PROMPT = RESPONSE = 32  # characters, one token each; the responses then take EOS
BETA, LR = 0.1, 1e-6


def make_pairs(shape: str, tokenizer, num_pairs: int, seed: int = 0) -> dict:
  """num_pairs random pairs as text: {prompt, chosen, rejected}, each a run of single-token characters."""
  rng = np.random.default_rng(seed)
  vocab = rl_iteration.SHAPES[shape]["vocab_size"]
  text = lambda n: ["".join(chr(rl_iteration.FIRST_CHAR + int(i)) for i in row)
                    for row in rng.integers(1, vocab, (num_pairs, n))]
  pairs = {"prompt": text(PROMPT), "chosen": text(RESPONSE), "rejected": text(RESPONSE)}
  if [len(ids) for ids in tokenizer(pairs["prompt"])["input_ids"]] != [PROMPT] * num_pairs:
    raise AssertionError("the tokenizer does not give one token per character")
  return pairs


# ----------------------------------------------------------------------------- p3o_jax

def bench_ours(policy_dir: str, tokenizer, pairs: dict, algorithm: str, rows_per_step: int, steps: int, warmup: int,
               precision: str) -> dict:
  """p3o_jax's offline steps as preference.py runs them: reference log-probs once, then the
  jitted step on a freshly tokenized batch each time."""
  matmul = {"fp32": "", "bf16": "bfloat16"}[precision]
  _, graph, params = hf.load(policy_dir, matmul_dtype=matmul)
  config = base_config()
  config.rl.algo, config.rl.dpo_beta = algorithm, BETA
  config.data.max_prompt_len, config.sampler.max_new_tokens = PROMPT, RESPONSE + 1
  config.dpo.update(steps=warmup + steps, batch_size=rows_per_step)
  config.dpo.optim.lr = LR
  algo = algorithms.create(config.rl, graph, temperature=1.0)
  data = preference.unpair(pairs) if algo.unpaired else pairs
  make_rows, count = preference.pair_batches(config, tokenizer, data), len(data["prompt"])
  mesh, score = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), jax.jit(algo.sequence_logprobs)
  timed = []
  for _ in range(2):  # the first pass compiles; the second is the pass preference.py runs, timed alone
    start = time.perf_counter()
    reference = preference.reference_logprobs(score, params, make_rows, count, rows_per_step, mesh)
    timed.append(time.perf_counter() - start)
  reference_s, compile_s = timed[1], timed[0] - timed[1]
  tx = train_state.make_optimizer(config.dpo.optim, config.dpo.steps)
  state = train_state.create(jax.tree.map(jnp.copy, params), tx)
  step = supervised.make_train_step(lambda p, b, hp: algo.loss(p, b, hp=hp), config.dpo)
  step_s = []
  for it in range(warmup + steps):
    index = np.arange(it * rows_per_step, (it + 1) * rows_per_step) % count
    start = time.perf_counter()
    rows = make_rows(index) | {"ref_logp": reference[index]}
    state, metrics = step(state, rows, LR, algo.hp)
    loss = float(metrics["loss/total"])
    step_s.append(time.perf_counter() - start)
    if not np.isfinite(loss):
      raise FloatingPointError(f"p3o_jax: non-finite loss at step {it}")
  if int(rows["response_mask"].sum(-1).min()) != RESPONSE + 1:
    raise AssertionError("p3o_jax: a response is not 32 tokens and EOS")
  return dict(**runs.rates(step_s[warmup:], rows_per_step, "rows_s"), first_s=step_s[0], reference_s=reference_s,
              reference_compile_s=compile_s, step_s=statistics.median(step_s[warmup:]))


# ----------------------------------------------------------------------------- TRL

def bench_trl(policy_dir: str, tokenizer, pairs: dict, algorithm: str, rows_per_step: int, steps: int, warmup: int,
              workdir: str, precision: str, reference_every_step: bool) -> dict:
  os.environ["TQDM_DISABLE"] = "1"  # TRL's reference pass and datasets' maps draw progress bars
  datasets.disable_progress_bars()
  import trl  # noqa: PLC0415  (optional: only this function needs it)

  class StepTimes(transformers.TrainerCallback):
    """The time of each optimizer step, and when the first one began."""

    def __init__(self):
      self.begins, self.ends = [], []

    def on_step_begin(self, args, state, control, **kwargs):
      self.begins.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
      self.ends.append(time.perf_counter())

  common = dict(
      output_dir=os.path.join(workdir, f"trl_{algorithm}"), report_to="none", save_strategy="no",
      logging_strategy="no", disable_tqdm=True, use_cpu=True, bf16=precision == "bf16", fp16=False,
      gradient_checkpointing=False, seed=0, data_seed=0, dataloader_num_workers=0, learning_rate=LR, max_grad_norm=1.0,
      weight_decay=0.0, num_train_epochs=1, max_steps=warmup + steps, per_device_train_batch_size=rows_per_step,
      gradient_accumulation_steps=1, beta=BETA, max_length=None, precompute_ref_log_probs=not reference_every_step)
  if algorithm == "dpo":
    trainer_cls, dataset, completions = trl.DPOTrainer, pairs, "chosen_ids"
    args = trl.DPOConfig(**common, loss_type=["sigmoid"])
  else:  # TRL's unpaired format; sequential sampling, which its KL completions need
    examples = preference.unpair(pairs)
    dataset = {"prompt": examples["prompt"], "completion": examples["completion"],
               "label": [bool(label) for label in examples["label"]]}
    trainer_cls, completions = trl.KTOTrainer, "completion_ids"
    args = trl.KTOConfig(**common, loss_type="kto", train_sampling_strategy="sequential")
  timer = StepTimes()
  start = time.perf_counter()  # tokenizing, and the reference pass where it is precomputed
  trainer = trainer_cls(model=policy_dir, args=args, train_dataset=datasets.Dataset.from_dict(dataset),
                        processing_class=tokenizer, callbacks=[timer])
  trainer.remove_callback(transformers.PrinterCallback)
  lengths = {len(row) for row in trainer.train_dataset[completions]}
  if lengths != {RESPONSE + 1}:
    raise AssertionError(f"TRL: responses of {sorted(lengths)} tokens, expected {RESPONSE + 1}")
  trainer.train()
  step_s = [end - begin for begin, end in zip(timer.begins, timer.ends)]
  if len(step_s) != warmup + steps:
    raise AssertionError(f"TRL: timed {len(step_s)} steps, expected {warmup + steps}")
  return dict(**runs.rates(step_s[warmup:], rows_per_step, "rows_s"), first_s=step_s[0],
              reference_s=timer.begins[0] - start, step_s=statistics.median(step_s[warmup:]))


# ----------------------------------------------------------------------------- report

UNITS = {"dpo": "pairs", "kto": "responses"}


def bench(shape: str, algorithm: str, rows_per_step: int, steps: int, warmup: int, precision: str,
          reference_every_step: bool) -> dict:
  with tempfile.TemporaryDirectory() as directory:
    policy_dir, _, tokenizer = rl_iteration.build_models(shape, directory)
    pairs_per_step = rows_per_step if algorithm == "dpo" else rows_per_step // 2
    pairs = make_pairs(shape, tokenizer, pairs_per_step * (warmup + steps))
    trl_run = lambda every: peer_process.run_apart(bench_trl, "default", policy_dir, tokenizer, pairs, algorithm,
                                                   rows_per_step, steps, warmup, directory, precision, every)
    theirs, every_step = trl_run(False), trl_run(True) if reference_every_step else None
    time.sleep(1.0)  # torch's spinning worker threads gone before ours start
    ours = bench_ours(policy_dir, tokenizer, pairs, algorithm, rows_per_step, steps, warmup, precision)
  return dict(ours=ours, theirs=theirs, every_step=every_step)


def ceiling_share(shape: str, algorithm: str, rows_per_step: int, seconds: float, ceilings: dict) -> str:
  """Ours' model FLOP/s: DPO's forward and backward over each prompt once and its two responses;
  KTO's over each row whole, and a forward over the mismatched rows."""
  size = rl_iteration.SHAPES[shape]
  if algorithm == "dpo":
    flops = 3 * ceiling.prompt_once_flops(size, prompts=rows_per_step, rows=2 * rows_per_step, prompt=PROMPT,
                                          new=RESPONSE + 1)
  else:
    flops = 4 * ceiling.prompt_once_flops(size, prompts=rows_per_step, rows=rows_per_step, prompt=PROMPT,
                                          new=RESPONSE + 1)
  achieved = flops / seconds
  return (f"{achieved / 1e9:.1f} GFLOP/s = {achieved / ceilings['float32']:.0%} of fp32 "
          f"({achieved / ceilings['bfloat16']:.0%} of bf16)")


def main():
  memory_note = host_memory.apply()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", choices=[*rl_iteration.SHAPES, "all"], default="all")
  parser.add_argument("--algorithms", default="dpo,kto", help="comma list of dpo, kto")
  parser.add_argument("--pairs", type=int, default=16, help="pairs per step (KTO: twice as many responses)")
  parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
  parser.add_argument("--runs", type=int, default=1, help="whole runs per shape, then the median of their ratios")
  parser.add_argument("--precision", default="fp32", help="comma list of fp32, bf16")
  parser.add_argument("--trl-ref-every-step", action="store_true",
                      help="also time TRL's default: the reference's forward inside every step")
  args = parser.parse_args()
  peer_process.quiet_torch()
  import trl  # noqa: PLC0415
  ceilings = {dtype: ceiling.matmul_ceiling(dtype) for dtype in ("float32", "bfloat16")}
  print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, trl "
        f"{trl.__version__}; {args.pairs} pairs a step, prompt {PROMPT} + responses {RESPONSE} + EOS, median of "
        f"{args.steps} steps after {args.warmup} warm-up; matmul ceiling (XLA, one device): fp32 "
        f"{ceilings['float32'] / 1e9:.0f} GFLOP/s, bf16 {ceilings['bfloat16'] / 1e9:.0f}; p3o_jax: {memory_note}",
        flush=True)
  for shape in rl_iteration.SHAPES if args.shape == "all" else [args.shape]:
    for algorithm in args.algorithms.split(","):
      rows_per_step, unit = args.pairs * (1 if algorithm == "dpo" else 2), UNITS[algorithm]
      trainer = {"dpo": "DPOTrainer", "kto": "KTOTrainer"}[algorithm]
      for precision in args.precision.split(","):
        ratios = []
        for run in range(args.runs):
          r = bench(shape, algorithm, rows_per_step, args.steps, args.warmup, precision, args.trl_ref_every_step)
          ours, theirs = r["ours"], r["theirs"]
          ratios.append(ours["rows_s"] / theirs["rows_s"])
          tag = f"run {run + 1}/{args.runs} " if args.runs > 1 else ""
          print(f"{shape:>6} {algorithm} {precision}: {tag}TRL {trainer} {theirs['rows_s']:7.1f} {unit}/s (best "
                f"{theirs['best']:.1f}) | first step {theirs['first_s']:.2f} s | set-up with the reference pass "
                f"{theirs['reference_s']:.2f} s", flush=True)
          if r["every_step"]:
            every = r["every_step"]
            print(f"        TRL {trainer}, reference in every step: {every['rows_s']:7.1f} {unit}/s "
                  f"(best {every['best']:.1f})", flush=True)
          print(f"        p3o_jax {algorithm.upper()} {ours['rows_s']:7.1f} {unit}/s (best {ours['best']:.1f}) | ratio "
                f"{ratios[-1]:.2f}x (best steps {ours['best'] / theirs['best']:.2f}x) | first step {ours['first_s']:.2f}"
                f" s | reference pass {ours['reference_s']:.2f} s (+ {ours['reference_compile_s']:.1f} s compiling) | "
                f"step {ours['step_s'] * 1e3:.1f} ms, "
                f"{ceiling_share(shape, algorithm, rows_per_step, ours['step_s'], ceilings)}", flush=True)
        if args.runs > 1:
          print(f"{shape:>6} {algorithm} {precision}: p3o_jax against TRL's {trainer}: {runs.ratio_summary(ratios)}",
                flush=True)


if __name__ == "__main__":
  main()
