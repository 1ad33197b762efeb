"""A model as the stages use it: its config, static graph, parameters, and tokenizer.

Loading and initialising take a `shardings(graph, abstract_params)` function, so every tensor
is placed straight onto its shards and no device holds a sharded model whole.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from p3o_jax.models import decoder, hf, lora

Placement = Callable[[object, dict], dict]  # (graph, abstract params) -> their shardings


@dataclasses.dataclass
class Policy:
  cfg: decoder.DecoderConfig
  graph: object
  params: dict
  tokenizer: object = None
  axes: dict | None = None  # the params' logical axes when they differ from the graph's (adapters)

  def logical_axes(self) -> dict:
    return decoder.logical_axes(self.graph) if self.axes is None else self.axes


def load(path: str, placement: Placement, *, head: str | None = None, tokenizer=None, **dtypes) -> Policy:
  """A model from a Hugging Face folder or hub id (`head='score'`: a reward model), each tensor
  placed straight onto its shards. `dtypes`: dtype, param_dtype, remat, scan_layers (see hf.load)."""
  kwargs = {"head": head} if head else {}
  cfg, graph, params = hf.load(path, shardings=placement, **kwargs, **dtypes)
  return Policy(cfg, graph, params, tokenizer)


def init(cfg: decoder.DecoderConfig, seed: int, placement: Placement, tokenizer=None) -> Policy:
  """A freshly initialised model, born sharded (no device holds it whole)."""
  graph, abstract = decoder.abstract(cfg)
  params = jax.jit(lambda: decoder.create(cfg, seed)[1], out_shardings=placement(graph, abstract))()
  return Policy(cfg, graph, params, tokenizer)


def with_scalar_head(policy: Policy, placement: Placement) -> Policy:
  """The policy's backbone with a zero scalar head and no LM head (reward model / critic)."""
  cfg = policy.cfg.replace(lm_head=False, scalar_head=True, scalar_head_bias=False)
  graph, abstract = decoder.abstract(cfg)
  kernel = abstract["scalar_kernel"]
  params = {k: policy.params[k] for k in abstract if k != "scalar_kernel"}
  params["scalar_kernel"] = jax.jit(lambda: jnp.zeros(kernel.shape, kernel.dtype),
                                    out_shardings=placement(graph, abstract)["scalar_kernel"])()
  return Policy(cfg, graph, params, policy.tokenizer)


def frozen_copy(params, dtype: str):
  """A copy in `dtype` (floating leaves), with the same layout: the frozen reference, which the
  RL update's buffer donation must not touch."""
  layout = jax.tree.map(lambda x: x.sharding, params)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.copy(x)
  return jax.jit(lambda tree: jax.tree.map(cast, tree), out_shardings=layout)(params)


def with_adapters(policy: Policy, *, rank: int, alpha: float, targets: str, seed: int) -> Policy:
  """The policy with LoRA adapters on `targets`' kernels (models/lora.py): its params gain the
  adapters and their scale, its graph stays the model's own (params go through `lora.merged`)."""
  params, axes = lora.attach(policy.params, policy.logical_axes(), rank=rank, alpha=alpha,
                             targets=lora.parse_targets(targets), seed=seed)
  return dataclasses.replace(policy, params=params, axes=axes)
