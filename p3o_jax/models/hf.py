"""Hugging Face checkpoints in and out for `decoder.Decoder`, without torch.

    cfg, graph, params = hf.load("EleutherAI/pythia-160m")         # hub id or local dir
    cfg, graph, params = hf.load(rm_dir, head="score")             # *ForSequenceClassification
    hf.save(out_dir, cfg, params, tokenizer=tok)                   # transformers loads it back
    cfg, graph, params = hf.load(peft_adapter_dir)                 # its base, the adapter merged in
    hf.save_adapter(out_dir, cfg, params_with_lora, alpha=16, base_model=...)  # peft loads it

Weights are read with `safetensors` into NumPy (single file or sharded index) and written back
with `safetensors.numpy`; `pytorch_model.bin` is never read. Each family has ONE table, `_rules`,
that pairs an HF tensor with the parameter(s) it holds and how it is laid out. Load and save both
walk that table, so the two directions cannot drift apart.

HF layouts (shape letters as in decoder.py):
  torch Linear weight   [out, in]          -> transposed, then reshaped to ours
  GPT-2 Conv1D weight   [in, out]          -> reshaped only
  GPT-2 c_attn          [D, 3*H*K]         out dim is [q | k | v] blocks: [3, H, K]
  NeoX query_key_value  [3*H*K, D]         out dim is interleaved per head: [H, 3, K]
  GPT-J                 separate q/k/v/out Linear without bias; ln_1 feeds attention and MLP

Heads (`head=`):
  None     the causal LM head (`lm_head.weight` / `embed_out.weight`, or tied embeddings).
  'score'  a reward model: `score.weight` [1, D] of *ForSequenceClassification becomes the scalar
           head (no bias) and there is no LM head. Read the reward with
           `rl.sequences.sequence_scores` (its last layer run at the read token alone) or
           `decoder.last_token_scalar` on every position's scalar; both pick the same token as HF
           on left or right padding.
  'value'  a critic: no LM head, scalar head with a bias. The kernel is taken from `score.weight`
           when the checkpoint has one (a critic started from a reward model), the bias starts at 0.
  A scalar head absent from the checkpoint starts as N(0, init_std) with seed `seed`.

Export: an LM-head model saves as *ForCausalLM (GPT2LMHeadModel for gpt2); a scalar head without
bias and no LM head saves as *ForSequenceClassification with num_labels=1. A value head (with a
bias) has no HF equivalent and is refused: save the critic with the orbax checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from p3o_jax import paths
from p3o_jax.models import decoder, lora
from p3o_jax.models.decoder import DecoderConfig

log = logging.getLogger(__name__)

SUPPORTED = ("gpt2", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3", "olmo2")
BASE_PREFIX = {"gpt2": "transformer.", "gpt_neox": "gpt_neox.", "gptj": "transformer.", "llama": "model.",
               "mistral": "model.", "qwen2": "model.", "qwen3": "model.", "olmo2": "model."}
EMBED_NAME = {"gpt2": "wte.weight", "gpt_neox": "embed_in.weight", "gptj": "wte.weight",
              "llama": "embed_tokens.weight", "mistral": "embed_tokens.weight", "qwen2": "embed_tokens.weight",
              "qwen3": "embed_tokens.weight", "olmo2": "embed_tokens.weight"}
CAUSAL_LM_CLASS = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "gptj": "GPTJForCausalLM",
                   "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM"}
SEQ_CLS_CLASS = {"gpt2": "GPT2ForSequenceClassification", "gpt_neox": "GPTNeoXForSequenceClassification",
                 "gptj": "GPTJForSequenceClassification", "llama": "LlamaForSequenceClassification",
                 "mistral": "MistralForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                 "qwen3": "Qwen3ForSequenceClassification", "olmo2": "Olmo2ForSequenceClassification"}
# Buffers some checkpoints carry that are not parameters (causal-mask and rotary tables).
IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias|"
                     r"\.attention\.bias|\.attention\.masked_bias)$")
HEAD_TENSORS = ("lm_head.weight", "lm_head.bias", "embed_out.weight", "score.weight")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.model"]


# ----------------------------------------------------------------------------- config

def _rope(hf: dict, default_theta: float, default_pct: float) -> dict:
  """DecoderConfig's rotary fields from transformers-5 `rope_parameters` or the older flat keys
  and `rope_scaling` (Llama 3.1+ checkpoints carry a `llama3` scaling in one or the other)."""
  params = hf.get("rope_parameters") or {}
  if params and all(isinstance(v, dict) for v in params.values()):  # nested per layer type
    distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
    if len(distinct) > 1:
      raise ValueError(f"per-layer-type rope_parameters are not supported: {params}")
    params = next(iter(params.values()))
  kind_of = lambda p: p.get("rope_type", p.get("type", "default"))
  where, scaling = next(((w, p) for w, p in (("rope_parameters", params), ("rope_scaling", hf.get("rope_scaling") or {}))
                         if kind_of(p) != "default"), ("rope_parameters", {}))
  kind = kind_of(scaling)
  if kind not in decoder.ROPE_TYPES:
    raise ValueError(f"{where} of type {kind!r} ({scaling}) is not supported; supported: {', '.join(decoder.ROPE_TYPES)}")

  def number(key, cast=float):
    if scaling.get(key) is None:
      raise ValueError(f"{where} of type {kind!r} has no {key!r}: {scaling}")
    return cast(scaling[key])
  fields = dict(rope_type=kind)
  if kind != "default":
    fields.update(rope_factor=number("factor"))
  if kind == "llama3":
    fields.update(rope_low_freq_factor=number("low_freq_factor"), rope_high_freq_factor=number("high_freq_factor"),
                  rope_original_max_positions=number("original_max_position_embeddings", int))
  theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", default_theta)))
  pct = params.get("partial_rotary_factor",
                   hf.get("partial_rotary_factor", hf.get("rotary_pct", default_pct)))
  return dict(rope_theta=float(theta), rotary_pct=float(pct), **fields)


def _rope_to_hf(cfg: DecoderConfig) -> dict:
  """`rope_scaling` for config.json (read by transformers 4.x and 5.x), or nothing."""
  if cfg.rope_type == "default":
    return {}
  scaling = dict(rope_type=cfg.rope_type, factor=cfg.rope_factor)
  if cfg.rope_type == "llama3":
    scaling.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_positions)
  return dict(rope_scaling=scaling)


def _activation(name: str) -> str:
  if name not in decoder.ACTIVATIONS:
    raise ValueError(f"hidden activation {name!r} is not supported; expected one of {tuple(decoder.ACTIVATIONS)}")
  return name


def config_from_hf(hf_config: dict, **overrides) -> DecoderConfig:
  """A transformers config dict (config.json) -> DecoderConfig; `overrides` replace fields."""
  hf = dict(hf_config)
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")

  if model_type == "gpt2":
    for key, bad in (("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                     ("add_cross_attention", True)):
      if hf.get(key, not bad) == bad:
        raise ValueError(f"gpt2 config with {key}={bad} is not supported")
    kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
              num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
              max_position_embeddings=hf.get("n_positions", 1024), norm="layernorm",
              norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
              activation=_activation(hf.get("activation_function", "gelu_new")), position="learned",
              qkv_bias=True, out_bias=True, mlp_bias=True,
              tie_embeddings=hf.get("tie_word_embeddings", True))
  elif model_type == "gpt_neox":
    rope = _rope(hf, 10000.0, 0.25)  # transformers' GPTNeoXConfig defaults
    bias = hf.get("attention_bias", True)
    kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
              num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
              max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="layernorm",
              norm_eps=hf.get("layer_norm_eps", 1e-5), mlp="gelu",
              activation=_activation(hf.get("hidden_act", "gelu")), position="rotary", **rope,
              parallel_residual=hf.get("use_parallel_residual", True),
              qkv_bias=bias, out_bias=bias, mlp_bias=True,
              tie_embeddings=hf.get("tie_word_embeddings", False))
  elif model_type == "gptj":
    # transformers' GPTJRotaryEmbedding: base 10000, rotary_dim features of each head, pairs
    # (2i, 2i+1) rotated together (modeling_gptj.py: rotate_every_two).
    heads, head_dim = hf["n_head"], hf["n_embd"] // hf["n_head"]
    rotary_dim = hf.get("rotary_dim")
    if rotary_dim is None or not 0 < rotary_dim <= head_dim or rotary_dim % 2:
      raise ValueError(f"gptj with rotary_dim={rotary_dim!r} is not supported; expected an even "
                       f"number in (0, head_dim={head_dim}]")
    pct = rotary_dim / head_dim
    if int(head_dim * pct) != rotary_dim:
      raise ValueError(f"gptj rotary_dim={rotary_dim} is not representable as a fraction of {head_dim}")
    kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
              num_heads=heads, intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
              max_position_embeddings=hf.get("n_positions", 2048), norm="layernorm",
              norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
              activation=_activation(hf.get("activation_function", "gelu_new")), position="rotary",
              rotary_pct=pct, rope_theta=10000.0, rotary_interleaved=True, parallel_residual=True,
              shared_norm=True, qkv_bias=False, out_bias=False, mlp_bias=True, lm_head_bias=True,
              tie_embeddings=hf.get("tie_word_embeddings", False))
  else:  # llama, mistral, qwen2, qwen3, olmo2
    if hf.get("mlp_bias"):
      raise ValueError(f"{model_type} config with mlp_bias=True is not supported")
    if model_type in ("qwen2", "qwen3") and (hf.get("use_sliding_window")
                                  or "sliding_attention" in (hf.get("layer_types") or ())):
      raise ValueError(f"{model_type} sliding-window attention (use_sliding_window=True) is not supported")
    rope = _rope(hf, 10000.0, 1.0)
    if rope["rotary_pct"] != 1.0:
      raise ValueError(f"{model_type} with partial_rotary_factor={rope['rotary_pct']} is not supported")
    heads = hf["num_attention_heads"]
    attention_bias = hf.get("attention_bias", False)
    kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
              num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
              head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
              intermediate_size=hf["intermediate_size"],
              max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
              norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
              activation=_activation(hf.get("hidden_act", "silu")), position="rotary", **rope,
              qk_norm={"qwen3": "head", "olmo2": "width"}.get(model_type, ""),
              norm_position="post" if model_type == "olmo2" else "pre",
              qkv_bias=True if model_type == "qwen2" else attention_bias,
              sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
              out_bias=False if model_type == "qwen2" else attention_bias, mlp_bias=False,
              tie_embeddings=hf.get("tie_word_embeddings", False))
  kw.update(model_type=model_type, init_std=hf.get("initializer_range", 0.02))
  kw.update(overrides)
  return DecoderConfig(**kw)


def config_to_hf(cfg: DecoderConfig, architecture: str) -> dict:
  """DecoderConfig -> a config.json dict that transformers 4.x and 5.x both read.

  Raises ValueError when `cfg` is not expressible in its `model_type` (checked by reading the
  dict back with `config_from_hf` and comparing the architecture fields).
  """
  mt = cfg.model_type
  if mt not in SUPPORTED:
    raise ValueError(f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED)}")
  common = dict(model_type=mt, architectures=[architecture], vocab_size=cfg.vocab_size,
                tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                torch_dtype=cfg.param_dtype, use_cache=True)
  if mt == "gpt2":
    arch = dict(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                n_inner=cfg.mlp_width, n_positions=cfg.max_position_embeddings,
                n_ctx=cfg.max_position_embeddings, activation_function=cfg.activation,
                layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                scale_attn_weights=True)
  elif mt == "gptj":
    arch = dict(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                n_inner=cfg.mlp_width, n_positions=cfg.max_position_embeddings,
                rotary_dim=int(cfg.dim_per_head * cfg.rotary_pct), activation_function=cfg.activation,
                layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  elif mt == "gpt_neox":
    arch = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_width,
                hidden_act=cfg.activation, max_position_embeddings=cfg.max_position_embeddings,
                layer_norm_eps=cfg.norm_eps, rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rope_theta,
                use_parallel_residual=cfg.parallel_residual, attention_bias=cfg.qkv_bias,
                hidden_dropout=0.0, attention_dropout=0.0, **_rope_to_hf(cfg))
  else:
    arch = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                intermediate_size=cfg.mlp_width, hidden_act=cfg.activation,
                max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, head_dim=cfg.dim_per_head, attention_dropout=0.0,
                **_rope_to_hf(cfg))
    if mt == "llama":
      arch.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif mt == "mistral":  # written when None too: a missing key reads as transformers' default 4096
      arch.update(sliding_window=cfg.sliding_window)
    elif mt in ("qwen2", "qwen3"):
      arch.update(use_sliding_window=False)
    if mt in ("qwen3", "olmo2"):
      arch.update(attention_bias=cfg.qkv_bias)
  hf = {**common, **arch}
  # The round trip must reproduce every architecture field, or the export would be wrong.
  back = config_from_hf(hf)
  keep = ("lm_head", "scalar_head", "scalar_head_bias", "dtype", "param_dtype", "init_std", "remat",
          "attention_block", "scan_layers", "matmul_dtype")
  diffs = [f"{f.name}={getattr(cfg, f.name)!r} (would be {getattr(back, f.name)!r})"
           for f in dataclasses.fields(cfg) if f.name not in keep
           and _normal(cfg, f.name) != _normal(back, f.name)]
  if diffs:
    raise ValueError(f"this DecoderConfig cannot be saved as model_type {mt!r}: {', '.join(diffs)}")
  return hf


def _normal(cfg: DecoderConfig, name: str):
  """Field value with defaults resolved, so None and what it stands for compare equal."""
  resolved = {"num_kv_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
              "intermediate_size": cfg.mlp_width}
  rope_fields = ("rotary_pct", "rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor", "rope_original_max_positions")
  if name in rope_fields and cfg.position == "learned":
    return None  # unused without rotary embeddings
  if name in rope_fields[3:] and (cfg.rope_type == "default" or cfg.rope_type == "linear" and name != "rope_factor"):
    return None  # unused by this kind of scaling
  return resolved.get(name, getattr(cfg, name))


# ----------------------------------------------------------------------------- the mapping table

Path = tuple  # a key path into the params dict, e.g. ("layers", 0, "attn", "q_kernel")


class Rule(NamedTuple):
  """One HF tensor <-> one or more of our params.

  HF array -> (transpose if `transpose`) -> reshape to `fused` and split along `axis` into the
  `ours` params (or reshape to the single param's shape). Saving runs it backwards.
  """
  hf_name: str
  ours: tuple[Path, ...]
  hf_shape: tuple[int, ...]
  transpose: bool = False
  fused: tuple[int, ...] | None = None
  axis: int = 0
  base: bool = True  # inside the base model (HF name gets the family prefix)


def _rules(cfg: DecoderConfig) -> list[Rule]:
  """The mapping table of cfg.model_type: every parameter of `decoder.Decoder(cfg)` once."""
  D, V, F = cfg.hidden_size, cfg.vocab_size, cfg.mlp_width
  H, G, K = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  mt = cfg.model_type
  rules: list[Rule] = []
  add = lambda *a, **k: rules.append(Rule(*a, **k))

  def norm(hf_prefix, ours):
    add(f"{hf_prefix}.weight", (ours + ("scale",),), (D,))
    if cfg.norm == "layernorm":
      add(f"{hf_prefix}.bias", (ours + ("bias",),), (D,))

  if mt == "gpt2":
    add("wte.weight", (("embed",),), (V, D))
    add("wpe.weight", (("pos_embed",),), (cfg.max_position_embeddings, D))
    for i in range(cfg.num_layers):
      h, L = f"h.{i}", ("layers", i)
      a, m = L + ("attn",), L + ("mlp",)
      norm(f"{h}.ln_1", L + ("attn_norm",))
      add(f"{h}.attn.c_attn.weight", (a + ("q_kernel",), a + ("k_kernel",), a + ("v_kernel",)),
          (D, 3 * H * K), fused=(D, 3, H, K), axis=1)
      add(f"{h}.attn.c_attn.bias", (a + ("q_bias",), a + ("k_bias",), a + ("v_bias",)),
          (3 * H * K,), fused=(3, H, K), axis=0)
      add(f"{h}.attn.c_proj.weight", (a + ("o_kernel",),), (H * K, D))
      add(f"{h}.attn.c_proj.bias", (a + ("o_bias",),), (D,))
      norm(f"{h}.ln_2", L + ("mlp_norm",))
      add(f"{h}.mlp.c_fc.weight", (m + ("up_kernel",),), (D, F))
      add(f"{h}.mlp.c_fc.bias", (m + ("up_bias",),), (F,))
      add(f"{h}.mlp.c_proj.weight", (m + ("down_kernel",),), (F, D))
      add(f"{h}.mlp.c_proj.bias", (m + ("down_bias",),), (D,))
    norm("ln_f", ("final_norm",))
    lm_head_name = "lm_head.weight"

  elif mt == "gpt_neox":
    add("embed_in.weight", (("embed",),), (V, D))
    for i in range(cfg.num_layers):
      h, L = f"layers.{i}", ("layers", i)
      a, m = L + ("attn",), L + ("mlp",)
      norm(f"{h}.input_layernorm", L + ("attn_norm",))
      add(f"{h}.attention.query_key_value.weight", (a + ("q_kernel",), a + ("k_kernel",), a + ("v_kernel",)),
          (3 * H * K, D), transpose=True, fused=(D, H, 3, K), axis=2)
      if cfg.qkv_bias:
        add(f"{h}.attention.query_key_value.bias", (a + ("q_bias",), a + ("k_bias",), a + ("v_bias",)),
            (3 * H * K,), fused=(H, 3, K), axis=1)
      add(f"{h}.attention.dense.weight", (a + ("o_kernel",),), (D, H * K), transpose=True)
      if cfg.out_bias:
        add(f"{h}.attention.dense.bias", (a + ("o_bias",),), (D,))
      norm(f"{h}.post_attention_layernorm", L + ("mlp_norm",))
      add(f"{h}.mlp.dense_h_to_4h.weight", (m + ("up_kernel",),), (F, D), transpose=True)
      add(f"{h}.mlp.dense_h_to_4h.bias", (m + ("up_bias",),), (F,))
      add(f"{h}.mlp.dense_4h_to_h.weight", (m + ("down_kernel",),), (D, F), transpose=True)
      add(f"{h}.mlp.dense_4h_to_h.bias", (m + ("down_bias",),), (D,))
    norm("final_layer_norm", ("final_norm",))
    lm_head_name = "embed_out.weight"

  elif mt == "gptj":
    add("wte.weight", (("embed",),), (V, D))
    for i in range(cfg.num_layers):
      h, L = f"h.{i}", ("layers", i)
      a, m = L + ("attn",), L + ("mlp",)
      norm(f"{h}.ln_1", L + ("attn_norm",))
      for name in ("q", "k", "v"):
        add(f"{h}.attn.{name}_proj.weight", (a + (f"{name}_kernel",),), (H * K, D), transpose=True)
      add(f"{h}.attn.out_proj.weight", (a + ("o_kernel",),), (D, H * K), transpose=True)
      add(f"{h}.mlp.fc_in.weight", (m + ("up_kernel",),), (F, D), transpose=True)
      add(f"{h}.mlp.fc_in.bias", (m + ("up_bias",),), (F,))
      add(f"{h}.mlp.fc_out.weight", (m + ("down_kernel",),), (D, F), transpose=True)
      add(f"{h}.mlp.fc_out.bias", (m + ("down_bias",),), (D,))
    norm("ln_f", ("final_norm",))
    lm_head_name = "lm_head.weight"

  else:  # llama, mistral, qwen2, qwen3, olmo2
    add("embed_tokens.weight", (("embed",),), (V, D))
    for i in range(cfg.num_layers):
      h, L = f"layers.{i}", ("layers", i)
      a, m = L + ("attn",), L + ("mlp",)
      # OLMo 2 normalises each sublayer's output: its post_attention_layernorm is our attn_norm.
      post = cfg.norm_position == "post"
      norm(f"{h}.post_attention_layernorm" if post else f"{h}.input_layernorm", L + ("attn_norm",))
      for name, n in (("q", H), ("k", G), ("v", G)):
        add(f"{h}.self_attn.{name}_proj.weight", (a + (f"{name}_kernel",),), (n * K, D), transpose=True)
        if cfg.qkv_bias:
          add(f"{h}.self_attn.{name}_proj.bias", (a + (f"{name}_bias",),), (n * K,))
      if cfg.qk_norm:
        for name, n in (("q", H), ("k", G)):
          add(f"{h}.self_attn.{name}_norm.weight", (a + (f"{name}_norm", "scale"),),
              (n * K if cfg.qk_norm == "width" else K,))
      add(f"{h}.self_attn.o_proj.weight", (a + ("o_kernel",),), (D, H * K), transpose=True)
      if cfg.out_bias:
        add(f"{h}.self_attn.o_proj.bias", (a + ("o_bias",),), (D,))
      norm(f"{h}.post_feedforward_layernorm" if post else f"{h}.post_attention_layernorm", L + ("mlp_norm",))
      add(f"{h}.mlp.gate_proj.weight", (m + ("gate_kernel",),), (F, D), transpose=True)
      add(f"{h}.mlp.up_proj.weight", (m + ("up_kernel",),), (F, D), transpose=True)
      add(f"{h}.mlp.down_proj.weight", (m + ("down_kernel",),), (D, F), transpose=True)
    norm("norm", ("final_norm",))
    lm_head_name = "lm_head.weight"

  if cfg.lm_head and not cfg.tie_embeddings:
    add(lm_head_name, (("lm_head",),), (V, D), transpose=True, base=False)
  if cfg.lm_head and cfg.lm_head_bias:
    add("lm_head.bias", (("lm_head_bias",),), (V,), base=False)
  if cfg.scalar_head:
    add("score.weight", (("scalar_kernel",),), (1, D), transpose=True, base=False)
  return rules


def _from_hf(rule: Rule, array: np.ndarray, shapes: dict) -> list[np.ndarray]:
  """HF tensor -> our arrays, in the order of rule.ours."""
  if rule.transpose:
    array = array.T
  if rule.fused is None:
    return [array.reshape(shapes[rule.ours[0]])]
  array = array.reshape(rule.fused)
  return [np.take(array, j, axis=rule.axis).reshape(shapes[p]) for j, p in enumerate(rule.ours)]


def _to_hf(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
  """Our arrays -> the HF tensor (exact inverse of _from_hf)."""
  stored = rule.hf_shape[::-1] if rule.transpose else rule.hf_shape
  if rule.fused is None:
    out = arrays[0].reshape(stored)
  else:
    parts = [a.reshape(rule.fused[:rule.axis] + rule.fused[rule.axis + 1:]) for a in arrays]
    out = np.stack(parts, axis=rule.axis).reshape(stored)
  return np.ascontiguousarray(out.T if rule.transpose else out)


def _leaf_shapes(params: dict) -> dict:
  """{key path tuple: shape} for every leaf of a params dict."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _check_table(rules: list[Rule], shapes: dict, exclude=()) -> None:
  covered = [p for r in rules for p in r.ours]
  missing = set(shapes) - set(covered) - set(exclude)
  if missing or len(covered) != len(set(covered)) or not set(covered) <= set(shapes):
    raise AssertionError(f"mapping table out of step with the decoder: missing {sorted(missing)}, "
                         f"covered {sorted(set(covered) - set(shapes))} extra")


def _set(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def _stacked_path(path: Path) -> tuple[Path, int | None]:
  """A table path ("layers", i, ...) -> (its scan_layers path ("layers", ...), i); others as is."""
  if path[0] == "layers":
    return ("layers",) + tuple(path[2:]), path[1]
  return path, None


def _param_at(params: dict, path: Path, scanned: bool):
  """The param at a table path; with scan_layers, layer i of the stacked param (a one-layer
  slice, so a sharded model gathers one layer of one tensor at a time on export)."""
  if not scanned:
    return _get(params, path)
  stacked, layer = _stacked_path(path)
  leaf = _get(params, stacked)
  return leaf if layer is None else leaf[layer]


# ----------------------------------------------------------------------------- load

def _resolve(path_or_hub_id: str, revision: str | None) -> str:
  text = str(path_or_hub_id)
  if "://" in text:  # gs://, s3://, file://: a copy of the folder on local disk
    return paths.local_dir(text)
  path = os.path.expanduser(text)
  if os.path.isdir(path):
    return path
  looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1 or os.path.exists(path)
  if looks_local:
    raise FileNotFoundError(f"{path_or_hub_id!r} is not a directory (expected a Hugging Face model dir)")
  from huggingface_hub import snapshot_download  # only for hub ids
  try:
    return snapshot_download(path, revision=revision, allow_patterns=HUB_FILES)
  except OSError as e:  # no network and no cached copy, an unknown id, a revision not there
    # The hub's own messages do not always say which id failed (offline mode: none does).
    raise OSError(f"model {path_or_hub_id!r} (revision {revision or 'main'}): not a local folder, and the "
                  f"Hugging Face Hub and its local cache did not give it: {e}") from e


class _Tensors:
  """Tensor name -> lazily read NumPy array, over one safetensors file or a sharded index."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    elif os.path.exists(single):
      with safe_open(single, framework="np") as f:
        self.files = {name: single for name in f.keys()}
    else:
      present = sorted(os.listdir(path))
      hint = (" (pytorch_model.bin is not read: convert it to safetensors, e.g. with "
              "`model.save_pretrained(dir, safe_serialization=True)`)") if any(
                  n.startswith("pytorch_model") for n in present) else ""
      raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}; "
                              f"found {present}")
    self._open: dict[str, Any] = {}

  def names(self) -> set[str]:
    return set(self.files)

  def get(self, name: str) -> np.ndarray:
    file = self.files[name]
    if file not in self._open:
      self._open[file] = safe_open(file, framework="np")
    return self._open[file].get_tensor(name)


class _PeftAdapter:
  """A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) read as the
  change it makes to each HF weight: W + scale B A (transposed for GPT-2's Conv1D), with peft's
  scale lora_alpha / r (or / sqrt(r) with use_rslora) and its per-module rank_pattern and
  alpha_pattern; whole tensors saved beside them (modules_to_save) replace the base's. DoRA,
  adapter biases and embedding adapters are refused by name."""

  PREFIX = "base_model.model."

  def __init__(self, path: str):
    with open(os.path.join(path, "adapter_config.json")) as f:
      self.config = config = json.load(f)
    where = f"adapter {path}"
    if config.get("peft_type") != "LORA":
      raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; only LORA adapters are read")
    for key, fine in (("use_dora", False), ("bias", "none")):
      if config.get(key, fine) != fine:
        raise ValueError(f"{where}: {key}={config[key]!r} is not read (only {key}={fine!r})")
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(file):
      raise FileNotFoundError(f"no adapter_model.safetensors in {path} (adapter_model.bin is not read); "
                              f"found {sorted(os.listdir(path))}")
    with safe_open(file, framework="np") as f:
      tensors = {name: f.get_tensor(name) for name in f.keys()}
    self.base_model = config.get("base_model_name_or_path") or ""
    self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    self.deltas: dict[str, tuple] = {}  # base weight name (without the PREFIX) -> (A, B, scale)
    embedding = sorted(n for n in tensors if re.search(r"\.lora_embedding_[AB]$", n))
    if embedding:
      raise ValueError(f"{where}: embedding adapters are not read: {embedding[:5]}")
    # Whole tensors beside the adapters (peft's modules_to_save: a reward model's score head)
    # replace the base model's, or add a head it lacks.
    self.whole = {n[len(self.PREFIX):] if n.startswith(self.PREFIX) else n: tensors[n]
                  for n in tensors if not re.search(r"\.lora_[AB]\.weight$", n)}
    for name in sorted(n for n in tensors if n.endswith(".lora_A.weight")):
      module = name[:-len(".lora_A.weight")]
      b = tensors.get(f"{module}.lora_B.weight")
      if b is None:
        raise ValueError(f"{where}: {name} has no lora_B.weight beside it")
      short = module[len(self.PREFIX):] if module.startswith(self.PREFIX) else module
      r = self._pattern("rank_pattern", short, config["r"])
      alpha = self._pattern("alpha_pattern", short, config["lora_alpha"])
      scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
      self.deltas[short + ".weight"] = (tensors[name], b, scale)

  def _pattern(self, key: str, module: str, default):
    """peft's per-module value: the first pattern that matches the end of the module's name."""
    for pattern, value in (self.config.get(key) or {}).items():
      if re.fullmatch(rf"(.*\.)?{pattern}", module):
        return value
    return default

  def delta(self, name: str) -> np.ndarray | None:
    """The change to the HF weight `name`, float32; None where the adapter has none."""
    if name not in self.deltas:
      return None
    a, b, scale = self.deltas[name]
    change = scale * (b.astype(np.float32) @ a.astype(np.float32))  # [out, in]
    return change.T if self.fan_in_fan_out else change


class _AdaptedTensors:
  """A checkpoint's tensors with a PEFT adapter's changes added to the weights it adapts."""

  def __init__(self, tensors: "_Tensors", adapter: _PeftAdapter, where: str):
    missing = sorted(set(adapter.deltas) - tensors.names())
    if missing:
      raise ValueError(f"{where}: the adapter changes weights the base model does not have: {missing[:5]}")
    self.tensors, self.adapter = tensors, adapter

  def names(self) -> set[str]:
    return self.tensors.names() | set(self.adapter.whole)

  def get(self, name: str) -> np.ndarray:
    if name in self.adapter.whole:
      return self.adapter.whole[name]
    array = self.tensors.get(name)
    change = self.adapter.delta(name)
    if change is None:
      return array
    if change.shape != array.shape:
      raise ValueError(f"the adapter's change to {name!r} has shape {change.shape}, the weight {array.shape}")
    return (array.astype(np.float32) + change).astype(array.dtype)


def _base_prefix(names: set[str], cfg: DecoderConfig) -> str:
  """The prefix of base-model tensors in this checkpoint ('' for bare GPT-2 style files)."""
  embed = EMBED_NAME[cfg.model_type]
  for prefix in (BASE_PREFIX[cfg.model_type], ""):
    if prefix + embed in names:
      return prefix
  raise ValueError(f"no embedding tensor {BASE_PREFIX[cfg.model_type] + embed!r} (or {embed!r}) in the "
                   f"checkpoint; is model_type {cfg.model_type!r} right? First names: {sorted(names)[:8]}")


def load(path_or_hub_id: str, *, dtype: str = "float32", param_dtype: str = "float32",
         head: str | None = None, revision: str | None = None, seed: int = 0,
         shardings=None, **overrides) -> tuple[DecoderConfig, decoder.Graph, dict]:
  """An HF checkpoint (local dir, URL or hub id) -> (cfg, graph, params) for `decoder.merge`.

  head: None (LM head), 'score' (reward model) or 'value' (critic); see the module docstring.
  shardings: `fn(graph, abstract_params) -> tree of jax.sharding.Sharding`; each tensor is then
    read on the host and placed straight onto its sharding (`jax.make_array_from_callback`),
    one tensor at a time, every device receiving only its slice. None: default device.
  overrides: extra DecoderConfig fields (e.g. max_position_embeddings).
  """
  if head not in (None, "score", "value"):
    raise ValueError(f"head={head!r}; expected None, 'score' or 'value'")
  path = _resolve(path_or_hub_id, revision)
  config_file = os.path.join(path, "config.json")
  adapter = None
  if not os.path.exists(config_file) and os.path.exists(os.path.join(path, "adapter_config.json")):
    # A PEFT LoRA adapter: its base model, with the adapter merged into the weights it adapts.
    adapter = _PeftAdapter(path)
    if not adapter.base_model:
      raise ValueError(f"adapter {path}: adapter_config.json names no base_model_name_or_path")
    path = _resolve(adapter.base_model, None)
    config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"no config.json in {path}")
  with open(config_file) as f:
    hf_config = json.load(f)
  heads = dict(lm_head=head is None, scalar_head=head is not None, scalar_head_bias=head == "value")
  cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, **heads, **overrides)

  tensors = _Tensors(path)
  if adapter is not None:
    tensors = _AdaptedTensors(tensors, adapter, f"adapter {path_or_hub_id} on {adapter.base_model}")
  names = tensors.names()
  prefix = _base_prefix(names, cfg)
  graph, abstract_params = decoder.abstract(cfg)
  # The table names one layer at a time: shapes of the unrolled model, even with scan_layers.
  shapes = _leaf_shapes(decoder.abstract(cfg.replace(scan_layers=False))[1] if cfg.scan_layers
                        else abstract_params)
  rules = _rules(cfg)
  _check_table(rules, shapes, exclude=[("scalar_bias",)])
  if cfg.scan_layers:  # all layers of one param in a row, so each stack is placed as soon as full
    rules = sorted(rules, key=lambda r: (1, r.ours[0][2:], r.ours[0][1]) if r.ours[0][0] == "layers" else (0,))
  pending: dict = {}  # scan_layers: stacked path -> {layer: host array}

  target = None if shardings is None else shardings(graph, abstract_params)
  param_type = decoder.DTYPES[param_dtype]

  def place(path, value):
    value = np.asarray(value).astype(param_type)
    if cfg.scan_layers:
      path, layer = _stacked_path(path)
      if layer is not None:
        held = pending.setdefault(path, {})
        held[layer] = value
        if len(held) < cfg.num_layers:
          return None
        del pending[path]
        value = np.stack([held[i] for i in range(cfg.num_layers)])
    if target is None:
      return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, _get(target, path), lambda index: value[index])

  params: dict = {}
  used = set()
  for rule in rules:
    name = (prefix if rule.base else "") + rule.hf_name
    if name not in names:
      if rule.hf_name == "score.weight":  # a fresh scalar head on a causal-LM checkpoint
        log.info("no score.weight in %s: scalar head starts from N(0, %g)", path, cfg.init_std)
        init = cfg.init_std * jax.random.normal(jax.random.key(seed), shapes[("scalar_kernel",)])
        _set(params, ("scalar_kernel",), place(("scalar_kernel",), init))
        continue
      hint = (" (the checkpoint has score.weight: load a reward model with head='score')"
              if rule.hf_name in HEAD_TENSORS and "score.weight" in names else "")
      raise ValueError(f"tensor {name!r} is missing from {path}{hint}")
    array = tensors.get(name)
    if tuple(array.shape) != rule.hf_shape:
      raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {rule.hf_shape} "
                       f"from config.json")
    used.add(name)
    for p, value in zip(rule.ours, _from_hf(rule, array, shapes)):
      placed = place(p, value)
      if placed is not None:
        _set(params, _stacked_path(p)[0] if cfg.scan_layers else p, placed)
    del array
  if cfg.scalar_head_bias:
    _set(params, ("scalar_bias",), place(("scalar_bias",), np.zeros(shapes[("scalar_bias",)])))

  left = {n for n in names - used if not IGNORED.search(n)}
  unused_heads = {n for n in left if n in HEAD_TENSORS}
  if unused_heads:
    log.info("not loaded (head=%r): %s", head, sorted(unused_heads))
  if cfg.tie_embeddings:  # some tied checkpoints also store the (identical) LM head
    unused_heads |= {n for n in left if n.endswith("lm_head.weight") or n.endswith("embed_out.weight")}
  unexpected = left - unused_heads
  if unexpected:
    raise ValueError(f"unexpected tensors in {path} (config.json does not describe them): "
                     f"{sorted(unexpected)}")
  return cfg, graph, params


# ----------------------------------------------------------------------------- save

def save(path: str, cfg: DecoderConfig, params: dict, *, tokenizer=None,
         config_overrides: dict | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Write `path` (a folder or URL) as an HF model dir: config.json + safetensors (+ tokenizer).

  config_overrides: extra config.json keys (e.g. pad_token_id, eos_token_id); pad/bos/eos ids are
  taken from `tokenizer` when it is given and they are not overridden. Tensors go into files of
  at most `max_shard_bytes` (with `model.safetensors.index.json` when there are several, as
  transformers writes them). Parameters may be sharded over devices and processes: each tensor
  is gathered alone, so no device or host ever holds more than one file's worth. Every process
  must call this; process 0 writes. The folder is written to a temporary sibling and renamed
  into place, so a reader never sees half a checkpoint.
  """
  if cfg.scalar_head and cfg.lm_head:
    raise ValueError("cannot save a model with both an LM head and a scalar head as one HF model; "
                     "save cfg.replace(scalar_head=False) with the scalar params dropped")
  if cfg.scalar_head and cfg.scalar_head_bias:
    raise ValueError("a scalar head with a bias (value head) has no Hugging Face format; "
                     "save it with the orbax checkpoint, or drop the bias to export a reward model")
  if not (cfg.lm_head or cfg.scalar_head):
    raise ValueError("the model has neither an LM head nor a scalar head; nothing to export as")
  architecture = (SEQ_CLS_CLASS if cfg.scalar_head else CAUSAL_LM_CLASS)[cfg.model_type]
  hf_config = config_to_hf(cfg, architecture)
  if cfg.scalar_head:
    hf_config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if tokenizer is not None:
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
      if getattr(tokenizer, key, None) is not None:
        hf_config[key] = getattr(tokenizer, key)
  hf_config.update(config_overrides or {})

  expected = _leaf_shapes(decoder.abstract(cfg)[1])
  got = _leaf_shapes(params)
  if got != expected:
    bad = sorted(set(got) ^ set(expected)) or [p for p in expected if got[p] != expected[p]]
    raise ValueError(f"params do not match cfg at {bad[:5]}: expected "
                     f"{[expected.get(p) for p in bad[:5]]}, got {[got.get(p) for p in bad[:5]]}")
  prefix = BASE_PREFIX[cfg.model_type]
  rules = _rules(cfg)
  shards = _plan_shards(rules, params, max_shard_bytes, cfg.scan_layers)
  writer = jax.process_index() == 0
  tmp = _staging_dir(path) if writer else None
  try:
    weight_map = {}
    for number, group in enumerate(shards, 1):
      tensors = {}
      for rule in group:
        arrays = [_host_array(_param_at(params, p, cfg.scan_layers)) for p in rule.ours]  # all processes
        if writer:
          tensors[(prefix if rule.base else "") + rule.hf_name] = _to_hf(rule, arrays)
      if writer:
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in tensors})
      del tensors
    if writer:
      if len(shards) > 1:
        total = sum(int(np.prod(r.hf_shape)) * np.dtype(decoder.DTYPES[cfg.param_dtype]).itemsize for r in rules)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
          json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
      if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
      paths.publish_dir(tmp, path)
  except BaseException:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if jax.process_count() > 1:  # the others may read the export next
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"hf.save {path}")


def save_adapter(path: str, cfg: DecoderConfig, params: dict, *, alpha: float, base_model: str) -> None:
  """Write the LoRA adapters in `params` (models/lora.py) as a PEFT adapter folder,
  adapter_config.json and adapter_model.safetensors, which `peft.PeftModel.from_pretrained`
  loads onto `base_model`: for each HF module, `lora_A.weight` [r, in] and `lora_B.weight`
  [out, r], and peft's scale lora_alpha / r.

  An HF tensor that fuses several of our kernels (GPT-2's c_attn, GPT-NeoX's query_key_value hold
  q, k and v) gets one adapter of rank r times the targeted parts: A is theirs side by side, and B
  places each part's B at that part's rows and zeros elsewhere, through the same fusing rule as
  the weights (`_to_hf`); `rank_pattern` and `alpha_pattern` keep its scale alpha / r. Every
  process must call this; process 0 writes.
  """
  by_kernel = {(index, module, kernel): (a, b) for index, module, kernel, a, b in lora.per_layer(params)}
  prefix = "base_model.model." + BASE_PREFIX[cfg.model_type]
  tensors, modules, ranks, r = {}, set(), {}, None
  for rule in _rules(cfg):
    parts = [by_kernel.get(p[1:]) if p[0] == "layers" and len(p) == 4 else None for p in rule.ours]
    targeted = [j for j, part in enumerate(parts) if part is not None]
    if not targeted:
      continue
    r = parts[targeted[0]][0].shape[-1]
    total = r * len(targeted)
    a_cat = np.concatenate([_host_array(parts[j][0]).reshape(-1, r) for j in targeted], axis=1)  # [in, total]
    b_parts = []  # each of rule.ours as a "kernel" of `total` inputs: its part's B in its rows
    for j in range(len(rule.ours)):
      # A part left out has no B to take its width from: the fused parts (q, k, v of GPT-2 and
      # GPT-NeoX, which have no grouped-query heads) are all as wide.
      out_shape = np.shape((parts[j] or parts[targeted[0]])[1])[1:]
      block = np.zeros((total, *out_shape), np.float32)
      if parts[j] is not None:
        row = targeted.index(j) * r
        block[row:row + r] = _host_array(parts[j][1])
      b_parts.append(block)
    rank_rule = rule._replace(hf_shape=(rule.hf_shape[0], total) if rule.transpose else (total, rule.hf_shape[1]),
                              fused=None if rule.fused is None else (total, *rule.fused[1:]))
    b_hf = _to_hf(rank_rule, b_parts)  # HF's layout of a [total -> out] module: [out, total] or Conv1D's [total, out]
    name = rule.hf_name.removesuffix(".weight")
    tensors[f"{prefix}{name}.lora_A.weight"] = np.ascontiguousarray(a_cat.T)
    tensors[f"{prefix}{name}.lora_B.weight"] = np.ascontiguousarray(b_hf if rule.transpose else b_hf.T)
    module = ".".join(name.split(".")[-2:])
    modules.add(module)
    if total != r:
      ranks[module] = total
  if jax.process_index() != 0:
    return
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": float(alpha),
      "rank_pattern": {m: int(t) for m, t in sorted(ranks.items())},
      "alpha_pattern": {m: float(alpha) * t / r for m, t in sorted(ranks.items())},
      "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": cfg.model_type == "gpt2",  # GPT-2's Conv1D stores [in, out]
      "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
      "use_rslora": False, "modules_to_save": None}
  tmp = _staging_dir(path)
  try:
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(adapter_config, f, indent=2, sort_keys=True)
    paths.publish_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _host_array(x) -> np.ndarray:
  """One parameter on the host, gathered from every process when it spans several."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _plan_shards(rules: list[Rule], params: dict, max_bytes: int, scanned: bool = False) -> list[list[Rule]]:
  """Rules grouped into files of at most max_bytes (a tensor larger than that gets its own)."""
  groups, size = [[]], 0

  def param_bytes(path):
    stacked, layer = _stacked_path(path) if scanned else (path, None)
    leaf = _get(params, stacked)
    shape = np.shape(leaf)[1:] if layer is not None else np.shape(leaf)
    return int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize

  for rule in rules:
    nbytes = sum(param_bytes(p) for p in rule.ours)
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(rule)
    size += nbytes
  return groups


def _staging_dir(path: str) -> str:
  """A temporary folder beside a local target (so the final rename is atomic), else anywhere."""
  target = paths.resolve(path)
  if paths.is_local(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=os.fspath(target.parent))
  return tempfile.mkdtemp(prefix="p3o_jax-export-")
