"""One configurable decoder-only transformer: GPT-2, GPT-NeoX (Pythia), GPT-J, Llama, Mistral,
Qwen2, Qwen3, OLMo 2.

Shape letters used in comments:
  B batch, T query length, S key (cache) length, D model width, V vocab,
  H query heads, G key/value heads (GQA), R = H // G, K head dim, F MLP width.

| family   | norm      | position                   | residual           | MLP    | biases       | tied |
|----------|-----------|----------------------------|--------------------|--------|--------------|------|
| gpt2     | LayerNorm | learned                    | sequential         | GELU   | all          | yes  |
| gpt_neox | LayerNorm | rotary (partial)           | parallel           | GELU   | all          | no   |
| gptj     | LayerNorm | rotary (partial, pairwise) | parallel, one norm | GELU   | MLP, LM head | no   |
| llama    | RMSNorm   | rotary                     | sequential         | SwiGLU | none         | opt. |
| qwen2    | RMSNorm   | rotary                     | sequential         | SwiGLU | q, k, v only | opt. |
| qwen3    | RMSNorm * | rotary                     | sequential         | SwiGLU | opt.         | opt. |
| mistral  | RMSNorm   | rotary                     | sequential         | SwiGLU | none         | opt. |
| olmo2    | RMSNorm **| rotary                     | sequential         | SwiGLU | none         | opt. |

*  also on each head's queries and keys, before the rotary.
** on each sublayer's output before the residual adds it (not on its input), and on all heads'
   queries and keys at once, before the rotary.
Mistral is Llama with a sliding window, which this decoder does not apply: sequences longer than
the window are refused.

Rotary frequencies can be rescaled for long contexts as Hugging Face's `rope_scaling` does:
`linear` (position interpolation) and `llama3` (Llama 3.1+: long wavelengths divided by a factor,
short ones kept, a smooth blend between).

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `norm`); `p3o_jax.sharding` maps them to mesh axes, so this file knows no mesh.

The module is used functionally on hot paths: `split(model)` gives a static graph and a
plain dict of arrays; `merge(graph, params)` rebuilds the module inside a jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from p3o_jax.models import lora

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None      # None: same as num_heads (no GQA)
  head_dim: int | None = None          # None: hidden_size // num_heads
  intermediate_size: int | None = None  # None: 4 * hidden_size
  max_position_embeddings: int = 2048
  norm: str = "layernorm"              # "layernorm" | "rmsnorm"
  norm_eps: float = 1e-5
  mlp: str = "gelu"                    # "gelu": down(act(up x)); "swiglu": down(act(gate x) * up x)
  activation: str = "gelu_new"         # gelu_new (tanh), gelu (exact), relu, silu
  position: str = "rotary"             # "learned" | "rotary"
  rotary_pct: float = 1.0              # fraction of head_dim that is rotated (Pythia: 0.25)
  rope_theta: float = 10000.0
  rope_type: str = "default"           # "default" | "linear" | "llama3": HF's rope_scaling, see `rope_frequencies`
  rope_factor: float = 1.0             # frequencies divided by it (linear: all; llama3: the slow ones)
  rope_low_freq_factor: float = 1.0    # llama3: wavelengths above original / low are divided,
  rope_high_freq_factor: float = 4.0   # llama3: those below original / high kept, the rest blended
  rope_original_max_positions: int = 8192  # llama3: the pre-training context length
  sliding_window: int | None = None    # keys older than this are masked (Mistral); the attention here
                                       # sees every earlier key, the same up to this many tokens, so
                                       # longer sequences are refused (`batching.check_positions`)
  rotary_interleaved: bool = False     # rotate feature pairs (2i, 2i+1) (GPT-J), not halves (NeoX, Llama)
  parallel_residual: bool = False      # x + attn(ln1 x) + mlp(ln2 x)  (GPT-NeoX)
  shared_norm: bool = False            # parallel residual with one norm: x + attn(ln x) + mlp(ln x) (GPT-J)
  qkv_bias: bool = False
  qk_norm: str = ""                    # RMSNorm on q and k before the rotary: "head" over each head's
                                       # features (Qwen3), "width" over all heads' at once (OLMo 2)
  norm_position: str = "pre"           # "pre": x + f(norm(x)); "post": x + norm(f(x)) (OLMo 2)
  out_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = False
  lm_head_bias: bool = False           # GPT-J's LM head has a bias
  lm_head: bool = True                 # False for a reward model backbone
  scalar_head: bool = False            # value / reward head: hidden -> 1
  scalar_head_bias: bool = False
  model_type: str = "llama"            # the Hugging Face family it exports as
  dtype: str = "float32"               # activations
  param_dtype: str = "float32"
  init_std: float = 0.02
  attention_block: int = 512           # queries per attention block (0: all at once); see `attend`
  remat: bool = False                  # recompute each block in the backward pass: activation
                                       # memory of one block instead of all, ~1/3 more compute
  scan_layers: bool = False            # blocks' params stacked on a leading `layers` axis and run
                                       # by one lax.scan: compile time independent of depth
  matmul_dtype: str = ""               # inputs of every weight matmul ("": the activations' dtype),
                                       # always accumulated in float32; see `weight_matmul`

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def mlp_width(self) -> int:
    return self.intermediate_size or 4 * self.hidden_size

  def replace(self, **kwargs) -> "DecoderConfig":
    return dataclasses.replace(self, **kwargs)

  def __post_init__(self):
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}")
    for field, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                           ("position", ("learned", "rotary")), ("activation", tuple(ACTIVATIONS)),
                           ("dtype", tuple(DTYPES)), ("param_dtype", tuple(DTYPES))):
      if getattr(self, field) not in allowed:
        raise ValueError(f"DecoderConfig.{field}={getattr(self, field)!r}; expected one of {allowed}")
    if self.matmul_dtype not in ("", *DTYPES):
      raise ValueError(f"DecoderConfig.matmul_dtype={self.matmul_dtype!r}; expected '' or one of {tuple(DTYPES)}")
    if self.shared_norm and not self.parallel_residual:
      raise ValueError("DecoderConfig.shared_norm=True needs parallel_residual=True")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"DecoderConfig.sliding_window={self.sliding_window}; expected None or a positive number of tokens")
    for field, allowed in (("qk_norm", ("", "head", "width")), ("norm_position", ("pre", "post"))):
      if getattr(self, field) not in allowed:
        raise ValueError(f"DecoderConfig.{field}={getattr(self, field)!r}; expected one of {allowed}")
    if self.norm_position == "post" and self.parallel_residual:
      raise ValueError("DecoderConfig.norm_position='post' needs a sequential residual (parallel_residual=False)")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"DecoderConfig.rope_type={self.rope_type!r}; expected one of {ROPE_TYPES}")
    if self.rope_type != "default" and not self.rope_factor >= 1.0:
      raise ValueError(f"DecoderConfig.rope_factor={self.rope_factor}; a {self.rope_type} RoPE scaling needs >= 1")
    if self.rope_type == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise ValueError(f"DecoderConfig.rope_low_freq_factor={self.rope_low_freq_factor}, rope_high_freq_factor="
                       f"{self.rope_high_freq_factor}; llama3 scaling needs 0 < low < high")


ROPE_TYPES = ("default", "linear", "llama3")

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    # Exact GELU as torch writes it; jax.nn.gelu's erfc form costs twice as much on CPU.
    "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476)),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def weight_matmul(cfg: DecoderConfig, subscripts: str, x, w, out_dtype=None):
  """einsum(x, w) for activations x and a weight w: both read in cfg.matmul_dtype (default: x's
  dtype), the products summed in float32, the result in `out_dtype` (default: x's dtype).

  bfloat16 inputs with float32 sums are what TPUs and GPUs run natively, and XLA:CPU runs them
  on the CPU's bf16 matrix units (AMX / AVX512-BF16) several times faster than float32 here
  (bench/rl_iteration.py); a bf16 x bf16 -> bf16 dot takes a slower path on CPU and sums in bf16.

  A LoRA kernel (`lora.Adapted`) runs as x W + (x A) B, each product as above.
  """
  if isinstance(w, lora.Adapted):
    return _adapted_matmul(cfg, subscripts, x, w, out_dtype)
  dtype = DTYPES[cfg.matmul_dtype] if cfg.matmul_dtype else x.dtype
  if dtype == jnp.float32:
    inputs, out_sub = subscripts.split("->")
    x_sub, w_sub = inputs.split(",")
    if x_sub[:2] == "bt" and out_sub[:2] == "bt" and not {"b", "t"} & set(w_sub):
      # Batch and time as one row axis: the weight gradient becomes one plain 2-D dot instead of a
      # contraction over two axes that XLA:CPU transposes first (fp32 fwd+bwd 12% faster here).
      # bf16 keeps the 3-D form: XLA:CPU's bf16 kernels reject some of the 2-D backward dots.
      B, T = x.shape[:2]
      flat = jnp.einsum(f"{x_sub[1:]},{w_sub}->{out_sub[1:]}", x.reshape(B * T, *x.shape[2:]).astype(dtype),
                        w.astype(dtype), preferred_element_type=jnp.float32)
      return flat.reshape(B, T, *flat.shape[1:]).astype(out_dtype or x.dtype)
    out = jnp.einsum(subscripts, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  else:
    out = _low_precision_einsum(subscripts, jnp.dtype(dtype), jnp.dtype(x.dtype), jnp.dtype(w.dtype), x, w)
  return out.astype(out_dtype or x.dtype)


def _adapted_matmul(cfg: DecoderConfig, subscripts: str, x, w, out_dtype=None):
  """x W + (x A) B for a kernel's subscripts (its input letters, then its output letters): the
  rank axis r between the two small products. W is frozen, so the backward forms no gradient
  of it, only of A and B and of x."""
  inputs, out = subscripts.split("->")
  x_sub, w_sub = inputs.split(",")
  if "r" in subscripts:
    raise ValueError(f"subscripts {subscripts!r} use the letter the rank axis takes")
  contracted = "".join(c for c in w_sub if c in x_sub)
  w_out = "".join(c for c in w_sub if c not in x_sub)
  rows = "".join(c for c in x_sub if c not in w_sub)
  base = weight_matmul(cfg, subscripts, x, w.w, jnp.float32)
  xa = weight_matmul(cfg, f"{x_sub},{contracted}r->{rows}r", x, w.a, jnp.float32)
  low = weight_matmul(cfg, f"{rows}r,r{w_out}->{out}", xa, w.b, jnp.float32)
  return (base + low).astype(out_dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _low_precision_einsum(subscripts: str, dtype, x_dtype, w_dtype, x, w):
  """float32 einsum of x and w read in `dtype`, whose backward pass multiplies in `dtype` too
  (the cotangent cast to it, sums in float32) and returns gradients in x's and w's own dtypes;
  autodiff alone would multiply the float32 cotangent by the low-precision operand, the slow
  mixed path. Subscripts as `weight_matmul` uses them: every index of one operand is in the
  other operand or in the output."""
  return _low_precision_einsum_fwd(subscripts, dtype, x_dtype, w_dtype, x, w)[0]


def _low_precision_einsum_fwd(subscripts, dtype, x_dtype, w_dtype, x, w):
  low_x, low_w = x.astype(dtype), w.astype(dtype)
  out = jnp.einsum(subscripts, low_x, low_w, preferred_element_type=jnp.float32)
  return out, (low_x, low_w)  # residuals in low precision: half the memory


def _low_precision_einsum_bwd(subscripts, dtype, x_dtype, w_dtype, residuals, g):
  low_x, low_w = residuals
  inputs, out = subscripts.split("->")
  x_sub, w_sub = inputs.split(",")
  g = g.astype(dtype)
  dx = jnp.einsum(f"{out},{w_sub}->{x_sub}", g, low_w, preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{x_sub},{out}->{w_sub}", low_x, g, preferred_element_type=jnp.float32)
  return dx.astype(x_dtype), dw.astype(w_dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def _cpu_flags() -> frozenset[str]:
  """The host CPU's feature flags (Linux /proc/cpuinfo; none known elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ()))
  except OSError:
    return frozenset()


_HAS_AMX = "amx_tile" in _cpu_flags()
# How a float32 decode loop on a CPU reads the LM head (`Decoder.decoding_logits`), measured per
# CPU with 16 rows. An Intel Xeon with AMX multiplies them by a [V, D] head of width 512-1024
# 1.2-2x faster than by the stored [D, V]: the narrowest head read that way (None: never).
REPEATED_HEAD_ROWS_MIN_WIDTH = 512 if _HAS_AMX else None
# An AMD EPYC (Zen 4) multiplies 16 rows by the stored [D, V] head, the dot's right operand, at a
# third of its memory's read rate. Laid out [V, D] as the LEFT operand, the logits come out [V, B]
# and plain sampling reads them in that layout (`sampling.sample_vocab_first`): head and sampling
# 1.15-1.7x faster alone at D = 512-2048, V = 16K-152K, the Pythia-70M decode loop 2-6% (its head
# is a third of a step; docs/speed.md). At D = 256, V = 4096 or in bf16 the stored layout is as
# fast or faster.
VOCAB_FIRST_MIN_WIDTH = None if _HAS_AMX else 512
VOCAB_FIRST_MIN_VOCAB = 8192


class LayerCache(NamedTuple):
  # Heads before slots, the layout the attention dots read: a [B, S, G, K] cache would be
  # transposed in full at every decode step. With scan_layers one LayerCache holds every
  # layer, [B, L, G, S, K]: batch stays first, so code that repeats or splits rows is the same.
  k: jax.Array  # [B, G, S, K]
  v: jax.Array  # [B, G, S, K]


class PrefixedCache(NamedTuple):
  """A cache whose first P slots hold B prefixes that K rows each continue (row b * K + k
  continues prefix b): a prompt and its K responses. The prefix's keys and values are kept once,
  not repeated K times, so a step reads and holds them once (`attend`'s `prefix`). Slots keep
  their meaning: slot s < P is prefix slot s, slot P + j is the row's own slot j, so masks and
  cache indices are the same as for a LayerCache of P + N slots. Made by `continue_prefix`;
  with scan_layers each field holds every layer, the layer axis second. D: dims per head."""
  k: jax.Array         # [B * K, G, N, D] the rows' own slots
  v: jax.Array         # [B * K, G, N, D]
  # The prefix's, written once by its pass. Its keys transposed: a decode step's K queries of a
  # prefix then make its scores one [K, D] x [D, P] product, which XLA:CPU runs faster than
  # with the keys as [P, D] (docs/speed.md).
  prefix_k: jax.Array  # [B, G, D, P]
  prefix_v: jax.Array  # [B, G, P, D]


def _param(rngs: nnx.Rngs, cfg: DecoderConfig, shape, axes, init="normal") -> nnx.Param:
  dtype = DTYPES[cfg.param_dtype]
  if init == "normal":
    value = cfg.init_std * jax.random.normal(rngs.params(), shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Norm(nnx.Module):
  """LayerNorm or RMSNorm over the last axis (`width` features, default the model's), in float32."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, width: int | None = None):
    self.kind, self.eps = cfg.norm, cfg.norm_eps
    width = width or cfg.hidden_size
    self.scale = _param(rngs, cfg, (width,), ("norm",), "ones")
    self.bias = _param(rngs, cfg, (width,), ("norm",), "zeros") if cfg.norm == "layernorm" else None

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
    # HF's RMSNorm casts back to the activation dtype before scaling; LayerNorm scales in fp32.
    if self.kind == "rmsnorm":
      return self.scale[...].astype(dtype) * x.astype(dtype)
    x = x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return x.astype(dtype)


def rope_frequencies(cfg: DecoderConfig, rot_dim: int):
  """The rot_dim/2 rotary frequencies (radians per position) in float32, with transformers'
  `rope_scaling` applied:
  - linear: every frequency divided by `rope_factor` (position interpolation);
  - llama3: a wavelength 2 pi / f beyond original / low_freq_factor is stretched by the factor,
    one below original / high_freq_factor kept, and one between blended linearly in
    original / wavelength (Llama 3.1's frequency-dependent scaling)."""
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
  if cfg.rope_type == "linear":
    return inv_freq / cfg.rope_factor
  if cfg.rope_type == "llama3":
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_positions
    wavelength = 2 * jnp.pi / inv_freq
    stretched = jnp.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return jnp.where(between, blended, stretched)
  return inv_freq


def rotary_tables(positions, inv_freq, interleaved: bool = False):
  """cos, sin of shape [B, T, rot_dim] for the rot_dim/2 frequencies `inv_freq`: frequency i at
  features (i, i + rot_dim/2) for the rotate-half convention (NeoX, Llama), at features (2i, 2i+1)
  when interleaved (GPT-J)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot_dim/2]
  if interleaved:
    angles = jnp.repeat(angles, 2, axis=-1)
  else:
    angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin, rot_dim: int, interleaved: bool = False):
  """x: [B, T, N, K]; rotates the first rot_dim features of each head."""
  x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
  if interleaved:  # GPT-J's rotate_every_two: (a, b) -> (-b, a) for each pair (2i, 2i+1)
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot_dim // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x_rot.shape)
  else:
    half = rot_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x_rot = (x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
  return jnp.concatenate([x_rot, x_pass], axis=-1)


def take_rows(x, rows):
  """x [B, T, ...] at the chunk positions rows [B, T'] -> [B, T', ...]."""
  index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _softmax_view(scores, queries: int):
  """scores [..., S] without their size-1 axes before S, for the softmax over S. XLA:CPU's fused
  reductions (YNNPACK) ran 5-10x slower on a shape with a size-1 axis, which the scores have
  wherever R = 1 (no grouped-query heads): 3.9 ms of thread time in the tiny policy's 40 ms
  update (docs/speed.md). Only size-1 axes go, so no two axes merge, whatever the mesh shards.
  A decode step (one query) keeps its axes: the sampler measured no faster with the view."""
  if queries == 1:
    return scores
  return scores.reshape(*(n for n in scores.shape[:-1] if n != 1), scores.shape[-1])


def _attend_all(q, k, v, mask):
  """Softmax attention of every query over every key: q [B, T, G, R, K], k, v [B, G, S, K],
  mask [B, T, S] -> [B, T, G, R, K]. Scores and softmax in float32."""
  scores = jnp.einsum("btgrk,bgsk->bgrts", q, k).astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(_softmax_view(scores, q.shape[1]), axis=-1).reshape(scores.shape).astype(v.dtype)
  return jnp.einsum("bgrts,bgsk->btgrk", probs, v)


def _attend_prefixed(q, k, v, mask, prefix_k, prefix_v):
  """`_attend_all` over the keys of a `PrefixedCache`: q [B * K, T, G, R, D] (row b * K + k),
  the rows' own k, v [B * K, G, N, D], the shared prefix_k [B, G, D, P] and prefix_v [B, G, P, D], mask
  [B * K, T, P + N] over prefix slots then own slots. One softmax over both key sets, as over
  their concatenation, with each prefix read once for its K rows. Scores stay in the layouts
  the dots make ([B, G, K, T, R, P] per prefix, [B * K, G, T, R, N] per row), so no cache is
  copied into another layout; only their per-query peaks and sums move between the two."""
  RK, T, G, R, D = q.shape
  B, P = prefix_k.shape[0], prefix_k.shape[3]
  K = RK // B
  scale, low = jnp.sqrt(jnp.float32(D)), jnp.finfo(jnp.float32).min
  to_rows = lambda x: x.swapaxes(1, 2).reshape(RK, G, T, R)  # [B, G, K, T, R] -> [B * K, G, T, R]
  to_prefixes = lambda x: x.reshape(B, K, G, T, R).swapaxes(1, 2)
  s_prefix = jnp.einsum("bktgrd,bgds->bgktrs", q.reshape(B, K, T, G, R, D), prefix_k).astype(jnp.float32) / scale
  s_own = jnp.einsum("btgrd,bgsd->bgtrs", q, k).astype(jnp.float32) / scale
  s_prefix = jnp.where(mask[..., :P].reshape(B, K, T, P)[:, None, :, :, None, :], s_prefix, low)
  s_own = jnp.where(mask[..., P:][:, None, :, None, :], s_own, low)
  sp, so = _softmax_view(s_prefix, T), _softmax_view(s_own, T)
  back = lambda x, s: x.reshape(s.shape[:-1])  # a per-query result on a view, in s's axes
  over = lambda x, view: x.reshape(view.shape[:-1])[..., None]  # per-query values against a view's keys
  peak = jnp.maximum(to_rows(back(sp.max(-1), s_prefix)), back(so.max(-1), s_own))  # [B * K, G, T, R]
  e_prefix = jnp.exp(sp - over(to_prefixes(peak), sp))
  e_own = jnp.exp(so - over(peak, so))
  total = to_rows(back(e_prefix.sum(-1), s_prefix)) + back(e_own.sum(-1), s_own)
  p_prefix = (e_prefix / over(to_prefixes(total), sp)).reshape(s_prefix.shape)
  p_own = (e_own / over(total, so)).reshape(s_own.shape)
  out_prefix = jnp.einsum("bgktrs,bgsd->bgktrd", p_prefix.astype(v.dtype), prefix_v, preferred_element_type=jnp.float32)
  out_own = jnp.einsum("bgtrs,bgsd->bgtrd", p_own.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out_prefix.swapaxes(1, 2).reshape(RK, G, T, R, D) + out_own
  return out.transpose(0, 2, 1, 3, 4).astype(v.dtype)


def attend(q, k, v, mask, block: int = 0, prefix=None):
  """`_attend_all` one block of `block` queries at a time (0: all at once); over a shared
  prefix's keys and values too when `prefix` is (prefix_k, prefix_v) (`_attend_prefixed`).

  Each block sees all S keys under its own mask rows, so the result is the same for any mask
  and any block. Only one block's [B, H, block, S] float32 scores exist at a time, and no layer
  keeps its scores for the backward pass, which recomputes them from q and k (as FlashAttention
  does): without that, a short pass (a prompt of <= `block` tokens, the responses after it)
  would keep every layer's scores until the backward.
  """
  B, T = q.shape[:2]
  attend_all = _attend_all if prefix is None else lambda q, k, v, mask: _attend_prefixed(q, k, v, mask, *prefix)
  if not block or T <= block:
    return jax.checkpoint(attend_all)(q, k, v, mask)
  n = -(-T // block)
  pad = n * block - T  # padded query rows see no key; they are cut off below
  q = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * (q.ndim - 2))
  mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  blocks = lambda x: x.reshape(B, n, block, *x.shape[2:]).swapaxes(0, 1)  # [n, B, block, ...]
  one = jax.checkpoint(lambda qm: attend_all(qm[0], k, v, qm[1]))
  out = jax.lax.map(one, (blocks(q), blocks(mask)))
  return out.swapaxes(0, 1).reshape(B, n * block, *out.shape[3:])[:, :T]


class Attention(nnx.Module):

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, G, K = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    self.q_kernel = _param(rngs, cfg, (D, H, K), ("embed", "heads", "head_dim"))
    self.k_kernel = _param(rngs, cfg, (D, G, K), ("embed", "kv_heads", "head_dim"))
    self.v_kernel = _param(rngs, cfg, (D, G, K), ("embed", "kv_heads", "head_dim"))
    self.o_kernel = _param(rngs, cfg, (H, K, D), ("heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, cfg, (H, K), ("heads", "head_dim"), "zeros")
      self.k_bias = _param(rngs, cfg, (G, K), ("kv_heads", "head_dim"), "zeros")
      self.v_bias = _param(rngs, cfg, (G, K), ("kv_heads", "head_dim"), "zeros")
    if cfg.out_bias:
      self.o_bias = _param(rngs, cfg, (D,), ("embed",), "zeros")
    if cfg.qk_norm:
      width = cfg.qk_norm == "width"
      self.q_norm, self.k_norm = Norm(cfg, rngs, width=H * K if width else K), Norm(cfg, rngs, width=G * K if width else K)

  def stack_projections(self):
    """For a loop that calls this layer many times with the same weights (decoding): stack the
    k and v kernels once into one [D, 2, G, K] weight, with q's as well ([D, 3, H, K]) when it
    has as many heads, so a step runs one projection dot instead of three. A decode step's dots
    have few rows and are bound by reading their weights, and each dot is a task of its own for
    XLA:CPU's threads; on a 2-core Zen 4 one stacked dot made the Pythia-70M shape's decode step
    4-8% faster (docs/speed.md, bench/sampler.py). The new axis is unsharded, so any head sharding
    carries over."""
    names = ("q", "k", "v") if self.cfg.num_heads == self.cfg.kv_heads else ("k", "v")
    if any(isinstance(getattr(self, f"{name}_kernel")[...], lora.Adapted) for name in names):
      return  # LoRA kernels (x W + (x A) B) are run one by one
    stack = lambda suffix, axis: jax.lax.optimization_barrier(  # laid out once, before the loop
        jnp.stack([getattr(self, f"{name}_{suffix}")[...] for name in names], axis=axis))
    self._stacked = nnx.data((stack("kernel", 1), stack("bias", 0) if self.cfg.qkv_bias else None))

  def _project(self, x, rows=None):
    """q [B, T, H, K] (at `rows` only, [B, T', H, K], when given), k and v [B, T, G, K]; from
    the stacked weight once there is one."""
    cfg = self.cfg
    with_bias = lambda out, bias: out if bias is None else out + bias.astype(x.dtype)

    def one(name, x=x):
      bias = getattr(self, f"{name}_bias")[...] if cfg.qkv_bias else None
      return with_bias(weight_matmul(cfg, "btd,dnk->btnk", x, getattr(self, f"{name}_kernel")[...]), bias)
    stacked = getattr(self, "_stacked", None)
    if rows is not None:
      return one("q", take_rows(x, rows)), one("k"), one("v")
    if stacked is None:
      return one("q"), one("k"), one("v")
    kernel, bias = stacked
    out = with_bias(weight_matmul(cfg, "btd,dcnk->btcnk", x, kernel), bias)  # [B, T, 3 or 2, N, K]
    parts = tuple(out[:, :, i] for i in range(out.shape[2]))
    return parts if len(parts) == 3 else (one("q"), *parts)

  def __call__(self, x, positions, mask, cache: LayerCache | None, cache_index, layer=None, rows=None):
    """layer: None, or this layer's index into a stacked [B, L, G, S, K] cache (scan_layers).
    rows: None, or [B, T'] indices into this chunk: keys and values are made at every position,
    queries (and so the output, [B, T', D]) only at these."""
    cfg = self.cfg
    dtype = x.dtype
    q, k, v = self._project(x, rows)
    if cfg.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    elif cfg.qk_norm == "width":  # [B, T, N, K] normalised as [B, T, N * K]
      across = lambda norm, y: norm(y.reshape(*y.shape[:2], -1)).reshape(y.shape)
      q, k = across(self.q_norm, q), across(self.k_norm, k)
    if rows is not None:
      mask = take_rows(mask, rows)
    if cfg.position == "rotary":
      rot_dim = int(cfg.dim_per_head * cfg.rotary_pct)
      inv_freq = rope_frequencies(cfg, rot_dim)
      tables = lambda at: rotary_tables(at, inv_freq, cfg.rotary_interleaved)
      k_tables = tables(positions)
      q_tables = k_tables if rows is None else tables(take_rows(positions, rows))
      q = apply_rotary(q, *q_tables, rot_dim, cfg.rotary_interleaved)
      k = apply_rotary(k, *k_tables, rot_dim, cfg.rotary_interleaved)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, T, K]
    prefix = None
    if isinstance(cache, PrefixedCache):  # slot P + j is the rows' own slot j
      prefix = (cache.prefix_k, cache.prefix_v)
      cache_index = cache_index - cache.prefix_v.shape[-2]
    if cache is not None and layer is None:
      # Write this chunk's keys/values at [cache_index, cache_index + T) and attend over the cache.
      k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache_index, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache_index, axis=2)
      cache = cache._replace(k=k, v=v)
    elif cache is not None:
      # Only the new slots are written into the stacked cache (in place in a loop carry); a
      # whole-layer write would copy the cache at every decode step.
      at = tuple(jnp.asarray(i, jnp.int32) for i in (0, layer, 0, cache_index, 0))
      write = lambda buf, new: jax.lax.dynamic_update_slice(buf, new[:, None].astype(buf.dtype), at)
      cache = cache._replace(k=write(cache.k, k), v=write(cache.v, v))
      this_layer = lambda buf: jax.lax.dynamic_index_in_dim(buf, layer, axis=1, keepdims=False)
      k, v = this_layer(cache.k), this_layer(cache.v)
      if prefix is not None:
        prefix = tuple(map(this_layer, prefix))
    if prefix is not None:
      prefix = tuple(x.astype(dtype) for x in prefix)
    B, T, H, K = q.shape
    q = q.reshape(B, T, cfg.kv_heads, H // cfg.kv_heads, K)
    out = attend(q, k.astype(dtype), v.astype(dtype), mask, cfg.attention_block, prefix).reshape(B, T, H * K)
    # One [H * K, D] matrix: contracting [H, K] as two axes, XLA:CPU may take them in the order
    # (K, H) and transpose the whole weight first, at every decode step.
    out = weight_matmul(cfg, "btm,md->btd", out, self.o_kernel[...].reshape(H * K, -1))
    if cfg.out_bias:
      out = out + self.o_bias[...].astype(dtype)
    return out, cache


class MLP(nnx.Module):

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F = cfg.hidden_size, cfg.mlp_width
    self.up_kernel = _param(rngs, cfg, (D, F), ("embed", "mlp"))
    if cfg.mlp == "swiglu":
      self.gate_kernel = _param(rngs, cfg, (D, F), ("embed", "mlp"))
    self.down_kernel = _param(rngs, cfg, (F, D), ("mlp", "embed"))
    if cfg.mlp_bias:
      self.up_bias = _param(rngs, cfg, (F,), ("mlp",), "zeros")
      self.down_bias = _param(rngs, cfg, (D,), ("embed",), "zeros")

  def __call__(self, x):
    cfg, dtype = self.cfg, x.dtype
    act = ACTIVATIONS[cfg.activation]
    h = weight_matmul(cfg, "btd,df->btf", x, self.up_kernel[...])
    if cfg.mlp_bias:
      h = h + self.up_bias[...].astype(dtype)
    if cfg.mlp == "swiglu":
      h = act(weight_matmul(cfg, "btd,df->btf", x, self.gate_kernel[...])) * h
    else:
      h = act(h)
    out = weight_matmul(cfg, "btf,fd->btd", h, self.down_kernel[...])
    if cfg.mlp_bias:
      out = out + self.down_bias[...].astype(dtype)
    return out


class Block(nnx.Module):

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    self.parallel, self.shared_norm, self.post_norm = cfg.parallel_residual, cfg.shared_norm, cfg.norm_position == "post"
    self.attn_norm = Norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    if not cfg.shared_norm:
      self.mlp_norm = Norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, mask, cache, cache_index, layer=None, rows=None):
    """rows: None, or [B, T'] indices into this chunk: the block's output only at those
    positions ([B, T', D]; see `Decoder.__call__`)."""
    if self.post_norm:
      attn_out, cache = self.attn(x, positions, mask, cache, cache_index, layer, rows)
      x = (x if rows is None else take_rows(x, rows)) + self.attn_norm(attn_out)
      return x + self.mlp_norm(self.mlp(x)), cache
    normed = self.attn_norm(x)
    attn_out, cache = self.attn(normed, positions, mask, cache, cache_index, layer, rows)
    if rows is not None:
      x, normed = take_rows(x, rows), take_rows(normed, rows)
    if self.parallel:
      mlp_in = normed if self.shared_norm else self.mlp_norm(x)
      return x + attn_out + self.mlp(mlp_in), cache
    x = x + attn_out
    return x + self.mlp(self.mlp_norm(x)), cache


def _uncached_block(layer: Block, x, positions, mask, rows=None):
  return layer(x, positions, mask, None, 0, rows=rows)[0]


def _cached_block(layer: Block, x, positions, mask, cache, cache_index, index=None, rows=None):
  return layer(x, positions, mask, cache, cache_index, index, rows)


def _stacked_blocks(cfg: DecoderConfig, rngs: nnx.Rngs) -> Block:
  """cfg.num_layers Blocks as one, each param with a leading `layers` axis (logical name too)."""
  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(cfg, rngs)
  return make(rngs)


class Decoder(nnx.Module):
  """Token ids -> final hidden states; `logits` and `scalar` read heads off them."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
    if cfg.position == "learned":
      self.pos_embed = _param(rngs, cfg, (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed"))
    if cfg.scan_layers:
      self.layers = _stacked_blocks(cfg, rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = Norm(cfg, rngs)
    if cfg.lm_head and not cfg.tie_embeddings:
      self.lm_head = _param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
    if cfg.lm_head and cfg.lm_head_bias:
      self.lm_head_bias = _param(rngs, cfg, (cfg.vocab_size,), ("vocab",), "zeros")
    if cfg.scalar_head:
      self.scalar_kernel = _param(rngs, cfg, (cfg.hidden_size, 1), ("embed", None))
      if cfg.scalar_head_bias:
        self.scalar_bias = _param(rngs, cfg, (1,), (None,), "zeros")

  def __call__(self, tokens, positions, mask, cache: list[LayerCache] | LayerCache | None = None,
               cache_index=0, outputs_at=None):
    """tokens, positions: [B, T] int; mask: [B, T, S] bool, True where query t may see key s.

    Without a cache S == T. With a cache (`init_cache`: one LayerCache per layer, each
    [B, G, S, K], or one stacked LayerCache with scan_layers; or `continue_prefix`'s
    PrefixedCaches) this chunk is written at slots [cache_index, cache_index + T) and attends
    over all S slots.
    Returns hidden states [B, T, D] and the updated cache (None without one).

    outputs_at: None, or [B, T'] int indices into the chunk: hidden states [B, T', D] at those
    positions only (a reward model's last token, a prefill's last position). The last block then
    runs its queries, attention output and MLP on those rows alone, and its keys and values on
    all (the cache needs them): the same numbers up to float32 rounding, and most of a layer's
    work saved on the others, which XLA cannot leave out by itself once the rows are picked at
    run time. With scan_layers
    every layer runs whole and the rows are picked after.
    """
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    x = self.embed[...].astype(dtype)[tokens]
    if cfg.position == "learned":
      x = x + self.pos_embed[...].astype(dtype)[positions]
    if cfg.scan_layers:
      x, cache = self._scan(x, positions, mask, cache, cache_index)
      x = x if outputs_at is None else take_rows(x, outputs_at)
      return self.final_norm(x), cache
    last = len(self.layers) - 1
    rows = lambda i: outputs_at if i == last else None
    if cache is None:
      block = nnx.remat(_uncached_block) if cfg.remat else _uncached_block
      for i, layer in enumerate(self.layers):
        x = block(layer, x, positions, mask, rows(i))
      return self.final_norm(x), None
    new_cache = []
    block = nnx.remat(_cached_block) if cfg.remat else _cached_block  # differentiated: `prefixed_forward`
    for i, layer in enumerate(self.layers):
      x, layer_cache = block(layer, x, positions, mask, cache[i], cache_index, None, rows(i))
      new_cache.append(layer_cache)
    return self.final_norm(x), new_cache

  def _scan(self, x, positions, mask, cache, cache_index):
    """The blocks as one lax.scan over the stacked params (and the stacked cache, carried)."""
    graphdef, state = nnx.split(self.layers)
    if cache is None:
      block = _uncached_block
      if self.cfg.remat:  # inside the scan: each step saves its input and recomputes the rest
        block = nnx.remat(block, prevent_cse=False)

      def step(x, layer_state):
        return block(nnx.merge(graphdef, layer_state), x, positions, mask), None
      return jax.lax.scan(step, x, state)[0], None

    block = nnx.remat(_cached_block, prevent_cse=False) if self.cfg.remat else _cached_block

    def cached_step(carry, layer_state_and_index):
      x, cache = carry
      layer_state, i = layer_state_and_index
      return block(nnx.merge(graphdef, layer_state), x, positions, mask, cache, cache_index, i), None
    index = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
    return jax.lax.scan(cached_step, (x, cache), (state, index))[0]

  def logits(self, hidden):
    """[B, T, D] -> [B, T, V] in float32 (log-softmax must not run in bf16)."""
    if self.cfg.tie_embeddings:
      return self._vocab_logits(hidden, self.embed[...], "btd,vd->btv")
    return self._vocab_logits(hidden, self.lm_head[...], "btd,dv->btv")

  def _vocab_logits(self, hidden, head, subscripts: str):
    """weight_matmul by the head, plus the head's bias along the output's vocabulary axis v."""
    logits = weight_matmul(self.cfg, subscripts, hidden, head, out_dtype=jnp.float32)
    if self.cfg.lm_head_bias:
      bias = self.lm_head_bias[...].astype(hidden.dtype).astype(jnp.float32)
      logits = logits + bias.reshape([-1 if axis == "v" else 1 for axis in subscripts.split("->")[1]])
    return logits

  def stack_projections(self):
    """For decoding on a CPU: each layer's attention projections stacked into one weight, once
    (`Attention.stack_projections`). Not with scan_layers, whose layers are split and merged at
    every step; elsewhere the kernels are used as stored."""
    if self.cfg.scan_layers or jax.default_backend() != "cpu":
      return
    for layer in self.layers:
      layer.attn.stack_projections()

  def decoding_logits(self, allow_vocab_first: bool = False):
    """`logits` for a decode loop, which calls it at every step with the same weights: returns
    (fn, vocab_first), fn mapping the step's hidden [B, 1, D] to float32 logits [B, V], or [V, B]
    when vocab_first (only where allowed: the caller reads that layout). On a CPU with float32
    matmuls the head is laid out once for the way this CPU multiplies 16 rows by it fastest
    (REPEATED_HEAD_ROWS_MIN_WIDTH, VOCAB_FIRST_MIN_WIDTH); elsewhere it is used as stored."""
    cfg = self.cfg
    as_stored = (lambda hidden: self.logits(hidden)[:, 0]), False
    if (cfg.matmul_dtype or cfg.dtype) != "float32" or jax.default_backend() != "cpu" or not cfg.lm_head:
      return as_stored
    width, vocab = cfg.hidden_size, cfg.vocab_size
    if (allow_vocab_first and VOCAB_FIRST_MIN_WIDTH is not None and width >= VOCAB_FIRST_MIN_WIDTH
        and vocab >= VOCAB_FIRST_MIN_VOCAB):
      head = self.embed[...] if cfg.tie_embeddings else self._head_rows()
      return (lambda hidden: self._vocab_logits(hidden[:, 0], head, "bd,vd->vb")), True
    if (REPEATED_HEAD_ROWS_MIN_WIDTH is not None and width >= REPEATED_HEAD_ROWS_MIN_WIDTH
        and not cfg.tie_embeddings):
      head = self._head_rows()
      return (lambda hidden: self._vocab_logits(hidden, head, "btd,vd->btv")[:, 0]), False
    return as_stored

  def _head_rows(self):
    """The untied head as one [V, D] copy, made once (the barrier keeps XLA from folding the
    transpose back into each use)."""
    return jax.lax.optimization_barrier(jnp.transpose(self.lm_head[...]))

  def scalar(self, hidden):
    """[B, T, D] -> [B, T] float32 value / reward at every position."""
    out = hidden.astype(jnp.float32) @ self.scalar_kernel[...].astype(jnp.float32)
    if self.cfg.scalar_head_bias:
      out = out + self.scalar_bias[...].astype(jnp.float32)
    return out[..., 0]


# ----------------------------------------------------------------------------- functional use

class Graph(NamedTuple):
  """Static half of a split model; jitted functions close over it (it is not hashable)."""
  graphdef: Any
  template: Any  # nnx.State with abstract leaves; copied before each merge


def create(cfg: DecoderConfig, seed: int = 0) -> tuple[Graph, dict]:
  """A freshly initialised model as (graph, params dict)."""
  return split(Decoder(cfg, nnx.Rngs(params=seed)))


def abstract(cfg: DecoderConfig) -> tuple[Graph, dict]:
  """Graph and params shapes without allocating (for loading or sharded init)."""
  model = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0)))
  return split(model)


def split(model: Decoder) -> tuple[Graph, dict]:
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  return Graph(graphdef, template), params


def with_matmul_dtype(graph: Graph, matmul_dtype: str) -> Graph:
  """The same model (same parameter tree) with its weight matmuls read in `matmul_dtype`
  ('' or None: unchanged): e.g. a sampler or a frozen model in bf16 beside a float32 trainer.
  A twin built twice has equal graphdefs, so the sampler's compiled programs serve both."""
  if not matmul_dtype:
    return graph
  cfg = nnx.merge(graph.graphdef, jax.tree.map(lambda a: a, graph.template)).cfg
  return graph if cfg.matmul_dtype == matmul_dtype else abstract(cfg.replace(matmul_dtype=matmul_dtype))[0]


def merge(graph: Graph, params: dict) -> Decoder:
  state = jax.tree.map(lambda a: a, graph.template)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graph.graphdef, state)


def logical_axes(graph: Graph) -> dict:
  """Params-shaped dict of logical axis-name tuples (None entries replicate)."""
  specs = nnx.to_pure_dict(nnx.get_partition_spec(graph.template))
  return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


# ----------------------------------------------------------------------------- masks & positions

def positions_from_mask(padding_mask):
  """Left padding needs explicit positions: the first real token is position 0."""
  return jnp.maximum(jnp.cumsum(padding_mask.astype(jnp.int32), axis=-1) - 1, 0)


def score_positions(padding_mask):
  """[B, T] padding mask -> [B] int index of the last real token (the rightmost 1).

  This is the token HF *ForSequenceClassification reads on left- or right-padded batches.
  A row with no real token gives 0.
  """
  T = padding_mask.shape[-1]
  return jnp.max(jnp.where(padding_mask.astype(bool), jnp.arange(T), 0), axis=-1)


def last_token_scalar(scalars, padding_mask):
  """Reward / value at the last real token: scalars [B, T], padding_mask [B, T] -> [B]."""
  index = score_positions(padding_mask)
  return jnp.take_along_axis(scalars, index[:, None], axis=-1)[:, 0]


def causal_mask(padding_mask):
  """[B, T] padding mask -> [B, T, T] bool: causal and never attending to padding keys."""
  T = padding_mask.shape[-1]
  causal = jnp.tril(jnp.ones((T, T), dtype=bool))
  return causal[None] & padding_mask.astype(bool)[:, None, :]


def init_cache(cfg: DecoderConfig, batch: int, length: int) -> list[LayerCache] | LayerCache:
  """Zeros: one LayerCache per layer, or one stacked [B, L, G, S, K] with scan_layers."""
  dtype = DTYPES[cfg.dtype]
  if cfg.scan_layers:
    shape = (batch, cfg.num_layers, cfg.kv_heads, length, cfg.dim_per_head)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  shape = (batch, cfg.kv_heads, length, cfg.dim_per_head)
  return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def continue_prefix(cache, samples: int, own_slots: int):
  """A cache that B prefixes filled (slots [0, P)), made ready for `samples` rows to continue
  each (row b * samples + k continues prefix b) with `own_slots` slots of their own: a
  PrefixedCache that keeps each prefix once; with one row per prefix, the same cache widened
  by `own_slots` empty slots."""
  if samples == 1:  # slots are the second-to-last axis of both layouts
    return jax.tree.map(lambda c: jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, own_slots), (0, 0)]), cache)

  def own(c):
    shape = list(c.shape)
    shape[0], shape[-2] = shape[0] * samples, own_slots
    return jnp.zeros(shape, c.dtype)
  as_prefixed = lambda c: PrefixedCache(own(c.k), own(c.v), c.k.swapaxes(-1, -2), c.v)
  return as_prefixed(cache) if isinstance(cache, LayerCache) else [as_prefixed(c) for c in cache]


def stack_layers(params: dict) -> dict:
  """Params of an unrolled model (layers {0: ..., 1: ...}) -> those of its scan_layers twin."""
  layers = params["layers"]
  return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *(layers[i] for i in range(len(layers))))}


def unstack_layers(params: dict) -> dict:
  """The inverse of `stack_layers`."""
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  return {**params, "layers": {i: jax.tree.map(lambda a: a[i], params["layers"]) for i in range(num_layers)}}


def segment_positions(segments):
  """[B, T] segment ids of packed rows (0: padding) -> each token's position inside its segment."""
  index = jnp.broadcast_to(jnp.arange(segments.shape[-1]), segments.shape)
  starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def segment_mask(segments):
  """[B, T] segment ids (0: padding) -> [B, T, T] bool: causal, inside one segment, never padding."""
  T = segments.shape[-1]
  causal = jnp.tril(jnp.ones((T, T), dtype=bool))
  return causal[None] & (segments[:, :, None] == segments[:, None, :]) & (segments > 0)[:, None, :]


def forward(graph: Graph, params: dict, tokens, padding_mask, outputs_at=None, segments=None):
  """Teacher-forced pass on a (left- or right-) padded batch -> hidden [B, T, D] ([B, T', D]
  at `outputs_at` [B, T'] only; see `Decoder.__call__`). segments [B, T]: several sequences
  packed in a row (ids 1, 2, ..., 0 for padding), each attending to itself alone from position 0,
  as if it had a row of its own."""
  model = merge(graph, params)
  if segments is None:
    positions, mask = positions_from_mask(padding_mask), causal_mask(padding_mask)
  else:
    positions, mask = segment_positions(segments), segment_mask(segments)
  hidden, _ = model(tokens, positions, mask, outputs_at=outputs_at)
  return model, hidden


def suffixes_per_prefix(prefix, suffix) -> int:
  """K for rows given as B prefixes and B * K suffixes, row b * K + k being prefix b followed by
  suffix b * K + k (K = 1: one prefix per row)."""
  B, N = prefix.shape[0], suffix.shape[0]
  if N % B:
    raise ValueError(f"{N} suffix rows do not divide evenly over {B} prefix rows")
  return N // B


def prefixed_forward(graph: Graph, params: dict, prefix, prefix_mask, suffix, suffix_mask,
                     prefix_outputs_at=None, suffix_outputs_at=None):
  """Teacher-forced pass on rows that share prefixes: row b * K + k is prefix b (left-padded,
  [B, P]) followed by suffix b * K + k (right-padded, [B * K, R]). Each prefix runs once, its
  keys and values are kept once (`continue_prefix`) and its K suffixes attend over them, so the
  hidden states are `forward`'s on the concatenated rows (same positions, masks and key order)
  while the prefix costs 1/K of the work: a prompt and its K responses in RL.

  Returns the model, the prefixes' hidden states [B, P, D] and the suffixes' [B * K, R, D]
  (at `prefix_outputs_at` [B, P'] and `suffix_outputs_at` [B * K, R'] only, when given; see
  `Decoder.__call__`). Differentiable (remat per block with cfg.remat, like `forward`)."""
  model = merge(graph, params)
  (B, P), (N, R) = prefix.shape, suffix.shape
  K = suffixes_per_prefix(prefix, suffix)
  prefix_valid, suffix_valid = prefix_mask.astype(bool), suffix_mask.astype(bool)
  prefix_hidden, cache = model(prefix, positions_from_mask(prefix_valid), causal_mask(prefix_valid),
                               init_cache(model.cfg, B, P), 0, prefix_outputs_at)
  cache = continue_prefix(cache, K, R)
  prefix_valid = jnp.repeat(prefix_valid, K, axis=0)
  prefix_len = prefix_valid.sum(-1, dtype=jnp.int32)
  positions = jnp.maximum(prefix_len[:, None] + jnp.cumsum(suffix_valid, -1, dtype=jnp.int32) - 1, 0)
  # Response query t sees every real prefix key and the real response keys up to itself. Built
  # from one [N, P + R] validity row (a 3-D concatenate takes XLA:CPU's LLVM over a second to compile).
  sees = jnp.arange(P + R)[None, :] <= P + jnp.arange(R)[:, None]  # [R, P + R]
  keys = sees[None] & jnp.concatenate([prefix_valid, suffix_valid], -1)[:, None, :]
  suffix_hidden, _ = model(suffix, positions, keys, cache, P, suffix_outputs_at)
  return model, prefix_hidden, suffix_hidden


def token_logprobs(graph: Graph, params: dict, tokens, padding_mask, temperature: float = 1.0, segments=None):
  """log p(tokens[:, t] | tokens[:, :t]) for t >= 1, shape [B, T-1], float32 (of packed rows
  with `segments`: given the earlier tokens of t's own sequence).

  Logits are divided by the sampling temperature so that trainer and sampler agree.
  """
  model, hidden = forward(graph, params, tokens, padding_mask, segments=segments)
  logits = model.logits(hidden[:, :-1]) / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
