"""P3O, Pairwise Proximal Policy Optimization (Wu et al. 2023, arXiv 2310.00212): the pairwise
policy gradient over all K(K-1)/2 pairs of each prompt's responses, clipped separately (V1)
or jointly (V2). The loss is `losses.p3o`; docs/algorithms.md has the equations."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from p3o_jax import losses
from p3o_jax.rl.algorithms.base import Algorithm, register


@register
class P3O(Algorithm):
  name = "p3o"
  order = 0
  weight_level = "sequence"  # one weight per response; a pair is weighted by the product

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    variant: str
    beta: float
    eps: float
    c: float
    kl_source: str
    whiten_delta: bool
    clip_per_token: bool
    normalise: str

  def loss(self, params, batch, normaliser=None, hp=None):
    logp, _, _ = self.token_logprobs(params, batch)
    hp = hp or self.hp
    return losses.p3o(
        logp, self.old_logprobs(batch, logp), batch["logp_ref"], batch["rewards"], token_mask=batch["response_mask"],
        variant=hp.variant, beta=hp.beta, eps=hp.eps, c=hp.c, kl_source=hp.kl_source,
        whiten_delta=hp.whiten_delta, clip_per_token=hp.clip_per_token, normalise=hp.normalise,
        normaliser=normaliser, sample_weight=batch.get("sample_weight"))

  def count(self, batch):
    """Pairs, or mean pair tokens (`losses.p3o_normaliser`)."""
    mask = batch["response_mask"].astype(bool)
    return losses.p3o_normaliser(jnp.ones(mask.shape[:2], bool), mask, self.hp.normalise)
