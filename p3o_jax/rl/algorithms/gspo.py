"""GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071): GRPO's group
advantages with a SEQUENCE-level importance ratio, the geometric mean of the token ratios,
clipped per sequence (the paper's ranges are tiny: 3e-4 below, 4e-4 above). The KL to the
reference is a k3 loss term with coefficient `rl.beta`, as in GRPO."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from p3o_jax import value_checks as checks
from p3o_jax import losses
from p3o_jax.rl.algorithms.base import Algorithm, register


def gspo_loss(logp, old_logp, ref_logp, rewards, mask, *, beta: float, eps_low: float, eps_high: float,
              sample_weight=None, normaliser=None):
  """GSPO's loss (to minimise) on [B, K, T] token log-probs and masks, [B, K] rewards:

    A_k  = (r_k - mean r) / (std r + 1e-4)                         (losses.group_advantages)
    s_k  = exp( (1/|y_k|) sum_t (logp_kt - old_kt) )               (geometric mean of ratios)
    L    = sum_k [ max(-A_k s_k, -A_k clip(s_k, 1 - eps_low, 1 + eps_high))
                   + beta * (1/|y_k|) sum_t k3_kt ] / normaliser    (default B K)

  `sample_weight` ([B, K]) multiplies each response's advantage.
  """
  mask = mask.astype(bool)
  logp = jnp.where(mask, logp, 0.0)
  old = jax.lax.stop_gradient(jnp.where(mask, old_logp, 0.0))
  ref = jax.lax.stop_gradient(jnp.where(mask, ref_logp, 0.0))
  lengths = jnp.maximum(jnp.sum(mask, axis=-1), 1)
  advantages = jax.lax.stop_gradient(losses.group_advantages(rewards))
  if sample_weight is not None:
    advantages = advantages * jax.lax.stop_gradient(sample_weight)
  log_s = jnp.sum(logp - old, axis=-1) / lengths
  policy, clipped = losses.clipped_surrogate(log_s, advantages, eps_low, eps_high)
  kl = jnp.sum(jnp.where(mask, losses.k3_kl(logp, ref), 0.0), axis=-1) / lengths
  per_seq = policy + beta * kl
  loss = jnp.sum(per_seq) / (jnp.float32(per_seq.size) if normaliser is None else normaliser)
  log_s = jax.lax.stop_gradient(log_s)
  return loss, {"loss/policy_avg": loss, "policy/clipfrac_avg": jnp.mean(clipped),
                "policy/approxkl_avg": 0.5 * jnp.mean(jnp.square(log_s)),
                "val/ratio": jnp.mean(jnp.exp(log_s)), "grpo/kl_k3": jnp.mean(jax.lax.stop_gradient(kl))}


@register
class GSPO(Algorithm):
  name = "gspo"
  weight_level = "sequence"
  options = {"seq_eps_low": (3e-4, checks.positive),   # GSPO's sequence-ratio clip range,
             "seq_eps_high": (4e-4, checks.positive)}  # [1 - seq_eps_low, 1 + seq_eps_high]

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    beta: float
    seq_eps_low: float
    seq_eps_high: float

  def loss(self, params, batch, normaliser=None, hp=None):
    logp, _, _ = self.token_logprobs(params, batch)
    hp = hp or self.hp
    return gspo_loss(logp, self.old_logprobs(batch, logp), batch["logp_ref"], batch["rewards"], batch["response_mask"],
                     beta=hp.beta, eps_low=hp.seq_eps_low, eps_high=hp.seq_eps_high,
                     sample_weight=batch.get("sample_weight"), normaliser=normaliser)
