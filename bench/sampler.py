"""New tokens per second: p3o_jax.sampling.generate against transformers `generate` (torch, CPU).

    python bench/sampler.py --shape all [--repeats 5] [--devices N] [--runs 5]

Both samplers run the SAME random GPT-NeoX weights (a transformers GPTNeoXForCausalLM saved to a
temp dir and read back with `hf.load`), the same batch of prompts, and generate exactly the same
number of tokens: multinomial sampling at temperature 1, no top-k / top-p, min_new_tokens =
max_new_tokens so EOS never ends a row early, KV cache on. Each is warmed up (JAX compiles
there), then timed `--repeats` times in a row; the median is reported, and the best run, which
is less sensitive to other load on the machine (torch's threads suffer most from it: measure on
an idle machine). JAX runs with its default matmul precision (the tests force 'highest'); torch
uses as many threads as there are cores. Ours runs under the malloc setting `python -m p3o_jax.main`
makes on a CPU (p3o_jax/host_memory.py), as an RL run's sampler does; transformers runs in processes
of its own, as its users run it (the ratio) and with that setting too ("the same setting").

Ours runs twice: on one device, and data-parallel over `--devices` host devices (default: one
per core, made with --xla_force_host_platform_device_count) with `generate(..., mesh=...)`, each
device decoding its share of the batch in its own loop. XLA runs a small model's decode step
on one core, so the mesh is how it uses all of them, as torch does with its threads; a large
model's matmuls already use every core on one device. "(default)" marks the one an RL run uses
with the default sampler.cpu_devices='auto' (p3o_jax/host_devices.py: per core up to 20M
parameters, so tiny samples per core and the Pythia-70M shape on one device).

Against the hardware (bench/ceiling.py): model FLOP/s as a share of the measured matmul ceiling,
and the bytes the decode loop must read (every weight once per step and device, the keys and
values so far) per second as a share of the measured memory read bandwidth. The Pythia-70M
shape's step multiplies through 179 MB of fp32 weights, which no cache holds, so reading them
bounds it; tiny's 1.8 MB stay in cache, and only the matmul ceiling binds it.

`--runs N` repeats the whole comparison N times (transformers' processes and ours each time) and
then prints the median of the runs' ratios, as the targets are stated (bench/runs.py).

Shapes: tiny (2 layers, d=128, 4 heads, vocab 512) and pythia70m (6 layers, d=512, 8 heads,
MLP 2048, vocab 50304, rotary_pct 0.25, parallel residual); batch 16, prompt 32, 64 new tokens.
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


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_flag  # noqa: E402,F401  (before jax: --devices -> XLA_FLAGS)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from p3o_jax import host_devices, host_memory, sampling, sharding  # noqa: E402
from p3o_jax.config_base import base_config  # noqa: E402
from p3o_jax.models import decoder, hf  # noqa: E402

import ceiling  # noqa: E402
import peer_process  # noqa: E402
import runs  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=512),
    "pythia70m": dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                      intermediate_size=2048),
}
BATCH, PROMPT, NEW = 16, 32, 64
PAD_ID, EOS_ID = 1, 0  # Pythia's ids


def build_hf(shape: str, directory: str) -> transformers.GPTNeoXForCausalLM:
  config = transformers.GPTNeoXConfig(
      **SHAPES[shape], rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu",
      max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=PAD_ID,
      bos_token_id=EOS_ID, eos_token_id=EOS_ID)
  torch.manual_seed(0)
  model = transformers.GPTNeoXForCausalLM(config).eval()
  model.save_pretrained(directory)
  return model


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def prompt_batch(vocab_size: int) -> np.ndarray:
  return np.random.default_rng(0).integers(2, vocab_size, (BATCH, PROMPT)).astype(np.int32)


def time_transformers(directory: str, precision: str, repeats: int) -> list[float]:
  """transformers' `generate` on the model saved in `directory`: seconds of `repeats` timed calls
  after one warm-up (in a process of its own: `peer_process.run_apart`)."""
  model = transformers.GPTNeoXForCausalLM.from_pretrained(directory).eval()
  if precision == "bf16":
    model = model.to(torch.bfloat16)
  ids = torch.as_tensor(prompt_batch(model.config.vocab_size), dtype=torch.long)

  def theirs():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, min_new_tokens=NEW, max_new_tokens=NEW, use_cache=True,
                           pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    assert out.shape == (BATCH, PROMPT + NEW)
  timed(theirs)
  return [timed(theirs) for _ in range(repeats)]


def bench(shape: str, repeats: int, precision: str = "fp32") -> dict:
  """precision 'bf16': transformers' model in torch.bfloat16; ours reads bf16 weights into bf16-input,
  fp32-summed matmuls (sampler.param_dtype and sampler.matmul_dtype = bfloat16)."""
  with tempfile.TemporaryDirectory() as directory:
    build_hf(shape, directory)
    cfg, graph, params = hf.load(directory)
    # transformers as its users run it (glibc's default malloc), and with p3o_jax's setting
    theirs_s = {malloc: peer_process.run_apart(time_transformers, malloc, directory, precision, repeats)
                for malloc in ("default", "reuse")}
  if precision == "bf16":
    graph = decoder.with_matmul_dtype(graph, "bfloat16")
    params = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
  prompts = prompt_batch(cfg.vocab_size)
  mask = np.ones_like(prompts)
  keys = iter(jax.random.split(jax.random.key(0), 4 * repeats + 4))
  mesh = sharding.make_mesh(data=-1)
  mesh_params = jax.device_put(params, sharding.replicated(mesh))

  def ours(on_mesh: bool):
    out = sampling.generate(graph, mesh_params if on_mesh else params, prompts, mask, next(keys),
                            max_new_tokens=NEW, min_new_tokens=NEW, eos_id=EOS_ID, pad_id=PAD_ID,
                            mesh=mesh if on_mesh else None)
    jax.block_until_ready(out)
    assert int(out.lengths.min()) == NEW

  compile_s = timed(lambda: ours(False))
  timed(lambda: ours(True))
  runs = {}
  for name, on_mesh in (("one device", False), (f"{len(mesh.devices.flat)} devices", True)):
    time.sleep(1.0)  # one runtime at a time: still-spinning worker threads slow the next one down
    runs[name] = (len(mesh.devices.flat) if on_mesh else 1, [timed(lambda: ours(on_mesh)) for _ in range(repeats)])
  tokens = BATCH * NEW
  rate = lambda seconds: tokens / statistics.median(seconds)
  best = lambda seconds: tokens / min(seconds)
  # What an RL run does by default: the devices host_devices.sampler_devices picks for this
  # policy beside a one-device trainer (sampler.cpu_devices='auto'); None: the trainer's one.
  picked = host_devices.sampler_devices(base_config(), None, params)
  default = "one device" if picked is None else f"{len(picked)} devices"
  return dict(shape=shape, compile_s=compile_s, transformers=rate(theirs_s["default"]),
              transformers_best=best(theirs_s["default"]), transformers_reuse=rate(theirs_s["reuse"]),
              ours={name: (rate(s), best(s), devices) for name, (devices, s) in runs.items()}, default=default)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (both samplers)")
  parser.add_argument("--runs", type=int, default=1,
                      help="whole runs per shape and precision (transformers and ours each time), then the median "
                           "of the runs' ratios: the targets read --runs 5")
  parser.add_argument("--devices", type=int, default=os.cpu_count(),
                      help="host devices for the data-parallel run (default: one per core)")
  args = parser.parse_args()
  # What `python -m p3o_jax.main` does on a CPU (mesh.cpu_reuse_memory), before JAX allocates: it
  # keeps freed blocks (e.g. the [V, D] head copy a sampler call makes) instead of page-faulting
  # them in anew. transformers runs in processes of its own, with and without it.
  memory_note = host_memory.apply()
  ceilings = {"fp32": ceiling.matmul_ceiling("float32"), "bf16": ceiling.matmul_ceiling("bfloat16")}
  bandwidth = ceiling.read_bandwidth()
  print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}, default matmul precision), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"batch {BATCH}, prompt {PROMPT}, new tokens {NEW}, median of {args.repeats}; ceilings here "
        f"(XLA, one device): matmul fp32 {ceilings['fp32'] / 1e9:.0f} GFLOP/s, bf16 inputs {ceilings['bf16'] / 1e9:.0f} "
        f"GFLOP/s; memory read {bandwidth / 1e9:.1f} GB/s; ours: {memory_note}")
  for shape, precision in ((s, p) for s in (SHAPES if args.shape == "all" else [args.shape])
                            for p in args.precision.split(",")):
    ratios: dict[str, list[float]] = {}
    flops_per_token = ceiling.decode_flops(SHAPES[shape], BATCH, BATCH, PROMPT, NEW) / (BATCH * NEW)
    for run in range(args.runs):
      r = bench(shape, args.repeats, precision)
      run_tag = f"run {run + 1}/{args.runs} " if args.runs > 1 else ""
      print(f"{r['shape']:>10} {precision}: {run_tag}transformers {r['transformers']:9.1f} new tok/s (best {r['transformers_best']:.1f}; "
            f"with p3o_jax's host-memory setting {r['transformers_reuse']:.1f})"
            + (f"; first call of ours {r['compile_s']:.1f} s" if run == 0 else "; ours compiled in run 1"), flush=True)
      for name, (rate, best, devices) in r["ours"].items():
        tag = " (default)" if name == r["default"] else ""
        ratios.setdefault(name + tag, []).append(rate / r["transformers"])
        # Bytes per new token of the decode loop (the prefill's share is left out: it reads the
        # weights once for all 64 steps): each device reads every weight and its own rows' cache.
        read_per_token = devices * ceiling.decode_bytes(SHAPES[shape], 2 if precision == "bf16" else 4,
                                                        rows=BATCH // devices, prompt=PROMPT, new=NEW) / (BATCH * (NEW - 1))
        read = rate * read_per_token
        print(f"{'':>10}  p3o_jax, {name + tag:>20}: {rate:9.1f} new tok/s | ratio {rate / r['transformers']:5.2f}x "
              f"(best runs: {best / r['transformers_best']:.2f}x) | {rate * flops_per_token / 1e9:.1f} model GFLOP/s = "
              f"{rate * flops_per_token / ceilings[precision]:.0%} of the {precision} ceiling | weights and cache read at "
              f"{read / 1e9:.1f} GB/s = {read / bandwidth:.0%} of memory's | against transformers with the same "
              f"setting {rate / r['transformers_reuse']:.2f}x", flush=True)
    if args.runs > 1:
      for name, each in ratios.items():
        print(f"{shape:>10} {precision}: p3o_jax, {name}, against transformers: {runs.ratio_summary(each)}", flush=True)


if __name__ == "__main__":
  main()
