"""Response tokens per second of whole RL iterations: p3o_jax P3O (K=2) against TRL's RLOOTrainer.

    pip install --no-deps -r requirements-bench.txt   # TRL + accelerate; --no-deps keeps the pinned torch
    python bench/rl_iteration.py --shape all [--prompts 16] [--steps 4] [--warmup 2] [--old-pass] [--runs 5]

Not part of `make bench` (TRL is not in requirements-dev.txt) and never run by the tests or CI.

One process, CPU, the SAME tiny random GPT-NeoX policy and GPT-NeoX reward model on both sides
(transformers builds them and saves them to a temp dir; p3o_jax reads them with `hf.load`, the
reward model with head='score'), the same prompts, the same data shapes. Each side is warmed up
(JAX compiles, torch allocates optimizer state), then `--steps` iterations are timed one after the
other; the median iteration is reported, and the best, which is less sensitive to other load on
the machine (measure on an idle one).

What one iteration is, on both sides (each of these is done exactly once per iteration):
  sample K=2 responses to each of P prompts (prompt 32 tokens, 32 new tokens, multinomial at
  temperature 1, no top-k / top-p, min_new_tokens = max_new_tokens so every row has exactly 32
  response tokens and no EOS), KV cache on;
  teacher-forced log-probs of the responses under the frozen reference (a second copy of the
  initial policy) and, on TRL's side and ours with --old-pass, under the sampling policy (below);
  reward model score of every (prompt, response);
  the algorithm's advantage / pair computation on the host;
  one optimizer update on all P*K rows: one epoch, one minibatch, AdamW, grad-norm clip 1.0,
  fp32 weights and activations, no gradient checkpointing.
Response tokens per second = P * K * 32 / seconds per iteration (TRL's minimum completion length is
checked, so both sides count the same tokens).

What is matched and what is not:
  * The algorithms differ: p3o_jax runs P3O V2 (pairwise, sequence-level clipped ratio, KL to the
    reference in the loss), TRL runs RLOO (leave-one-out baseline, sequence-level clipped ratio, KL
    folded into the reward). With K=2 both compare the two responses to a prompt, and both cost
    one policy forward+backward over the same rows; the loss arithmetic is negligible next to it.
    TRL's RLOO is TRL's closest trainer to P3O with K=2 (its PPO trainer needs a value model).
  * The sampling policy's own teacher-forced pass: TRL's RLOO runs it (it folds the KL into the
    reward, so it needs pi_old's log-probs before the update). p3o_jax leaves it out with one
    epoch of one minibatch, as rl/loop.py does (Algorithm.skips_old_pass: the update's own
    forward runs at pi_old's parameters, so its detached log-probs are pi_old's); --old-pass
    runs it anyway, for the like-for-like count of forwards.
  * Each prompt's share of a teacher-forced pass: TRL runs every (prompt, response) row whole, so
    each prompt's 32 tokens pass through every model K times in every pass; p3o_jax runs each
    prompt once per pass and its K responses over its keys and values, kept once (the reference,
    reward model and update forward + backward alike; docs/design.md), the same numbers up to
    float32 rounding. Same results, less work: it is part of how each trainer works.
  * TRL also computes the per-token entropy in its loss forward (a logsumexp-sized extra over the
    vocabulary), and logs more metrics (each a host sync); p3o_jax computes P3O's own metrics.
  * TRL turns token ids into text and back: prompts are text in a dataset, tokenized every step,
    completions are decoded and the reward model re-tokenizes prompt + completion text. Here a
    one-character-per-token tokenizer (vocab = 512 distinct characters, id 0 = EOS = pad) makes the
    round trip exact, so the reward model sees the same 64 tokens as in p3o_jax; the cost of the
    round trip is part of TRL's iteration (it is part of how TRL works). p3o_jax stays on ids.
  * TRL's defaults that would change the work are overridden: bf16 off, gradient checkpointing
    off, one generation per step (steps_per_generation 1, num_iterations 1), logging and saving
    off. TRL uses torch's fused AdamW with a linear decay; p3o_jax optax AdamW with a constant
    schedule, and reward clipping + running-std scaling as its RL loop does: no cost that matters.
  * Torch runs eagerly with as many threads as cores; JAX runs jitted (sampler; log-probs and
    reward model in one program; the whole update as one program) with its default matmul
    precision. The p3o_jax update donates the train state. Ours runs on one trainer device (its
    sampler, as the default sampler.cpu_devices=auto has it, on one device per core), then all
    of it on a data-parallel mesh of --devices host devices (default one per core); TRL on one.
    JAX pays its compiles in the first iterations (printed as "first iteration"), which the
    medians exclude.
  * Host memory: ours runs with the setting `python -m p3o_jax.main` makes on a CPU
    (mesh.cpu_reuse_memory, p3o_jax/host_memory.py: freed blocks kept for reuse instead of
    page-faulted in again at every call, and one-device calls run on the calling thread so that
    blocks above 64 MB come from that kept memory too). TRL runs in a fresh process of its own,
    once with glibc's malloc as TRL users run it (the ratio) and once with the same malloc setting
    (printed beside it: TRL's allocations gain from it too; torch runs its ops on the calling
    thread already).
  * --precision bf16: TRL's bf16=True (torch autocast); ours model.matmul_dtype=bfloat16 (bf16
    inputs, fp32 sums, forward and backward; fp32 weights, optimizer state and activations).
  * "rollout share": the fraction of an iteration spent before the update: p3o_jax's Roller, TRL's
    _generate_and_score_completions (the same work, plus the text round trip and the advantages);
    the rest is the loss forward + backward + optimizer step (+ p3o_jax's host reward processing,
    + TRL's Trainer bookkeeping).
  * Random draws differ (different RNGs), so the two policies sample different tokens; with
    min_new_tokens = max_new_tokens the shapes, and so the work, are the same.

`--runs N` repeats the whole comparison N times (TRL's processes and ours each time) and then
prints the median of the runs' ratios, as the targets are stated (bench/runs.py).

Shapes: tiny (2 layers, d=128, 4 heads, MLP 512, vocab 512) and small (4 layers, d=256, 4 heads,
MLP 1024, vocab 512); the reward model has the policy's shape with a 1-output score head.

README's Benchmarks section has the table this prints, measured with `--runs 5` on a 2-core AMD
EPYC (Zen 4), and the medians over every day's runs; docs/speed.md has what moves each phase.
The first line printed names the library versions and the machine's load and matmul ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_flag  # noqa: E402,F401  (before jax: --devices -> XLA_FLAGS)

import datasets  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from p3o_jax import host_memory, sampling, sharding, train_state  # noqa: E402
from p3o_jax.config_base import base_config  # noqa: E402
from p3o_jax.models import decoder, hf  # noqa: E402
from p3o_jax.rl import algorithms  # noqa: E402
from p3o_jax.rl.rollout import ModelReward, RunningMoments, make_roller, process_scores  # noqa: E402
from p3o_jax.rl.update import for_run  # noqa: E402

import ceiling  # noqa: E402
import peer_process  # noqa: E402
import runs  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=512),
    "small": dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024),
}
K, PROMPT, NEW = 2, 32, 32
EOS_ID = PAD_ID = 0  # never sampled: min_new_tokens = max_new_tokens suppresses EOS
LR = 1e-6
FIRST_CHAR = 0x4E00  # token id i <-> chr(FIRST_CHAR + i): one printable non-space character each


def build_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  """One character per token, so ids -> text -> ids is exact and texts concatenate as ids do."""
  vocab = {"<|endoftext|>": EOS_ID, **{chr(FIRST_CHAR + i): i for i in range(1, vocab_size)}}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.Fuse()  # no spaces between tokens
  tok.add_special_tokens(["<|endoftext|>"])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>", padding_side="left")


def build_models(shape: str, directory: str) -> tuple[str, str, transformers.PreTrainedTokenizerFast]:
  """Random policy and reward model saved under directory; returns their paths and the tokenizer."""
  config = dict(**SHAPES[shape], rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu",
                max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=PAD_ID,
                bos_token_id=EOS_ID, eos_token_id=EOS_ID)
  tokenizer = build_tokenizer(SHAPES[shape]["vocab_size"])
  paths = []
  for name, cls, extra in (("policy", transformers.GPTNeoXForCausalLM, {}),
                           ("rm", transformers.GPTNeoXForSequenceClassification, dict(num_labels=1))):
    torch.manual_seed(len(paths))
    path = os.path.join(directory, name)
    cls(transformers.GPTNeoXConfig(**config, **extra)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    paths.append(path)
  return paths[0], paths[1], tokenizer


# ----------------------------------------------------------------------------- p3o_jax

def bench_ours(policy_dir: str, rm_dir: str, tokenizer, prompts: np.ndarray, steps: int, warmup: int,
               devices: int = 1, precision: str = "fp32", old_pass: bool = False) -> dict:
  """p3o_jax's iterations on a data-parallel mesh of `devices` host devices (1: one device), as
  rl/loop.py runs them: params replicated, the rollout's prompts and the update's groups split.
  precision 'bf16': every weight matmul (sampler, scoring, update) reads bf16 inputs summed in
  fp32 (model.matmul_dtype); weights, optimizer state and activations stay fp32."""
  matmul = {"fp32": "", "bf16": "bfloat16"}[precision]
  cfg, graph, params = hf.load(policy_dir, matmul_dtype=matmul)
  _, rm_graph, rm_params = hf.load(rm_dir, head="score", matmul_dtype=matmul)
  config = base_config()
  config.model.matmul_dtype = matmul
  config.sampler.update(max_new_tokens=NEW, min_new_tokens=NEW, temperature=1.0, top_k=0, top_p=1.0)
  config.rl.update(k=K, inner_epochs=1, num_minibatches=1)
  config.optim.lr = LR
  tx = train_state.make_optimizer(config.optim, warmup + steps)
  mesh = sharding.make_mesh(devices, 1, 1, devices=jax.devices()[:devices])
  on_mesh = lambda tree: jax.device_put(tree, sharding.replicated(mesh))
  ref_params = on_mesh(jax.tree.map(jnp.copy, params))  # the update donates the train state's buffers
  roller = make_roller(config, graph, ref_params, ModelReward(rm_graph, on_mesh(rm_params)), tokenizer,
                       penalise_missing_eos=False, mesh=mesh)
  algo = algorithms.create(config.rl, graph, config.sampler.temperature)
  state, shardings = train_state.create_on_mesh(params, tx, decoder.logical_axes(graph), mesh)
  update, hyper = for_run(algo, config.optim, warmup + steps, epochs=1, num_minibatches=1, state_shardings=shardings)
  split = sharding.RowSplit(len(prompts), mesh)
  old_pass = old_pass or not algo.skips_old_pass(config.rl)  # one epoch, one minibatch: skipped, as in rl/loop.py
  mask = np.ones_like(prompts)
  key, moments = jax.random.key(0), RunningMoments()
  rollout_s, total_s = [], []
  for it in range(warmup + steps):
    rollout_key, update_key = jax.random.split(jax.random.fold_in(key, it))
    start = time.perf_counter()
    exp = roller(state.params, prompts, mask, rollout_key, K, split=split, old_pass=old_pass)  # synchronised
    rolled = time.perf_counter()
    rewards = process_scores(exp.scores, clip=config.rl.reward_clip, moments=moments)
    state, metrics = update(state, split.to_global(algo.prepare(exp, rewards, config.rl.beta)[0]), update_key, hyper)
    loss = float(np.asarray(jax.device_get(metrics["loss/total"])).reshape(-1)[0])
    end = time.perf_counter()
    if not np.isfinite(loss):
      raise FloatingPointError(f"p3o_jax: non-finite loss at iteration {it}")
    if int(exp.response_mask.sum(-1).min()) != NEW:
      raise AssertionError("p3o_jax: a response ended before max_new_tokens")
    rollout_s.append(rolled - start)
    total_s.append(end - start)
  # The sampler alone, as the Roller calls it (on its own devices when it samples apart), to
  # split the rollout into sampling and scoring.
  sample_mesh = roller.sample_mesh
  placed = sharding.RowSplit(len(prompts), sample_mesh).to_global({"q": prompts, "m": mask})
  sample_s = []
  for it in range(steps + 1):
    start = time.perf_counter()
    params = state.params if sample_mesh is mesh else sharding.replicate_onto(state.params, sample_mesh)
    out = sampling.generate(roller.sampler_graph, params, placed["q"], placed["m"], jax.random.key(it),
                            max_new_tokens=NEW, num_samples=K, min_new_tokens=NEW, eos_id=EOS_ID, pad_id=PAD_ID,
                            mesh=sample_mesh)
    jax.block_until_ready(out.tokens)
    sample_s.append(time.perf_counter() - start)
  rollout_s, first_s, total_s = rollout_s[warmup:], total_s[0], total_s[warmup:]
  rollout, total, sample = (statistics.median(x) for x in (rollout_s, total_s, sample_s[1:]))
  phases = {"sample": sample, "score": max(rollout - sample, 1e-9), "update": total - rollout}
  return dict(**runs.rates(total_s, len(prompts) * K * NEW, "tok_s"), first_s=first_s,
              rollout_share=rollout / total, phases=phases, devices=devices, precision=precision,
              rows=len(prompts) * K, prompts=len(prompts), old_pass=exp.logp_old is not None)  # the Roller keeps it where it must


# ----------------------------------------------------------------------------- TRL

def bench_trl(policy_dir: str, rm_dir: str, tokenizer, prompts: np.ndarray, steps: int, warmup: int,
              workdir: str, precision: str = "fp32") -> dict:
  import trl  # noqa: PLC0415  (optional: only this function needs it)

  class StepTimes(transformers.TrainerCallback):
    """Wall time between consecutive optimizer steps: sampling, scoring, loss, backward, update."""

    def __init__(self):
      self.marks, self.logs = [], {}

    def on_step_begin(self, args, state, control, **kwargs):
      if not self.marks:
        self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
      self.marks.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
      self.logs.update(logs or {})

  P = len(prompts)
  texts = tokenizer.batch_decode(prompts.tolist())
  if [len(t) for t in texts] != [PROMPT] * P or tokenizer(texts)["input_ids"] != prompts.tolist():
    raise AssertionError("tokenizer round trip is not exact")
  # Enough distinct prompts for every step; the sampler shuffles them, so each step sees P of them
  # (the shapes, not which prompts, decide the cost).
  dataset = datasets.Dataset.from_dict({"prompt": texts * (warmup + steps)})
  args = trl.RLOOConfig(
      output_dir=os.path.join(workdir, "trl"), report_to="none", save_strategy="no",
      logging_strategy="no", disable_tqdm=True, use_cpu=True, bf16=precision == "bf16", fp16=False,
      gradient_checkpointing=False, seed=0, data_seed=0, dataloader_num_workers=0,
      learning_rate=LR, max_grad_norm=1.0, weight_decay=0.0, num_train_epochs=1, max_steps=warmup + steps,
      per_device_train_batch_size=P * K, gradient_accumulation_steps=1, steps_per_generation=1,
      num_generations=K, num_iterations=1, max_completion_length=NEW, temperature=1.0, top_k=0, top_p=1.0,
      generation_kwargs=dict(min_new_tokens=NEW), beta=0.05)
  timer = StepTimes()
  trainer = trl.RLOOTrainer(model=policy_dir, reward_funcs=rm_dir, args=args, train_dataset=dataset,
                            processing_class=tokenizer, reward_processing_classes=tokenizer, callbacks=[timer])
  trainer.remove_callback(transformers.PrinterCallback)  # it prints the final metrics dict
  rollout_s, generate_and_score = [], trainer._generate_and_score_completions

  def timed_rollout(inputs):  # sampling, old and reference log-probs, rewards, advantages
    start = time.perf_counter()
    out = generate_and_score(inputs)
    rollout_s.append(time.perf_counter() - start)
    return out

  trainer._generate_and_score_completions = timed_rollout
  trainer.train()
  # The final log averages each step's minimum length: NEW only if every completion had NEW tokens.
  min_length = float(timer.logs["completions/min_length"])
  if min_length != NEW:
    raise AssertionError(f"TRL: completions as short as {min_length} tokens on average, expected {NEW}")
  all_s = np.diff(timer.marks).tolist()
  if len(all_s) != warmup + steps or len(rollout_s) != warmup + steps:
    raise AssertionError(f"TRL: timed {len(all_s)} steps and {len(rollout_s)} rollouts, expected {warmup + steps}")
  return dict(**runs.rates(all_s[warmup:], P * K * NEW, "tok_s"), first_s=all_s[0],
              rollout_share=statistics.median(rollout_s[warmup:]) / statistics.median(all_s[warmup:]))


def bench(shape: str, num_prompts: int, steps: int, warmup: int, device_counts, precision: str,
          old_pass: bool = False) -> dict:
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, SHAPES[shape]["vocab_size"], (num_prompts, PROMPT)).astype(np.int32)
  with tempfile.TemporaryDirectory() as directory:
    policy_dir, rm_dir, tokenizer = build_models(shape, directory)
    # TRL in a process of its own, as its users run it (glibc's malloc) and with p3o_jax's setting
    theirs, theirs_reuse = (peer_process.run_apart(bench_trl, malloc, policy_dir, rm_dir, tokenizer, prompts, steps,
                                                   warmup, directory, precision) for malloc in ("default", "reuse"))
    ours = []
    for devices in device_counts:
      # One runtime at a time, with a pause between: one's still-spinning worker threads slow the other.
      time.sleep(1.0)
      ours.append(bench_ours(policy_dir, rm_dir, tokenizer, prompts, steps, warmup, devices, precision, old_pass))
  return dict(shape=shape, ours=ours, theirs=theirs, theirs_reuse=theirs_reuse)


def phase_report(shape: str, r: dict, ceilings: dict) -> str:
  """Each phase's seconds, achieved model FLOP/s and share of the fp32 (and bf16) matmul ceiling."""
  flops = ceiling.phase_flops(SHAPES[shape], rows=r["rows"], prompts=r["prompts"], prompt=PROMPT, new=NEW,
                              old_pass=r["old_pass"])
  parts = []
  for phase, seconds in r["phases"].items():
    achieved = flops[phase] / seconds
    parts.append(f"{phase} {seconds * 1e3:.0f} ms, {achieved / 1e9:.1f} GFLOP/s = {achieved / ceilings['float32']:.0%} "
                 f"of fp32 ({achieved / ceilings['bfloat16']:.0%} of bf16)")
  return "; ".join(parts)


def main():
  # What `python -m p3o_jax.main` does on a CPU (mesh.cpu_reuse_memory); TRL runs in processes of
  # its own, with and without it (peer_process.run_apart).
  memory_note = host_memory.apply()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
  parser.add_argument("--prompts", type=int, default=16, help="prompts per iteration (P); rows = P * K")
  parser.add_argument("--steps", type=int, default=4, help="timed iterations per side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per side first")
  parser.add_argument("--devices", type=int, default=os.cpu_count(),
                      help="host devices of ours' data-parallel run (one per core by default); ours also runs on one")
  parser.add_argument("--old-pass", action="store_true",
                      help="ours also runs the sampling policy's teacher-forced pass (as TRL's RLOO does)")
  parser.add_argument("--runs", type=int, default=1,
                      help="whole runs per shape and precision (TRL and ours each time), then the median of the "
                           "runs' ratios: the targets read --runs 5")
  parser.add_argument("--precision", default="fp32,bf16",
                      help="comma list: fp32 (both sides fp32, TRL's bf16 off) and/or bf16 (TRL bf16=True, "
                           "autocast; ours model.matmul_dtype=bfloat16)")
  args = parser.parse_args()
  peer_process.quiet_torch()
  import trl  # noqa: PLC0415
  device_counts = sorted({1, min(args.devices, jax.device_count())})
  ceilings = {dtype: ceiling.matmul_ceiling(dtype) for dtype in ("float32", "bfloat16")}
  print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; jax {jax.__version__} "
        f"({jax.default_backend()}, default matmul precision), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, trl {trl.__version__}; "
        f"{args.prompts} prompts x K={K}, prompt {PROMPT}, new tokens {NEW}, median of {args.steps} "
        f"iterations after {args.warmup} warm-up; matmul ceiling here (XLA, one device): "
        f"fp32 {ceilings['float32'] / 1e9:.0f} GFLOP/s, bf16 {ceilings['bfloat16'] / 1e9:.0f} GFLOP/s; p3o_jax: "
        f"{memory_note}; TRL in a process of its own, with glibc's malloc as it runs, then with that setting",
        flush=True)
  for shape, precision in ((s, p) for s in (SHAPES if args.shape == "all" else [args.shape])
                            for p in args.precision.split(",")):
    ratios: dict[int, list[float]] = {}
    for run in range(args.runs):
      r = bench(shape, args.prompts, args.steps, args.warmup, device_counts, precision, args.old_pass)
      theirs, reuse = r["theirs"], r["theirs_reuse"]
      run_tag = f"run {run + 1}/{args.runs} " if args.runs > 1 else ""
      print(f"{shape:>6} {precision}: {run_tag}TRL RLOO {theirs['tok_s']:8.1f} response tok/s (best {theirs['best']:.1f}) | "
            f"rollout share {theirs['rollout_share']:.0%} | first iteration {theirs['first_s']:.1f} s | with p3o_jax's "
            f"host-memory setting {reuse['tok_s']:.1f} (best {reuse['best']:.1f})", flush=True)
      for ours in r["ours"]:
        ratios.setdefault(ours["devices"], []).append(ours["tok_s"] / theirs["tok_s"])
        print(f"        p3o_jax P3O, {ours['devices']} device(s), old pass {'run' if ours['old_pass'] else 'skipped'}: "
              f"{ours['tok_s']:8.1f} response tok/s | ratio "
              f"{ours['tok_s'] / theirs['tok_s']:5.2f}x (best iterations: {ours['best']:.1f} vs {theirs['best']:.1f}, "
              f"{ours['best'] / theirs['best']:.2f}x) | against TRL with the same setting "
              f"{ours['tok_s'] / reuse['tok_s']:.2f}x | rollout share {ours['rollout_share']:.0%}"
              + (f" | first iteration {ours['first_s']:.1f} s" if run == 0 else ""), flush=True)
        print(f"          phases: {phase_report(shape, ours, ceilings)}", flush=True)
    if args.runs > 1:
      for devices, each in ratios.items():
        print(f"{shape:>6} {precision}: p3o_jax, {devices} device(s), against TRL RLOO: {runs.ratio_summary(each)}",
              flush=True)

if __name__ == "__main__":
  main()
