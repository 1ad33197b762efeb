"""bench/accelerator.py --tiny and bench/memory.py run end to end, and their numbers add up; bench/runs.py's
summary of several runs."""

import importlib
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
BENCH = os.path.join(ROOT, "bench")


def bench_module(name: str):
  """A script module of bench/ (a folder of scripts, not a package), imported by name."""
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  return importlib.import_module(name)


def run(*args: str, timeout: int) -> str:
  # One device, as the scripts' users run them; XLA told to compile fast rather than to emit fast
  # code: these tests check the code paths and the arithmetic, not the speed.
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_accelerator_tiny_prints_three_sections_with_finite_numbers():
  out = run("bench/accelerator.py", "--tiny", "--steps", "3", "--repeats", "2", timeout=300)  # a hang guard: about 30 s of CPU
  sections = {name: out.index(name) for name in ("(a) train step", "(b) decode", "(c) iteration memory", "---- summary")}
  assert list(sections.values()) == sorted(sections.values()), out
  body = lambda start, end: out[sections[start]:sections[end]]
  checks = {"(a) train step": (r"(" + NUMBER + r") ms/step", r"MFU (" + NUMBER + r")%"),
            "(b) decode": (r"(" + NUMBER + r") tok/s decode", r"(" + NUMBER + r")% of it"),
            "(c) iteration memory": (r"(" + NUMBER + r") GB peak",)}
  ends = dict(zip(checks, ["(b) decode", "(c) iteration memory", "---- summary"]))
  for section, patterns in checks.items():
    for pattern in patterns:
      found = re.search(pattern, body(section, ends[section]))
      assert found, f"{section}: no {pattern!r} in\n{out}"
      value = float(found.group(1))
      assert math.isfinite(value) and value > 0, f"{section}: {pattern} = {value}\n{out}"


@pytest.mark.parametrize("lora", [[], ["--lora", "16"]], ids=["full", "lora16"])
def test_memory_table_total_is_the_sum_of_its_rows(lora):
  out = run("bench/memory.py", "tldr-1b", "--hbm", "80", "--method", "analytic", *lora, timeout=120)
  if lora:  # adapters and their moments instead of the policy's, no reference copy
    assert "LoRA adapters, rank 16" in out and "reference params" not in out and "AdamW nu (float32, adapters)" in out
    sizes = {name: float(gb) for name, gb in re.findall(r"(LoRA adapters, rank 16|AdamW nu \(float32, adapters\))"
                                                         r"[^\n]*?\s([0-9.]+)\s+eval_shape", out)}
    assert 0 < sizes["LoRA adapters, rank 16"] == sizes["AdamW nu (float32, adapters)"] < 0.1, sizes
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["phase", "item"])
  rows, total = [], None
  for line in lines[start + 1:]:
    cells = re.split(r"\s{2,}", line.strip())
    if cells[0].startswith("total"):
      total = float(cells[1])
      break
    rows.append(float(cells[2]))
  assert total is not None and len(rows) >= 7, out
  assert abs(sum(rows) - total) <= 0.005 * len(rows) + 1e-9, (rows, total, out)  # rows print rounded to 0.01
  assert re.search(r"\bFITS 80 GB\b|DOES NOT FIT 80 GB", out), out


def test_model_flops_count_every_linear_weight_once_per_token():
  """bench/ceiling.py's weights per token = the GPT-NeoX model's nn.Linear weights (embedding lookup
  excluded), counted by transformers; a forward is 2 FLOPs per weight per token plus attention."""
  import torch
  import transformers
  ceiling = bench_module("ceiling")
  shape = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80)
  model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**shape, tie_word_embeddings=False))
  linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
  assert ceiling.weights_per_token(shape) == linear
  tokens = 5
  pairs = tokens * (tokens + 1) // 2  # causal (query, key) pairs
  assert ceiling.forward_flops(shape, rows=2, tokens=tokens) == 2 * (2 * linear * tokens + 4 * 32 * 3 * pairs)
  head = 32 * 96
  block = (linear - head) // 3
  # Decoding: the prefill gives token 0: the prompt's 4 tokens through 2 blocks (10 causal pairs
  # each), the third block's keys and values for all 4 and the rest of it for the last token
  # alone (4 keys), the LM head there only; token 1 is one forward of the row's token 0
  # attending to the 4 prompt keys and itself.
  decode = ceiling.decode_flops(shape, prompts=1, rows=2, prompt=4, new=2)
  prefill = 2 * (block * (2 * 4 + 1) + 2 * 32 * 32 * 4 + head) + 4 * 32 * (2 * 10 + 4)
  assert decode == prefill + 2 * (2 * linear + 4 * 32 * 3 * 5)
  # A prompt of 4 run once for its 2 responses of 3, for log-probs: the prompt's first 3 tokens
  # through 2 blocks (6 causal pairs each) and the third block's keys and values only; per row
  # the prompt's last token and 2 response tokens through all 3 blocks, attending to 3 + 1, 3 + 2
  # and 3 + 3 keys; the LM head at 2 x 3 positions.
  # Its bytes: 2 steps after the prefill, each reading every weight (bf16: 2 bytes) and the
  # fp32 keys and values of 2 rows at 5 and then 6 slots of 32 in 3 layers.
  assert ceiling.decode_bytes(shape, 2, rows=2, prompt=4, new=3) == 2 * linear * 2 + 4 * 2 * 3 * 32 * 2 * (5 + 6)
  once = ceiling.prompt_once_flops(shape, prompts=1, rows=2, prompt=4, new=3)
  assert once == 2 * (block * (2 * 3 + 3 * 2 * 3) + 2 * 32 * 32 * 3 + head * 2 * 3) + 4 * 32 * (2 * 6 + 3 * 2 * 15)
  # For a reward model: the whole prompt (10 causal pairs) and each response's 3 tokens after it
  # (5 + 6 + 7 keys) through 2 blocks; the third block's keys and values at all 4 + 2 x 3
  # positions, the rest of it and the scalar head at the prompt's last token (4 keys) and each
  # response's last (7 keys) alone.
  scores = ceiling.prompt_once_flops(shape, prompts=1, rows=2, prompt=4, new=3, head="scalar")
  assert scores == (2 * (block * (2 * 10 + 3) + 2 * 32 * 32 * 10 + 3 * 32)
                    + 4 * 32 * (2 * (10 + 2 * 18) + 4 + 2 * 7))


def test_prompt_once_flops_are_what_xla_compiles():
  """XLA's own FLOP count of the compiled log-prob and reward passes (rl/sequences.py) is within
  1.0-1.25x of bench/ceiling.py's (XLA adds the elementwise ops and the masked half of attention).
  At this shape a pass whose prompt ran its last block in full compiled to 4.0M against 2.3M
  counted: the band also shows that XLA leaves that block out of the log-prob pass."""
  import jax
  import jax.numpy as jnp
  ceiling = bench_module("ceiling")
  from p3o_jax.models import decoder
  from p3o_jax.rl import sequences
  shape = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80)
  cfg = decoder.DecoderConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=80,
                              parallel_residual=True, rotary_pct=0.25, activation="gelu", model_type="gpt_neox")
  G, K, P, R = 2, 2, 32, 4
  query, response = jnp.ones((G, P), jnp.int32), jnp.ones((G * K, R), jnp.int32)
  rows = (query, jnp.ones_like(query), response, jnp.ones_like(response))
  for head, fn, model_cfg in (("lm", sequences.response_logprobs, cfg),
                              ("scalar", sequences.response_scores, cfg.replace(lm_head=False, scalar_head=True))):
    graph, params = decoder.create(model_cfg)
    cost = jax.jit(lambda p: fn(graph, p, *rows)).lower(params).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    counted = ceiling.prompt_once_flops(shape, prompts=G, rows=G * K, prompt=P, new=R, head=head)
    assert 1.0 <= xla / counted <= 1.25, (head, xla, counted)


def test_ratio_summary_reads_the_median_of_the_runs_ratios():
  """bench/runs.py: the median, best and worst of each run's own ratio, listed in run order."""
  runs = bench_module("runs")

  text = runs.ratio_summary([3.12, 3.50, 3.49, 3.14, 2.70])
  assert text.startswith("median 3.14x of 5 runs (3.12 / 3.50 / 3.49 / 3.14 / 2.70;")
  assert text.endswith("best 3.50x, worst 2.70x)")
  assert runs.ratio_summary([2.0, 4.0]).startswith("median 3.00x of 2 runs")
  with pytest.raises(ValueError, match="no runs"):
    runs.ratio_summary([])
