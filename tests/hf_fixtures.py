"""Tiny random Hugging Face models (transformers + torch, CPU), saved to a directory for tests.

Every parameter is redrawn with a large std (norm scales around 1, biases non-zero) so that a
wrong transpose, a missing bias or a swapped head would change the logits visibly.
"""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB = 128
PAD_ID = 0  # never drawn as a real token in tests
EOS_ID = 1
IDS = dict(pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID)

CONFIGS = {
    # GPT-2: learned positions, Conv1D weights, fused [q|k|v], tied LM head.
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **IDS),
    # Pythia style: parallel residual; head_dim 16 with rotary_pct 0.25 rotates 4 of 16 features.
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=500.0,
        use_parallel_residual=True, max_position_embeddings=64, tie_word_embeddings=False, **IDS),
    # GPT-J: one LayerNorm for the parallel attention and MLP; head_dim 16 with rotary_dim 8
    # rotates 4 interleaved feature pairs; LM head with a bias.
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=96, rotary_dim=8, n_positions=64,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, **IDS),
    # GQA (4 query heads, 2 kv heads), head_dim 24 != hidden/heads, untied.
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, intermediate_size=96, rope_theta=500.0,
        rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False, **IDS),
    # q/k/v biases, one kv head.
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, intermediate_size=96, rope_theta=2000.0, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=False, **IDS),
    # RMSNorm on each head's q and k, biases on q, k, v and o, GQA, head_dim 24 != hidden/heads.
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, intermediate_size=96, rope_theta=1000.0, rms_norm_eps=1e-6,
        attention_bias=True, max_position_embeddings=64, tie_word_embeddings=False, **IDS),
    "qwen2_tied": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, rope_theta=10000.0,
        max_position_embeddings=64, tie_word_embeddings=True, **IDS),
    # Norms on each sublayer's output, RMSNorm on all heads' q and k at once, GQA.
    "olmo2": lambda: transformers.Olmo2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, rope_theta=900.0, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=False, **IDS),
}

# Models that differ from one in CONFIGS only in their config.json: parity-tested once, not
# through every test of the decoder. Llama with Llama 3.1's RoPE scaling (its frequencies are also
# tested alone); Mistral is Llama with a sliding window (refused past it).
SAME_LAYOUT = {
    # Llama 3.1's RoPE scaling: with an original context of 16 positions, every frequency here is
    # either stretched 4x or blended (wavelengths 6.3 to 1900 positions).
    "llama_rope_scaled": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=96, rope_theta=500.0, max_position_embeddings=64,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, tie_word_embeddings=True, **IDS),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, rope_theta=700.0, rms_norm_eps=1e-5,
        max_position_embeddings=64, sliding_window=16, tie_word_embeddings=False, **IDS),
}


def require(kinds: dict, kind: str) -> None:
  """Skip where the installed transformers predates the family (Qwen3: 4.51, OLMo 2: 4.47):
  the reference is missing, not the loader, which needs no transformers."""
  try:
    kinds[kind]()
  except AttributeError as missing:
    pytest.skip(f"transformers {transformers.__version__} has no {kind} model ({missing})")


def rope_type(config) -> str:
  """The RoPE type of a transformers config, 5.x (`rope_parameters`) or 4.x (`rope_scaling`)."""
  params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
  return params.get("rope_type", params.get("type", "default"))


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # tied weights appear once
      noise = std * torch.randn(p.shape, generator=gen)
      is_norm_scale = p.ndim == 1 and name.endswith("weight")
      p.copy_(1.0 + noise if is_norm_scale else noise)


def build(kind: str, directory, *, seq_cls: bool = False, seed: int = 0, std: float = 0.1,
          max_shard_size: str | None = None) -> torch.nn.Module:
  """Make a tiny random `kind` model (CausalLM, or SequenceClassification with one label),
  save it to `directory` as safetensors, and return it in eval mode with eager attention."""
  require({**CONFIGS, **SAME_LAYOUT}, kind)
  config = {**CONFIGS, **SAME_LAYOUT}[kind]()
  config._attn_implementation = "eager"
  if seq_cls:
    config.num_labels = 1
    model = transformers.AutoModelForSequenceClassification.from_config(config)
  else:
    model = transformers.AutoModelForCausalLM.from_config(config)
  _randomize(model, seed, std)
  model.eval()
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(str(directory), **kwargs)
  return model


def hf_inputs(tokens, padding_mask):
  """torch kwargs the way HF generate builds them for a padded batch."""
  ids = torch.as_tensor(tokens, dtype=torch.long)
  mask = torch.as_tensor(padding_mask, dtype=torch.long)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  return dict(input_ids=ids, attention_mask=mask, position_ids=positions)
