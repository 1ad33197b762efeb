"""P3O on one accelerator: train-step MFU, sampler decode against the HBM roofline, peak memory of an iteration.

    python bench/accelerator.py            # one GPU / TPU (e.g. an H200): a few minutes, compiles included
    python bench/accelerator.py --tiny     # the same code paths on tiny shapes, on CPU, in seconds
    python bench/accelerator.py --peak-tflops 989 --hbm-tbs 4.8   # override the device table

(a) train step. One P3O update step (`rl/update.for_run`, as rl/loop.py builds it, over the loss of
    `algorithms.create(config.rl, ...)`, AdamW from `train_state`, one epoch of one minibatch)
    on the Pythia-1B shape with bf16 activations and fp32 weights (as configs/tldr.py trains),
    8 rows x 1024 tokens (4 prompts x K=2; 512 prompt + 512 response tokens). Median of
    --steps timed steps after two untimed ones (the first compiles).
    FLOPs per step = 6·N_blocks·tokens + 6·d·V·response_tokens + attention: forward + backward
    (x3) of every matmul, where each prompt runs once for its K responses and the LM head only
    on the positions that predict response tokens (rl/sequences.py; tokens = 4 prompts x 512 +
    8 responses x 512), the input embedding is a gather (no FLOPs), and attention (QK^T and PV,
    12·L·d per query and key: a prompt's 512² pairs, a response's 512 x 1024) is counted
    without causal halving, the
    PaLM paper's (Chowdhery et al. 2022, appendix B) convention. MFU = FLOPs / time / peak bf16:
    model FLOPs only, so recomputation (the backward's re-run of each query block's attention,
    decoder.attend) counts as time, not work.
(b) decode. `sampling.generate` with bf16 weights (as sampler.param_dtype='bfloat16' serves
    them) on the Pythia-1B shape: 64 prompts of 128 tokens, 128 new tokens, min_new_tokens =
    max_new_tokens so no row stops early. Decode rate = 64 x 127 tokens / (time of 128 new
    tokens - time of 1 new token), which leaves the prefill out. Roofline: a decode step reads
    every weight once (all but the input embedding, a gather of 64 rows), so the weight-bound
    rate is 64 x bandwidth / those bytes; the KV cache (every slot read every step) is shown
    beside it.
(c) iteration memory. The largest of bench/memory.py's settings that it estimates to fit this
    device with 10% headroom using only options this checkout has (analytic estimate; the
    options it needs are applied), run for one full iteration with random weights: Roller
    (sample, old/ref log-probs, reward model, chunk by chunk), `algo.prepare`, and the config's
    whole update (all epochs and minibatches). With model.scan_layers (compile time flat in
    depth, so a 32-layer model compiles within the budget; --unrolled for the config's default).
    Every response is max_new_tokens long (min_new_tokens = max_new_tokens): the worst case.
    Peak from `jax.devices()[0].memory_stats()['peak_bytes_in_use']` (since the process
    started: the weights' initialisation and (a), (b) included); where the backend has no
    memory stats (CPU), the live arrays plus the update's XLA temp bytes. A setting that runs
    out of memory is reported and the next one run.

Peak tables: dense bf16 FLOP/s and HBM bandwidth from the vendors' data sheets (no sparsity),
matched on `jax.devices()[0].device_kind`. On CPU (--tiny) the peak is measured: the best
bf16 matmul and the best large reduction this process times.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
import types

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # room for (c); GPU only
if "--tiny" in sys.argv:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/memory.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import memory  # noqa: E402
from p3o_jax import sampling, train_state  # noqa: E402
from p3o_jax.config_base import base_config  # noqa: E402
from p3o_jax.models import decoder, hf, policy  # noqa: E402
from p3o_jax.rl import algorithms  # noqa: E402
from p3o_jax.rl.rollout import ModelReward, make_roller, process_scores  # noqa: E402
from p3o_jax.rl.update import for_run  # noqa: E402

# device_kind substring -> (dense bf16 TFLOP/s, HBM TB/s); the first match wins.
PEAKS = [
    ("H200", 989.0, 4.8), ("H100 PCIe", 756.0, 2.0), ("H100", 989.0, 3.35),
    ("A100-SXM4-80GB", 312.0, 2.039), ("A100 80GB", 312.0, 1.935), ("A100", 312.0, 1.555),
    ("TPU v4", 275.0, 1.2), ("TPU v5 lite", 197.0, 0.819), ("TPU v5e", 197.0, 0.819),
    ("TPU v5p", 459.0, 2.765), ("TPU v5", 459.0, 2.765), ("TPU v6 lite", 918.0, 1.64), ("TPU v6e", 918.0, 1.64),
]
TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128)
EOS_ID, PAD_ID = 0, 1


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_peaks(args) -> tuple[str, float, float, str]:
  """(device kind, bf16 FLOP/s, bytes/s, where they come from)."""
  kind = jax.devices()[0].device_kind
  flops, bw = args.peak_tflops, args.hbm_tbs
  where = "--peak-tflops / --hbm-tbs"
  match = next(((f, b) for name, f, b in PEAKS if name.lower() in kind.lower()), None)
  if jax.default_backend() == "cpu":
    where = "measured on this CPU (best bf16 matmul, best large reduction)"
    n = 1024
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    flops = flops or 2 * n ** 3 / min(median_time(lambda: mm(a), 1) for _ in range(5)) / 1e12
    x = jnp.ones((32 * 2 ** 20,), jnp.float32)  # 128 MB: far beyond the caches
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    bw = bw or x.nbytes / min(median_time(lambda: total(x), 1) for _ in range(5)) / 1e12
  elif match:
    flops, bw = flops or match[0], bw or match[1]
    where = f"data sheet for {kind!r}" if (args.peak_tflops, args.hbm_tbs) == (None, None) else where
  if not flops or not bw:
    raise SystemExit(f"no peak for device kind {kind!r}: pass --peak-tflops and --hbm-tbs")
  return kind, flops * 1e12, bw * 1e12, where


def policy_cfg(tiny: bool, **dtypes) -> decoder.DecoderConfig:
  return decoder.DecoderConfig(**TINY, **dtypes) if tiny else hf.config_from_hf(memory.SHAPES["Pythia-1B"], **dtypes)


def random_params(cfg: decoder.DecoderConfig, seed: int = 0):
  """Initialised on the device (no host copy)."""
  return decoder.abstract(cfg)[0], jax.jit(lambda: decoder.create(cfg, seed)[1])()


# ----------------------------------------------------------------------------- (a) train step

def train_step(tiny: bool, steps: int, peak_flops: float) -> dict:
  rows, prompt, response = 8, (32 if tiny else 512), (32 if tiny else 512)
  cfg = policy_cfg(tiny, dtype="bfloat16", param_dtype="float32")
  graph, params = random_params(cfg)
  config = base_config()
  config.rl.update(k=2, inner_epochs=1, num_minibatches=1)
  algo = algorithms.create(config.rl, graph, 1.0)
  tx = train_state.make_optimizer(config.optim, steps + 2)
  update, hyper = for_run(algo, config.optim, steps + 2, epochs=1, num_minibatches=1)
  rng = np.random.default_rng(0)
  query = rng.integers(2, cfg.vocab_size, (rows, prompt)).astype(np.int32)
  resp = rng.integers(2, cfg.vocab_size, (rows, response)).astype(np.int32)
  ones_q, ones_r = np.ones_like(query), np.ones_like(resp)
  # Old and reference log-probs of a uniform policy, near a random init's: any finite values cost the same.
  logp = np.full((rows, response), -np.log(cfg.vocab_size), np.float32)
  group = lambda x: jnp.asarray(x).reshape(rows // 2, 2, *np.shape(x)[1:])
  batch = dict(query=jnp.asarray(query[::2]), query_mask=jnp.asarray(ones_q[::2]),  # one per group of K=2
               response=group(resp), response_mask=group(ones_r),
               logp_old=group(logp), logp_ref=group(logp), rewards=group(rng.normal(size=rows).astype(np.float32)))
  state = jax.jit(lambda p: train_state.create(p, tx))(params)
  key = jax.random.key(0)
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, metrics = update(state, batch, key, hyper)
    loss = float(np.asarray(metrics["loss/total"]).reshape(-1)[0])
    times.append(time.perf_counter() - start)
    if not np.isfinite(loss):
      raise FloatingPointError(f"train step {i}: non-finite loss")
  seconds = statistics.median(times[2:])
  L, d, V, T = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, prompt + response
  n_blocks = memory.num_params(cfg) - 2 * V * d  # without the input embedding and the LM head
  prompts = rows // 2
  flops = (6 * n_blocks * (prompts * prompt + rows * response) + 6 * d * V * rows * response
           + 12 * L * d * (prompts * prompt * prompt + rows * response * T))
  return dict(shape="tiny" if tiny else "Pythia-1B", params=memory.num_params(cfg), rows=rows, T=T,
              first_s=times[0], seconds=seconds, flops=flops, tflops=flops / seconds / 1e12,
              mfu=flops / seconds / peak_flops)


# ----------------------------------------------------------------------------- (b) decode

def decode(tiny: bool, repeats: int, bandwidth: float) -> dict:
  batch, prompt, new = (8, 16, 16) if tiny else (64, 128, 128)
  cfg = policy_cfg(tiny, dtype="bfloat16", param_dtype="bfloat16")
  graph, params = random_params(cfg)
  rng = np.random.default_rng(0)
  prompts = rng.integers(2, cfg.vocab_size, (batch, prompt)).astype(np.int32)
  mask = np.ones_like(prompts)

  def run(n):
    out = sampling.generate(graph, params, prompts, mask, jax.random.key(n), max_new_tokens=n, min_new_tokens=n,
                            eos_id=EOS_ID, pad_id=PAD_ID)
    return out.tokens

  first = time.perf_counter()
  jax.block_until_ready(run(new))
  first = time.perf_counter() - first
  jax.block_until_ready(run(1))
  full, one = median_time(lambda: run(new), repeats), median_time(lambda: run(1), repeats)
  rate = batch * (new - 1) / max(full - one, 1e-9)
  weights = memory.param_bytes(cfg, "bfloat16", 1) - memory.nbytes((cfg.vocab_size, cfg.hidden_size), "bfloat16")
  cache = memory.kv_cache_bytes(cfg, batch, 1, prompt, new)
  return dict(batch=batch, prompt=prompt, new=new, first_s=first, seconds=full, rate=rate,
              weights=weights, cache=cache, roofline=batch * bandwidth / weights,
              roofline_kv=batch * bandwidth / (weights + cache))


# ----------------------------------------------------------------------------- (c) one iteration's peak

def candidates(limit: float, log):
  """The named settings, largest first, that the analytic estimate fits in `limit` bytes with 10%
  headroom using only options this checkout has, on one device, with those options."""
  for name in memory.SETTINGS:
    s, o, act = memory.estimate(name, method="analytic")
    o = memory.fixes(s, o, act, 0.9 * limit, skip=(*s.absent, "mesh.fsdp"))[1]
    total = memory.peak(memory.items(s, o, act))[1]
    if total <= 0.9 * limit:
      yield s, o
    else:
      log(f"    {name}: estimated {total / memory.GB:.1f} GB with this checkout's options, over "
          f"{0.9 * limit / memory.GB:.1f} GB: next setting")


def tiny_setting() -> tuple[memory.Setting, memory.Options]:
  config = base_config()
  config.data.max_prompt_len, config.sampler.max_new_tokens = 16, 8
  config.rl.update(prompts_per_rollout=8, k=2, num_minibatches=2, inner_epochs=2)
  config.model.dtype = "bfloat16"
  cfg = decoder.DecoderConfig(**TINY, dtype="bfloat16")
  s = memory.Setting("tiny", config, cfg, cfg.replace(lm_head=False, scalar_head=True), "tiny", "tiny", 16, 8, ())
  return s, memory.options_from(s, 1)


def iteration(tiny: bool, scan: bool, log) -> dict:
  """The largest setting that runs: one that runs out of memory (the estimate was wrong) is
  reported, and the next one tried."""
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  limit = (stats or {}).get("bytes_limit")
  failed = []
  for s, o in [tiny_setting()] if tiny or not limit else candidates(limit, log):
    try:
      return {**run_iteration(s, o, scan, device), "limit": limit, "failed": failed}
    except Exception as err:  # noqa: BLE001  (jax's runtime error class moves between versions)
      if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
        raise
      log(f"    {s.name}: out of device memory, next setting ({str(err).splitlines()[0][:200]})")
      failed.append(s.name)
      del err
      gc.collect()
  raise SystemExit("no setting ran on this device")


def run_iteration(s: memory.Setting, o: memory.Options, scan: bool, device) -> dict:
  s = dataclasses.replace(s, policy=s.policy.replace(scan_layers=scan), reward=s.reward.replace(scan_layers=scan))
  config = s.config
  config.model.remat, config.model.frozen_dtype, config.optim.mu_dtype = o.remat, o.frozen_dtype, o.mu_dtype
  config.rl.micro_batches, config.rl.rollout_chunk = o.micro_batches, o.rollout_chunk
  rl = config.rl
  config.sampler.min_new_tokens = config.sampler.max_new_tokens  # every response full length: the worst case
  graph, params = random_params(s.policy.replace(remat=o.remat))
  ref_params = policy.frozen_copy(params, o.frozen_dtype)  # as pipeline.run_rl: the update donates params
  rm_graph, rm_params = random_params(s.reward.replace(param_dtype=o.frozen_dtype), seed=1)
  tokenizer = types.SimpleNamespace(eos_token_id=EOS_ID, pad_token_id=PAD_ID)
  reward = ModelReward(rm_graph, rm_params)
  roller = make_roller(config, graph, ref_params, reward, tokenizer, penalise_missing_eos=False)
  algo = algorithms.create(rl, graph, config.sampler.temperature)
  tx = train_state.make_optimizer(config.optim, rl.iterations)
  update, hyper = for_run(algo, config.optim, rl.iterations, epochs=rl.inner_epochs,
                          num_minibatches=rl.num_minibatches, micro_batches=rl.micro_batches)
  state = jax.jit(lambda p: train_state.create(p, tx))(params)
  del params
  rng = np.random.default_rng(0)
  prompts = rng.integers(2, s.policy.vocab_size, (rl.prompts_per_rollout, s.prompt)).astype(np.int32)
  start = time.perf_counter()
  exp = roller(state.params, prompts, np.ones_like(prompts), jax.random.key(0), rl.k, chunk=o.rollout_chunk)
  rolled = time.perf_counter()
  batch = algo.prepare(exp, process_scores(exp.scores, clip=rl.reward_clip, moments=None), rl.beta)[0]
  compiled = update.lower(state, batch, jax.random.key(1), hyper).compile()  # run it, and read its memory analysis
  state, metrics = compiled(state, batch, jax.random.key(1), hyper)
  loss = float(np.asarray(metrics["loss/total"]).reshape(-1)[0])
  seconds = time.perf_counter() - start
  if not np.isfinite(loss):
    raise FloatingPointError("iteration: non-finite loss")
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    peak, how = stats["peak_bytes_in_use"], "memory_stats()['peak_bytes_in_use']"
  else:  # no allocator stats: what stays alive plus the update's temporaries (the largest phase)
    live = sum(x.nbytes for x in jax.live_arrays())
    peak = live + compiled.memory_analysis().temp_size_in_bytes
    how = "live arrays + the update's XLA temp bytes (no memory_stats on this backend)"
  options = (f"scan_layers {scan}, remat {o.remat}, micro_batches {o.micro_batches}, rollout_chunk {o.rollout_chunk}, "
             f"frozen {o.frozen_dtype}, mu {o.mu_dtype}")
  return dict(setting=s.name, policy=s.policy_name, reward=s.reward_name, options=options, peak=peak, how=how,
              seconds=seconds, rollout_s=rolled - start,
              estimate=memory.peak(memory.items(s, o, memory.Activations(s, "analytic")))[1])


# ----------------------------------------------------------------------------- main

def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (the test runs this)")
  parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: the device table)")
  parser.add_argument("--hbm-tbs", type=float, help="HBM bandwidth in TB/s (default: the device table)")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--repeats", type=int, default=3, help="timed sampler calls per length")
  parser.add_argument("--unrolled", action="store_true",
                      help="(c) with the layers unrolled, not model.scan_layers (slower compiles)")
  args = parser.parse_args()
  log = lambda *a, **k: print(*a, **k, flush=True)
  kind, peak_flops, bandwidth, where = device_peaks(args)
  log(f"jax {jax.__version__}, {jax.default_backend()}: {kind}; peak {peak_flops / 1e12:.3g} bf16 TFLOP/s, "
      f"{bandwidth / 1e12:.3g} TB/s ({where})")

  a = train_step(args.tiny, args.steps, peak_flops)
  log(f"\n(a) train step: P3O update step, {a['shape']} ({a['params'] / 1e6:.1f}M params), bf16 activations, "
      f"fp32 weights, {a['rows']} rows x {a['T']} tokens")
  log(f"    {a['seconds'] * 1e3:10.2f} ms/step (median of {args.steps}; first call {a['first_s']:.1f} s)")
  log(f"    {a['flops'] / 1e12:10.3g} TFLOP/step = 6·N_blocks·tokens + 6·d·V·response tokens + 12·L·d·T²·rows")
  log(f"    {a['tflops']:10.3g} TFLOP/s  MFU {a['mfu']:.1%}")

  b = decode(args.tiny, args.repeats, bandwidth)
  log(f"\n(b) decode: sampling.generate, bf16 weights, batch {b['batch']}, prompt {b['prompt']}, {b['new']} new tokens")
  log(f"    {b['rate']:10.1f} tok/s decode ({b['seconds']:.3f} s a call with prefill; first call {b['first_s']:.1f} s)")
  log(f"    {b['roofline']:10.1f} tok/s roofline, weights only ({b['weights'] / 1e9:.3g} GB a step): "
      f"{b['rate'] / b['roofline']:.1%} of it")
  log(f"    {b['roofline_kv']:10.1f} tok/s roofline, weights + the full KV cache ({b['cache'] / 1e9:.3g} GB more a step): "
      f"{b['rate'] / b['roofline_kv']:.1%} of it")

  log("\n(c) iteration memory:")
  c = iteration(args.tiny, not args.unrolled, log)
  if c["failed"]:
    c["how"] += f"; includes the failed attempts at {', '.join(c['failed'])}: the peak never resets"
  limit = f" of {c['limit'] / 1e9:.1f} GB" if c["limit"] else ""
  log(f"    setting {c['setting']}: policy {c['policy']}, reward model {c['reward']}; {c['options']}")
  log(f"    {c['peak'] / 1e9:10.4g} GB peak{limit} ({c['how']}); bench/memory.py analytic estimate "
      f"{c['estimate'] / 1e9:.4g} GB; iteration {c['seconds']:.1f} s (rollout {c['rollout_s']:.1f} s), compiles included")

  log("\n---- summary (for README) ----")
  log(f"{kind}, jax {jax.__version__}; peaks {peak_flops / 1e12:.3g} bf16 TFLOP/s, {bandwidth / 1e12:.3g} TB/s ({where})")
  log(f"- P3O train step, {a['shape']}, bf16, {a['rows']} x {a['T']} tokens: {a['seconds'] * 1e3:.1f} ms, "
      f"{a['tflops']:.3g} TFLOP/s, MFU {a['mfu']:.1%} (6·N·tokens + 12·L·d·T² attention)")
  log(f"- Decode, {a['shape']} bf16 weights, batch {b['batch']}, prompt {b['prompt']}, {b['new']} new: "
      f"{b['rate']:.0f} tok/s = {b['rate'] / b['roofline']:.1%} of the weights-read roofline "
      f"({b['rate'] / b['roofline_kv']:.1%} counting the KV cache)")
  log(f"- One P3O iteration, {c['setting']} ({c['options']}): peak {c['peak'] / 1e9:.4g} GB{limit}")


if __name__ == "__main__":
  main()
