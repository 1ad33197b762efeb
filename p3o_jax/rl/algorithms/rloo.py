"""RLOO, REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs"), as
TRL's RLOOTrainer runs it: the sequence KL to the reference as a detached k1 penalty in the
reward, each response's baseline the mean reward of the prompt's other K - 1 responses, and a
PPO-clipped SEQUENCE-level ratio.

At K = 2 the advantage is r_1 - r_2, already pairwise and shift-invariant like P3O's Delta; at
the on-policy point its gradient equals unclipped P3O-V1's. They part off-policy: P3O weights
each side by the other response's ratio (Theorem 1) and clips differently."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from p3o_jax import losses
from p3o_jax.rl.algorithms.base import Algorithm, register


def rloo_loss(logp, old_logp, ref_logp, scores, mask, *, beta: float, eps: float, sample_weight=None,
              normaliser=None):
  """RLOO's loss (to minimise) on [B, K, T] token log-probs, [B, K] scores and [B, K, T] masks:

    kl_k  = sum_t (old_logp - ref_logp)                         (detached k1)
    R_k   = score_k - beta * kl_k
    A_k   = R_k - 1/(K-1) sum_{j != k} R_j                      (times sample_weight_k, if given)
    rho_k = exp(sum_t logp - old_logp)
    L     = sum_k max(-A_k rho_k, -A_k clip(rho_k, 1 - eps, 1 + eps)) / normaliser (default B*K)
  """
  mask = mask.astype(bool)
  logp = jnp.where(mask, logp, 0.0)
  old = jax.lax.stop_gradient(jnp.where(mask, old_logp, 0.0))
  ref = jax.lax.stop_gradient(jnp.where(mask, ref_logp, 0.0))
  kl = jnp.sum(old - ref, axis=-1)
  advantages = jax.lax.stop_gradient(losses.leave_one_out_advantages(scores - beta * kl))
  if sample_weight is not None:
    advantages = advantages * jax.lax.stop_gradient(sample_weight)
  log_ratio = jnp.sum(logp - old, axis=-1)
  per_seq, clipped = losses.clipped_surrogate(log_ratio, advantages, eps, eps)
  count = jnp.float32(per_seq.size)
  loss = jnp.sum(per_seq) / (count if normaliser is None else normaliser)
  ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
  return loss, {"loss/policy_avg": loss, "policy/clipfrac_avg": jnp.mean(clipped),
                "policy/approxkl_avg": 0.5 * jnp.mean(jnp.square(jax.lax.stop_gradient(log_ratio))),
                "val/ratio": jnp.mean(ratio), "rloo/advantage_abs": jnp.mean(jnp.abs(advantages)),
                "rloo/kl": jnp.mean(kl)}


@register
class RLOO(Algorithm):
  name = "rloo"
  weight_level = "sequence"

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    beta: float
    eps: float

  def loss(self, params, batch, normaliser=None, hp=None):
    hp = hp or self.hp
    logp, _, _ = self.token_logprobs(params, batch)
    return rloo_loss(logp, self.old_logprobs(batch, logp), batch["logp_ref"], batch["rewards"], batch["response_mask"],
                     beta=hp.beta, eps=hp.eps, sample_weight=batch.get("sample_weight"),
                     normaliser=normaliser)
