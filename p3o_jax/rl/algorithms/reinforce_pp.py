"""REINFORCE++ (Hu 2025, arXiv 2501.03262; OpenRLHF's `advantage_estimator='reinforce'`): no
critic and no per-prompt baseline. The per-token reward is the k1 KL penalty with the score
added at the last response token, the return is its sum to the end of the response, and the
returns are normalised over the whole rollout (every process's rows); the loss is PPO's
clipped token surrogate, averaged per token."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from p3o_jax import losses
from p3o_jax.rl.algorithms.base import Algorithm, group, register, rows


def reinforce_pp_advantages(scores, logp_old, logp_ref, mask, *, kl_coef: float):
  """[n] scores, [n, R] log-probs and mask -> [n, R] returns (not yet normalised):

    r_t = -kl_coef * (logp_old_t - logp_ref_t) + [t = last] * score,   G_t = sum_{s >= t} r_s
  """
  mask = np.asarray(mask, np.float32)
  rewards = -np.float32(kl_coef) * (np.asarray(logp_old, np.float32) - np.asarray(logp_ref, np.float32)) * mask
  last = np.maximum(mask.sum(-1).astype(np.int64) - 1, 0)
  rewards[np.arange(len(last)), last] += scores
  return np.cumsum(rewards[:, ::-1], axis=-1)[:, ::-1] * mask


@register
class ReinforcePP(Algorithm):
  name = "reinforce_pp"
  reads_old_in_prepare = True

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    beta: float
    eps: float

  def make_batch(self, exp, rewards, kl_coef):
    returns = reinforce_pp_advantages(rewards, exp.logp_old, exp.logp_ref, exp.response_mask, kl_coef=kl_coef)
    mask = exp.response_mask.astype(bool)
    everything = losses.whiten(jnp.asarray(exp.all_rows(returns)), jnp.asarray(exp.all_rows(mask)))
    return group(exp, advantages=exp.own(everything))

  def loss(self, params, batch, normaliser=None, hp=None):
    hp = hp or self.hp
    logp, _, _ = self.token_logprobs(params, batch)
    flat = rows(batch)
    advantages = flat["advantages"]
    if "sample_weight" in flat:
      advantages = advantages * flat["sample_weight"]
    return losses.ppo(logp.reshape(flat["response_mask"].shape), flat["logp_old"], advantages,
                      flat["response_mask"], eps=hp.eps, normaliser=normaliser)

  def count(self, batch):
    """Valid response tokens of the whole minibatch."""
    return losses.ppo_normaliser(batch["response_mask"].astype(bool), "token")
