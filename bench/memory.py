"""Device memory of one full-parameter P3O iteration, item by item: does a setting fit one accelerator?

    python bench/memory.py hh-6.9b --hbm 141 [--devices N] [--method xla|analytic]
    python bench/memory.py tldr-1b --hbm 80
    python bench/memory.py configs/hh.py --hbm 141     # any config file; shapes from KNOWN_MODELS

Nothing is allocated and no weights are read: parameter, gradient and optimizer-state sizes
come from `jax.eval_shape` of `decoder.abstract`, exact to the byte. Activations (`--method xla`,
the default):
  rollout     XLA's compiled memory analysis (`jax.jit(f).lower(...).compile().memory_analysis()`,
  log-probs   temp bytes) of the real jitted functions on abstract inputs: the sampler
  reward      (`p3o_jax.sampling`: prefill + while-loop decode; its KV cache is its own row), the
              Roller's teacher-forced pass (old and reference log-probs, `rl/rollout.py`), the
              reward model's score (`rollout.ModelReward`). Each is compiled once, at the real
              depth, widths, lengths and batch (hh-6.9b's three: about 35 s on 2 CPU cores):
              XLA's buffers do not grow linearly in layers, and a line through 3 and 4 layers
              missed hh-6.9b's figures by -0.9 to +7.8 GB. This is the CPU backend's buffer
              assignment, which runs bf16 dots in f32 and fuses less than a GPU: read it as an
              upper estimate.
  update      what jax's autodiff keeps for the backward pass of the P3O loss
              (`saved_residuals`, on abstract inputs, at the real depth), plus, with
              `model.remat`, one block's residuals recomputed in the backward. Not XLA's CPU temp
              bytes: the CPU backend's update buffers come out the same with and without remat.
`--method analytic` uses the formulas in the `how` column for all four (seconds, no compile);
with `xla` the analytic total is printed too. Measure on the device with bench/accelerator.py.

Options come from the config (model.remat, model.frozen_dtype, optim.mu_dtype, rl.micro_batches,
rl.rollout_chunk, sampler.param_dtype); one a checkout lacks takes the behaviour from before it
existed. "What fixes it" applies the options cheapest first, one at a time, keeping each that
lowers the peak and starting over after each; it also tries keeping the frozen models in host
memory during the update (which reads neither: logp_ref is in the batch) and the moments
outside it, marked "no option for it yet", and FSDP last.

Phases of an iteration (rl/loop.py): rollout -> log-probs -> reward -> update. The weights and
optimizer state live throughout; each phase adds its own temporaries. The total is the peak
phase. `--devices N`: FSDP over N devices (mesh fsdp=N, p3o_jax/sharding.py RULES): tensors
with an `embed` axis divisible by N are split N ways, the batch rows too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes only; never touch an accelerator

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402  (jax.ad_checkpoint prints, this returns)

from p3o_jax import sharding, train_state  # noqa: E402
from p3o_jax.models import decoder, hf, lora  # noqa: E402
from p3o_jax.rl import algorithms  # noqa: E402
from p3o_jax.rl.rollout import ModelReward, Roller  # noqa: E402

GB = 1e9
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Public model shapes: the sizes in their config.json, read by hf.config_from_hf as a checkpoint's would be.
_PYTHIA = dict(model_type="gpt_neox", rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu",
               max_position_embeddings=2048, tie_word_embeddings=False)
SHAPES = {
    "Pythia-1B": dict(_PYTHIA, vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                      intermediate_size=8192),
    "Pythia-6.9B": dict(_PYTHIA, vocab_size=50432, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=16384),
    "GPT-J-6B": dict(model_type="gptj", vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                     n_positions=2048, activation_function="gelu_new", tie_word_embeddings=False),
    "Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         hidden_act="silu", tie_word_embeddings=True),
}
KNOWN_MODELS = {  # hub ids the configs name -> SHAPES
    "EleutherAI/pythia-1b-deduped": "Pythia-1B", "EleutherAI/pythia-1b": "Pythia-1B",
    "Dahoas/pythia-1B-static-sft": "Pythia-1B", "EleutherAI/pythia-6.9b": "Pythia-6.9B",
    "EleutherAI/pythia-6.9b-deduped": "Pythia-6.9B",
    "Dahoas/gptj-rm-static": "GPT-J-6B", "Qwen/Qwen2.5-0.5B-Instruct": "Qwen2.5-0.5B",
}
SETTINGS = {  # name -> (config file, policy shape): the P3O paper's HH and TL;DR settings, and chat
    "hh-6.9b": ("configs/hh.py", "Pythia-6.9B"),
    "hh-1b": ("configs/hh.py", None),
    "tldr-1b": ("configs/tldr.py", None),
    "ultrafeedback-0.5b": ("configs/ultrafeedback.py", None),
    "gsm8k-0.5b": ("configs/gsm8k.py", None),
}
PHASES = ("rollout", "log-probs", "reward", "update")


# ----------------------------------------------------------------------------- the setting

@dataclasses.dataclass
class Options:
  """What changes the memory; defaults come from the config (`options_from`)."""
  param_dtype: str
  dtype: str
  frozen_dtype: str
  mu_dtype: str
  sampler_dtype: str
  remat: bool
  micro_batches: int
  rollout_chunk: int
  devices: int = 1
  host_frozen: bool = False   # reference + reward model in host memory during the update
  host_moments: bool = False  # AdamW moments in host memory outside the update
  lora_rank: int = 0          # LoRA adapters on every block kernel (models/lora.py): 0 trains every weight


@dataclasses.dataclass
class Setting:
  name: str
  config: object
  policy: decoder.DecoderConfig
  reward: decoder.DecoderConfig
  policy_name: str
  reward_name: str
  prompt: int
  new: int
  absent: tuple  # config fields this checkout lacks (host offload: no option anywhere yet)

  @property
  def groups_per_minibatch(self) -> int:
    return self.config.rl.prompts_per_rollout // self.config.rl.num_minibatches


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path) if not os.path.isabs(path) else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shape_of(hub_id: str, config, **fields) -> tuple[str, decoder.DecoderConfig]:
  """(name, DecoderConfig) of a model the config names; `fields`: dtypes, heads."""
  if hub_id in KNOWN_MODELS:
    return KNOWN_MODELS[hub_id], hf.config_from_hf(SHAPES[KNOWN_MODELS[hub_id]], **fields)
  if not hub_id and len(config.model.arch):
    arch = dict(config.model.arch)
    arch.setdefault("vocab_size", 64)  # the demo's vocabulary comes from its tokenizer (17 words)
    return "model.arch", decoder.DecoderConfig(**{**arch, **fields})
  raise SystemExit(f"no shape for model {hub_id!r}: add its config.json sizes to KNOWN_MODELS in {__file__}")


def make_setting(name: str) -> Setting:
  path, policy_shape = SETTINGS.get(name, (name, None))
  config = load_config(path)
  m = config.model
  dtypes = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=bool(m.get("scan_layers", False)))
  policy_name, policy = ((policy_shape, hf.config_from_hf(SHAPES[policy_shape], **dtypes)) if policy_shape
                         else shape_of(m.hf, config, **dtypes))
  # No reward_hf: the rm stage trains the policy's backbone with a score head (pipeline.py).
  heads = dict(lm_head=False, scalar_head=True)
  reward_name, reward = (shape_of(m.reward_hf, config, **dtypes, **heads) if m.reward_hf
                         else (policy_name, policy.replace(**heads)))
  absent = tuple(f for f, block in (("optim.mu_dtype", config.optim), ("model.frozen_dtype", config.model),
                                    ("rl.rollout_chunk", config.rl)) if f.split(".")[1] not in block) + ("host offload",)
  return Setting(name, config, policy, reward, policy_name, reward_name, config.data.max_prompt_len,
                 config.sampler.max_new_tokens, absent)


def options_from(s: Setting, devices: int) -> Options:
  c = s.config
  return Options(param_dtype=c.model.param_dtype, dtype=c.model.dtype,
                 frozen_dtype=c.model.get("frozen_dtype") or c.model.param_dtype,
                 mu_dtype=c.optim.get("mu_dtype") or c.model.param_dtype,
                 sampler_dtype=c.sampler.get("param_dtype", "float32"), remat=bool(c.model.remat),
                 micro_batches=int(c.rl.micro_batches),
                 rollout_chunk=int(c.rl.get("rollout_chunk") or c.rl.prompts_per_rollout), devices=devices)


# ----------------------------------------------------------------------------- exact sizes

def nbytes(shape, dtype) -> int:
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def sharded_bytes(shapes, axes, dtype: str, devices: int) -> int:
  """Bytes per device of arrays of `shapes` stored in `dtype`, each FSDP-split along its `embed`
  axis (its logical axes in `axes`) as sharding.RULES does."""
  total = 0
  for shaped, logical in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))):
    split = devices if "embed" in logical and shaped.shape[logical.index("embed")] % devices == 0 else 1
    total += nbytes(shaped.shape, dtype) // split
  return total


@functools.lru_cache(maxsize=None)
def param_bytes(cfg: decoder.DecoderConfig, dtype: str, devices: int) -> int:
  """Bytes per device of cfg's parameters stored in `dtype`, FSDP-split as sharding.RULES does."""
  graph, params = decoder.abstract(cfg)
  return sharded_bytes(params, decoder.logical_axes(graph), dtype, devices)


def adapter_bytes(cfg: decoder.DecoderConfig, rank: int, dtype: str, devices: int) -> int:
  """Bytes per device of rank-`rank` LoRA adapters on every block kernel (`lora.attach`'s shapes,
  float32 as it makes them, or `dtype` for their moments), FSDP-split as their kernels are."""
  graph, params = decoder.abstract(cfg)
  adapters = jax.eval_shape(lambda p: lora.attach(p, decoder.logical_axes(graph), rank=rank, alpha=1.0,
                                                  targets=lora.ALL)[0][lora.KEY], params)
  # The axes do not depend on the sizes: take them from tiny stand-ins of the params.
  axes = lora.attach(jax.tree.map(lambda a: jnp.zeros((1,) * a.ndim), params), decoder.logical_axes(graph),
                     rank=1, alpha=1.0, targets=lora.ALL)[1][lora.KEY]
  return sharded_bytes(adapters, axes, dtype, devices)


def num_params(cfg: decoder.DecoderConfig) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(decoder.abstract(cfg)[1]))


def query_block(cfg: decoder.DecoderConfig, T: int) -> int:
  """Q: the queries whose scores exist at once (decoder.attend: cfg.attention_block, 0 = all)."""
  return min(getattr(cfg, "attention_block", 0) or T, T)


def kv_cache_bytes(cfg: decoder.DecoderConfig, prompts: int, k: int, prompt: int, new: int) -> int:
  """The sampler's KV cache: K and V of every slot, [G, K] per slot and layer, in the activation
  dtype; each prompt's P slots once and N per row (decoder.continue_prefix; with one sample per
  prompt, P + N per row)."""
  slots = prompts * (prompt + k * new)
  return 2 * cfg.num_layers * nbytes((slots, cfg.kv_heads, cfg.dim_per_head), cfg.dtype)


# ----------------------------------------------------------------------------- XLA's temp bytes

def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def temp_bytes(jitted, *args) -> int:
  return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes


def _decode(cfg, prompts, k, prompt, new):
  from p3o_jax import sampling  # noqa: PLC0415
  graph, params = decoder.abstract(cfg)
  run = sampling._compiled(graph, None, (), max_new_tokens=new, num_samples=k, top_k=0, use_top_p=False,
                           greedy=False, eos_id=0, pad_id=0, total_prompts=prompts)  # what generate() calls
  tokens = _sds((prompts, prompt), jnp.int32)
  return temp_bytes(run, params, tokens, tokens, jax.eval_shape(lambda: jax.random.key(0)), _sds((prompts,), jnp.int32),
                    _sds((), jnp.float32), _sds((), jnp.float32), _sds((), jnp.int32))


def _logprobs(cfg, frozen, prompts, k, prompt, new, sampler_cfg):
  graph, params = decoder.abstract(cfg)
  ref = decoder.abstract(frozen)[1]
  roller = Roller(graph, None, None, sampler_cfg=sampler_cfg, eos_id=0, pad_id=0)
  q, r = _sds((prompts, prompt), jnp.int32), _sds((prompts * k, new), jnp.int32)
  return temp_bytes(roller._teacher_forced(None, k, None), params, ref, None, None, q, q, r, r,
                    _sds((prompts * k, new), jnp.float32))


def _reward(cfg, prompts, k, prompt, new):
  """The reward model's pass as the rollout runs it: each prompt once for its k responses."""
  graph, params = decoder.abstract(cfg)
  q, r = _sds((prompts, prompt), jnp.int32), _sds((prompts * k, new), jnp.int32)
  return temp_bytes(ModelReward(graph, params)._score, params, q, q, r, r)


# ----------------------------------------------------------------------------- activations

@dataclasses.dataclass
class Activations:
  """Phase temporaries per device as functions of the options; `how` says where they come from."""
  s: Setting
  method: str
  temps: dict = dataclasses.field(default_factory=dict)  # XLA: name -> (rows measured, temp bytes)
  residuals: dict = dataclasses.field(default_factory=dict)  # (remat, groups, layers) -> bytes

  def measure(self, log=print):
    s, c = self.s, self.s.config
    o = options_from(s, 1)
    K, P, N, chunk = c.rl.k, s.prompt, s.new, o.rollout_chunk
    frozen, sampler = s.policy.replace(param_dtype=o.frozen_dtype), s.policy.replace(param_dtype=o.sampler_dtype)
    jobs = {  # name -> (the model whose depth it runs, its temp bytes)
        "decode": (sampler, lambda: _decode(sampler, chunk, K, P, N)),
        "log-probs": (s.policy, lambda: _logprobs(s.policy, frozen, chunk, K, P, N, c.sampler)),
        "reward": (s.reward, lambda: _reward(s.reward, chunk, K, P, N)),
    }
    for name, (cfg, temp) in jobs.items():
      start = time.perf_counter()
      self.temps[name] = (chunk * K, temp())
      log(f"  compiled {name:>12} at {cfg.num_layers} layers ({chunk * K} rows): "
          f"{self.temps[name][1] / GB:7.3f} GB ({time.perf_counter() - start:.0f} s)", flush=True)

  def _xla(self, name, rows, minus=0) -> tuple[float, str]:
    measured, temp = self.temps[name]
    scaled = "" if rows == measured else f", x {rows}/{measured} rows"
    return (temp - minus) * rows / measured, f"XLA temp bytes (CPU){scaled}"

  def decode(self, o: Options) -> tuple[float, str]:
    s, rows = self.s, o.rollout_chunk * self.s.config.rl.k // o.devices
    if self.method == "xla":  # the sampler's temp bytes hold its KV cache: counted in its own row
      cache = kv_cache_bytes(s.policy, self.temps["decode"][0] // s.config.rl.k, s.config.rl.k, s.prompt, s.new)
      return self._xla("decode", rows, minus=cache)
    p, b, S, cfg = s.prompt, o.rollout_chunk // o.devices, s.prompt + s.new, s.policy
    a = jnp.dtype(o.dtype).itemsize
    v = 8 * b * cfg.num_heads * query_block(cfg, p) * S + 2 * a * b * p * cfg.mlp_width + 12 * rows * cfg.vocab_size
    return v, "analytic: prefill 8·B·H·Q·S (fp32 scores+probs of a query block) + 2·a·B·P·F (MLP) + 12·R·V (logits)"

  def _forward(self, cfg, rows, T, a, logits_len) -> float:
    return (8 * rows * cfg.num_heads * query_block(cfg, T) * T + 2 * a * rows * T * cfg.mlp_width
            + 8 * rows * logits_len * cfg.vocab_size)

  def logprobs(self, o: Options) -> tuple[float, str]:
    s, rows = self.s, o.rollout_chunk * self.s.config.rl.k // o.devices
    if self.method == "xla":
      return self._xla("log-probs", rows)
    return (self._forward(s.policy, rows, s.prompt + s.new, jnp.dtype(o.dtype).itemsize, s.new),
            "analytic: 8·N·H·Q·T (fp32 scores+probs of a query block) + 2·a·N·T·F + 8·N·R·V (fp32 logits, log-softmax)")

  def reward(self, o: Options) -> tuple[float, str]:
    s, rows = self.s, o.rollout_chunk * self.s.config.rl.k // o.devices
    if self.method == "xla":
      return self._xla("reward", rows)
    return (self._forward(s.reward, rows, s.prompt + s.new, jnp.dtype(o.dtype).itemsize, 0),
            "analytic: 8·N·H·Q·T (fp32 scores+probs of a query block) + 2·a·N·T·F")

  def _residuals(self, remat: bool, groups: int, layers: int) -> int:
    """Bytes jax's autodiff keeps for the backward pass of the P3O loss on `groups` groups
    (`saved_residuals` on abstract inputs: the jaxpr, before XLA fuses or rematerialises;
    the parameters themselves excluded)."""
    key = (remat, groups, layers)
    if key not in self.residuals:
      s, k = self.s, self.s.config.rl.k
      graph, params = decoder.abstract(s.policy.replace(remat=remat, num_layers=layers))
      algo = algorithms.create(s.config.rl, graph, s.config.sampler.temperature)
      g = lambda n, dtype=jnp.int32: _sds((groups, k, n), dtype)
      batch = dict(query=_sds((groups, s.prompt), jnp.int32), query_mask=_sds((groups, s.prompt), jnp.int32),
                   response=g(s.new), response_mask=g(s.new),  # the query once per group, as `group` gives it
                   logp_old=g(s.new, jnp.float32), logp_ref=g(s.new, jnp.float32), rewards=_sds((groups, k), jnp.float32))
      saved = saved_residuals(lambda p, b: algo.loss(p, b)[0], params, batch)
      self.residuals[key] = sum(nbytes(a.shape, a.dtype) for a, source in saved if not source.startswith("from the argument"))
    return self.residuals[key]

  def update(self, o: Options) -> tuple[float, str]:
    """Activations of one optimizer step, gradients excluded (their own row)."""
    s, k = self.s, self.s.config.rl.k
    groups = s.groups_per_minibatch // o.devices // o.micro_batches
    rows = groups * k
    cfg, T, a, L = s.policy, s.prompt + s.new, jnp.dtype(o.dtype).itemsize, s.policy.num_layers
    if self.method == "xla":  # the CPU backend's update buffers ignore remat: autodiff's residuals instead
      full = self._residuals(False, groups, L)
      if not o.remat:
        return full, "jax saved_residuals of the P3O loss (kept for the backward pass)"
      block = full - self._residuals(False, groups, L - 1)
      return (self._residuals(True, groups, L) + block,
              "jax saved_residuals with remat + one block's without (recomputed in the backward)")
    Q = query_block(cfg, T)
    # Query-blocked attention (decoder.attend) keeps no scores for the backward: it recomputes
    # one block's [b, H, Q, T] at a time. Unblocked, each layer keeps fp32 probs + their bf16 copy.
    scores = 6 * rows * cfg.num_heads * T * T if Q == T else 0
    layer = a * rows * T * (7 * cfg.hidden_size + 2 * cfg.mlp_width) + scores
    extra = 12 * rows * s.new * cfg.vocab_size + 8 * rows * cfg.num_heads * Q * T
    if o.remat:
      return (L * a * rows * T * cfg.hidden_size + 2 * layer + extra,
              "analytic, remat: L·a·b·T·d (block inputs) + 2 x one block + 12·b·R·V (logits) + 8·b·H·Q·T")
    return (L * layer + extra, "analytic: L·a·b·T·(7d+2F) saved for backward (+ 6·b·H·T² a layer if unblocked) "
                               "+ 12·b·R·V (fp32 logits, grads) + 8·b·H·Q·T (one query block)")


# ----------------------------------------------------------------------------- the table

def items(s: Setting, o: Options, act: Activations) -> list[tuple[str, str, float, str]]:
  """(phase, item, bytes per device, how): phase 'all' lives through the whole iteration."""
  n = o.devices
  params = param_bytes(s.policy, o.param_dtype, n)
  grads = params
  chunk_rows = o.rollout_chunk * s.config.rl.k
  cache = kv_cache_bytes(s.policy, o.rollout_chunk // n, s.config.rl.k, s.prompt, s.new)
  shape = "eval_shape" + (f", FSDP / {n}" if n > 1 else "")
  # The update reads neither frozen model (logp_ref is in the batch); only the update reads the moments.
  frozen = ("rollout", "log-probs", "reward") if o.host_frozen else ("all",)
  moments = ("update",) if o.host_moments else ("all",)
  if o.lora_rank:  # adapters train; the frozen model is also the reference (models/lora.py)
    adapters = lambda dtype: adapter_bytes(s.policy, o.lora_rank, dtype, n)
    grads = adapters("float32")
    out = [
        ("all", f"policy params ({o.param_dtype}, frozen; also the reference)", params, shape),
        ("all", f"LoRA adapters, rank {o.lora_rank} (float32, trainable)", adapters("float32"), shape),
        *[(ph, f"AdamW mu ({o.mu_dtype}, adapters)", adapters(o.mu_dtype), shape) for ph in moments],
        *[(ph, "AdamW nu (float32, adapters)", adapters("float32"), shape) for ph in moments],
    ]
  else:
    out = [
        ("all", f"policy params ({o.param_dtype}, trainable)", params, shape),
        *[(ph, f"AdamW mu ({o.mu_dtype})", param_bytes(s.policy, o.mu_dtype, n), shape) for ph in moments],
        *[(ph, "AdamW nu (float32)", param_bytes(s.policy, "float32", n), shape) for ph in moments],
        *[(ph, f"reference params ({o.frozen_dtype}, frozen)", param_bytes(s.policy, o.frozen_dtype, n), shape)
          for ph in frozen],
    ]
  out += [
      *[(ph, f"reward model params ({o.frozen_dtype}, frozen)", param_bytes(s.reward, o.frozen_dtype, n), shape)
        for ph in frozen],
  ]
  if o.sampler_dtype != o.param_dtype:
    out.append(("rollout", f"sampler copy of the policy ({o.sampler_dtype})", param_bytes(s.policy, o.sampler_dtype, n), shape))
  out += [
      ("rollout", f"KV cache ({o.rollout_chunk // n} prompts x {s.prompt} + {chunk_rows // n} rows x {s.new} slots)",
       cache, "2·L·slots·G·K·a"),
      ("rollout", "decode activations (prefill, logits)", *act.decode(o)),
      ("log-probs", f"old + ref log-probs pass ({chunk_rows // n} rows)", *act.logprobs(o)),
      ("reward", f"reward model pass ({chunk_rows // n} rows)", *act.reward(o)),
      ("update", f"gradients ({'float32, adapters' if o.lora_rank else o.param_dtype})", grads, shape),
      ("update", f"update activations ({'remat' if o.remat else 'no remat'}, "
                 f"{s.groups_per_minibatch // n // o.micro_batches * s.config.rl.k} rows)", *act.update(o)),
  ]
  return out


def peak(rows) -> tuple[str, float]:
  """(peak phase, its total)."""
  totals = {p: sum(b for ph, _, b, _ in rows if ph in ("all", p)) for p in PHASES}
  phase = max(totals, key=totals.get)
  return phase, totals[phase]


FIXES = [  # (label, config field, change) in order of cost: free first, more devices last
    ("model.remat=True", "model.remat", lambda o: dict(remat=True)),
    ("frozen models in bfloat16", "model.frozen_dtype", lambda o: dict(frozen_dtype="bfloat16")),
    ("AdamW mu in bfloat16", "optim.mu_dtype", lambda o: dict(mu_dtype="bfloat16")),
    *[(f"rl.micro_batches={m}", "rl.micro_batches", lambda o, m=m: dict(micro_batches=max(o.micro_batches, m)))
      for m in (2, 4, 8)],
    *[(f"rl.rollout_chunk={c}", "rl.rollout_chunk", lambda o, c=c: dict(rollout_chunk=min(o.rollout_chunk, c)))
      for c in (32, 16, 8)],
    ("frozen models in host memory during the update", "host offload", lambda o: dict(host_frozen=True)),
    ("AdamW moments in host memory outside the update", "host offload", lambda o: dict(host_moments=True)),
    *[(f"FSDP over {n} devices", "mesh.fsdp", lambda o, n=n: dict(devices=max(o.devices, n))) for n in (2, 4, 8)],
]


def fixes(s: Setting, o: Options, act: Activations, budget: float, skip=()) -> tuple[list, Options]:
  """Options applied one at a time, keeping those that lower the peak, until it fits: the steps
  (label, total, fits) and the options reached. `skip`: config fields not to try."""
  steps, current, remaining = [], peak(items(s, o, act))[1], list(FIXES)
  progress = True
  while current > budget and progress:  # after each change, again from the cheapest: the peak phase may have moved
    progress = False
    for fix in list(remaining):
      label, field, change = fix
      trial = dataclasses.replace(o, **change(o))
      if (current <= budget or field in skip or (s.groups_per_minibatch // trial.devices) % trial.micro_batches
          or s.config.rl.prompts_per_rollout % trial.rollout_chunk):
        continue
      total = peak(items(s, trial, act))[1]
      if total < current - 1e6:
        o, current, progress = trial, total, True
        remaining.remove(fix)
        missing = f"  [needs {field}: not in this checkout]" if "." in field else "  [no option for it yet]"
        steps.append((label + (missing if field in s.absent else ""), total, current <= budget))
        break
  return steps, o


def report(s: Setting, o: Options, act: Activations, hbm: float) -> float:
  rows = items(s, o, act)
  phase, total = peak(rows)
  c = s.config
  print(f"\n{s.name}: P3O {c.rl.variant}, policy {s.policy_name} ({num_params(s.policy) / 1e9:.2f}B params) + "
        f"reference (same), reward model {s.reward_name} ({num_params(s.reward) / 1e9:.2f}B)")
  print(f"  prompt {s.prompt} + {s.new} new tokens; {c.rl.prompts_per_rollout} prompts x K={c.rl.k} per rollout "
        f"(chunk {o.rollout_chunk} prompts); minibatch {s.groups_per_minibatch} groups = "
        f"{s.groups_per_minibatch * c.rl.k} rows, {o.micro_batches} micro-batch(es); activations {o.dtype}; "
        f"{o.devices} device(s)")
  absent = [f for f in s.absent if "." in f]
  if absent:
    print(f"  not in this checkout (current behaviour assumed): {', '.join(absent)}")
  print(f"\n  {'phase':<10} {'item':<58} {'GB/device':>10}  how")
  shown = [r for r in rows if r[0] in ("all", phase)]
  for ph, name, b, how in shown:
    print(f"  {ph:<10} {name:<58} {b / GB:10.2f}  {how}")
  print(f"  {'':<10} {'total (peak phase: ' + phase + ')':<58} {total / GB:10.2f}")
  others = "; ".join(f"{p} {sum(b for ph, _, b, _ in rows if ph in ('all', p)) / GB:.2f}" for p in PHASES if p != phase)
  print(f"  other phases (GB): {others}")
  if act.method == "xla":
    alt = Activations(s, "analytic")
    alt_phase, alt_total = peak(items(s, o, alt))
    alt_fix = fixes(s, o, alt, 0.9 * hbm * GB)[0]
    print(f"  with --method analytic: {alt_total / GB:.2f} GB (peak phase: {alt_phase})"
          + (f"; fits after: {', '.join(label.split('  [')[0] for label, _, _ in alt_fix)} -> {alt_fix[-1][1] / GB:.2f} GB"
             if alt_fix else ""))
  budget = 0.9 * hbm * GB
  if total <= budget:
    print(f"\n  FITS {hbm:g} GB with {1 - total / (hbm * GB):.0%} headroom (>= 10% needed: <= {budget / GB:.1f} GB)")
  else:
    over = "over the HBM" if total > hbm * GB else "inside the HBM but"
    print(f"\n  DOES NOT FIT {hbm:g} GB with 10% headroom: {total / GB:.1f} GB > {budget / GB:.1f} GB, by "
          f"{(total - budget) / GB:.1f} GB ({over} {(total - hbm * GB) / GB:+.1f} GB against the whole {hbm:g} GB)")
    print("  what fixes it (cumulative, cheapest first, each kept only if it lowers the peak):")
    steps, fixed = fixes(s, o, act, budget)
    for label, t, ok in steps:
      print(f"    + {label:<64} {t / GB:8.2f} GB  {'fits' if ok else ''}")
    after = items(s, fixed, act)
    print("    then, per phase (GB): " + "; ".join(
        f"{p} {sum(b for ph, _, b, _ in after if ph in ('all', p)) / GB:.2f}" for p in PHASES))
  return total


def estimate(name: str, *, devices: int = 1, method: str = "xla", log=print) -> tuple[Setting, Options, Activations]:
  s = make_setting(name)
  act = Activations(s, method)
  if method == "xla":
    act.measure(log)
  return s, options_from(s, devices), act


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("setting", help=f"one of {', '.join(SETTINGS)}, or a config file (configs/x.py)")
  parser.add_argument("--hbm", type=float, required=True, help="device memory in GB (1e9 bytes)")
  parser.add_argument("--devices", type=int, default=1, help="FSDP over N devices")
  parser.add_argument("--method", choices=("xla", "analytic"), default="xla")
  parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                      help="LoRA adapters of this rank on every block kernel; the update's activations are "
                           "counted as training every weight's (an upper estimate)")
  args = parser.parse_args()
  print(f"jax {jax.__version__} ({jax.default_backend()} backend for the memory analysis); GB = 1e9 bytes", flush=True)
  s, o, act = estimate(args.setting, devices=args.devices, method=args.method)
  report(s, dataclasses.replace(o, lora_rank=args.lora), act, args.hbm)


if __name__ == "__main__":
  sys.exit(main())
