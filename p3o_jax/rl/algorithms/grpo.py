"""GRPO, Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"), with the loss
variants of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") and DAPO (Yu et
al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"), as TRL's
GRPOTrainer `loss_type` names them. No critic: each response's advantage is its reward
against the other responses to the same prompt. The KL to the reference is a loss term, the
k3 estimator with coefficient `rl.beta` (0 allowed)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from p3o_jax import value_checks as checks
from p3o_jax import losses
from p3o_jax.rl.algorithms.base import Algorithm, register

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def grpo_normaliser(mask, loss_type: str):
  """The count a GRPO loss divides by, for [B, K, T] response masks: responses ('grpo'),
  max_new_tokens x responses ('dr_grpo', a constant), or response tokens ('dapo')."""
  mask = mask.astype(bool)
  if loss_type == "grpo":
    return jnp.float32(mask.shape[0] * mask.shape[1])
  if loss_type == "dr_grpo":
    return jnp.float32(mask.size)
  return jnp.sum(mask).astype(jnp.float32)


def grpo_loss(logp, old_logp, ref_logp, rewards, mask, *, loss_type: str = "grpo", beta: float, eps: float,
              eps_low: float, eps_high: float, sample_weight=None, normaliser=None):
  """GRPO's loss (to minimise) on [B, K, T] token log-probs and masks, [B, K] rewards:

    A_k    = (r_k - mean r) / (std r + 1e-4)       'grpo', 'dapo'  (losses.group_advantages)
    A_k    =  r_k - mean r                         'dr_grpo'       (no std division)
    l_kt   = max(-A_k rho_kt, -A_k clip(rho_kt, 1 - lo, 1 + hi)) + beta * k3_kt,
             rho_kt = exp(logp_kt - old_kt), k3_kt = exp(ref - logp) - (ref - logp) - 1
    'grpo':    L = sum_k (1/|y_k|) sum_t l_kt / (B K)                 lo = hi = eps
    'dr_grpo': L = sum_k sum_t l_kt / (T_max B K)                     lo = hi = eps
    'dapo':    L = sum_k sum_t l_kt / sum_k |y_k|                     lo = eps_low, hi = eps_high

  `sample_weight` ([B, K, T]) multiplies the advantage per token. Dr. GRPO's T_max is the
  padded response length (sampler.max_new_tokens), so a token's weight does not depend on
  the length of its response.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"rl.loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
  mask = mask.astype(bool)
  logp = jnp.where(mask, logp, 0.0)
  old = jax.lax.stop_gradient(jnp.where(mask, old_logp, 0.0))
  ref = jax.lax.stop_gradient(jnp.where(mask, ref_logp, 0.0))
  advantages = jax.lax.stop_gradient(losses.group_advantages(rewards, scale=loss_type != "dr_grpo"))
  token_adv = jnp.broadcast_to(advantages[..., None], mask.shape)
  if sample_weight is not None:
    token_adv = token_adv * jax.lax.stop_gradient(sample_weight)
  lo, hi = (eps_low, eps_high) if loss_type == "dapo" else (eps, eps)
  policy, clipped = losses.clipped_surrogate(logp - old, token_adv, lo, hi)
  kl = losses.k3_kl(logp, ref)
  per_token = jnp.where(mask, policy + beta * kl, 0.0)
  if loss_type == "grpo":
    per_seq = jnp.sum(per_token, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)
    total = jnp.sum(per_seq)
  else:
    total = jnp.sum(per_token)
  loss = total / (grpo_normaliser(mask, loss_type) if normaliser is None else normaliser)
  log_ratio = jax.lax.stop_gradient(logp - old)
  return loss, {"loss/policy_avg": loss, "policy/clipfrac_avg": losses.masked_mean(clipped, mask),
                "policy/approxkl_avg": 0.5 * losses.masked_mean(jnp.square(log_ratio), mask),
                "val/ratio": losses.masked_mean(jnp.exp(log_ratio), mask),
                "grpo/kl_k3": losses.masked_mean(jax.lax.stop_gradient(kl), mask),
                "grpo/zero_std_groups": jnp.mean(jnp.all(advantages == 0, axis=-1))}


@register
class GRPO(Algorithm):
  name = "grpo"
  options = {"loss_type": ("grpo", checks.one_of(*LOSS_TYPES)),
             "eps_low": (0.2, checks.positive),     # DAPO's clip-higher: ratio clipped to
             "eps_high": (0.28, checks.positive)}   # [1 - eps_low, 1 + eps_high] (loss_type='dapo')

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    loss_type: str
    beta: float
    eps: float
    eps_low: float
    eps_high: float

  def loss(self, params, batch, normaliser=None, hp=None):
    logp, _, _ = self.token_logprobs(params, batch)
    hp = hp or self.hp
    return grpo_loss(logp, self.old_logprobs(batch, logp), batch["logp_ref"], batch["rewards"], batch["response_mask"],
                     loss_type=hp.loss_type, beta=hp.beta, eps=hp.eps, eps_low=hp.eps_low, eps_high=hp.eps_high,
                     sample_weight=batch.get("sample_weight"), normaliser=normaliser)

  def count(self, batch):
    return grpo_normaliser(batch["response_mask"], self.hp.loss_type)
