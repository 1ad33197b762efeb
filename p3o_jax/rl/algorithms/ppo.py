"""PPO as the P3O paper ran it (trlx; Ziegler et al. 2019, Ouyang et al. 2022): per-token KL
penalty in the reward with the score at the last response token, GAE against a critic,
whitened advantages, the clipped token surrogate plus a clipped value loss (`losses.ppo`),
and the adaptive KL controller."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import losses
from p3o_jax.models import decoder
from p3o_jax.rl import sequences
from p3o_jax.rl.algorithms.base import Algorithm, KLController, group, group_rows, register, rows


def ppo_advantages(exp, scores: np.ndarray, *, kl_coef: float, gamma: float, lam: float,
                   whiten_advantages: bool = True) -> dict:
  """Per-token reward -kl_coef * (log pi_old - log pi_ref) plus the score at the last response
  token; GAE advantages against the rollout values; returns = advantages + values."""
  mask = exp.response_mask.astype(np.float32)
  rewards = -np.float32(kl_coef) * (exp.logp_old - exp.logp_ref) * mask  # float32 whatever kl_coef's type
  last = np.maximum(mask.sum(-1).astype(np.int64) - 1, 0)
  rewards[np.arange(len(last)), last] += scores
  values = exp.values * mask
  advantages, returns = losses.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  if whiten_advantages:  # statistics over the whole rollout, every process's rows
    everything = losses.whiten(jnp.asarray(exp.all_rows(advantages)), jnp.asarray(exp.all_rows(mask)))
    advantages = exp.own(everything)
  return dict(values=values, advantages=np.asarray(advantages), returns=np.asarray(returns))


def _head_values(head, hidden):
  """rl.critic='head': a linear value head on the policy's hidden states -> [N, R]."""
  return (hidden.astype(jnp.float32) @ head["kernel"] + head["bias"])[..., 0]


def _critic_values(critic_graph, critic_params, query, query_mask, response, response_mask):
  """rl.critic='separate': the critic model's scalar head at each response position -> [N, R]."""
  model, hidden = sequences.response_hidden(critic_graph, critic_params, query, query_mask, response, response_mask)
  return model.scalar(hidden)


@register
class PPO(Algorithm):
  name = "ppo"
  order = 1
  uses_critic = True
  reads_old_in_prepare = True

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    eps: float
    gamma: float
    lam: float
    vf_coef: float
    cliprange_value: float
    critic: str
    kl_init: float
    kl_target: float
    kl_horizon: int
    adaptive_kl: bool
    whiten_advantages: bool

  def __init__(self, rl, graph, temperature, critic_graph=None):
    super().__init__(rl, graph, temperature, critic_graph)
    if self.hp.critic not in ("head", "separate"):
      raise ValueError(f"rl.critic={self.hp.critic!r}; expected 'head' or 'separate'")
    if self.hp.critic == "head":
      self.critic_graph = None  # a linear head on the policy's hidden states

  def init_params(self, policy, critic=None):
    """{'policy', 'critic'}: the critic is a zero linear head on the policy's hidden states
    (rl.critic='head') or a separate model with a scalar head, initialised from the reward
    model ('separate')."""
    if self.hp.critic == "head":
      D = policy.cfg.hidden_size
      critic_params = {"kernel": jnp.zeros((D, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}
      critic_axes = {"kernel": ("embed", None), "bias": (None,)}
    else:
      if critic is None:
        raise ValueError("rl.critic='separate' needs a reward model to initialise the critic from")
      # A trainable copy in the policy's param dtype (the reward model may be stored in
      # model.frozen_dtype), with its layout: the update donates the buffers it is given.
      dtype = jax.tree.leaves(policy.params)[0].dtype
      layout = jax.tree.map(lambda x: x.sharding, critic.params)
      self.critic_graph = critic.graph
      critic_params = jax.jit(lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree),
                              out_shardings=layout)(critic.params)
      critic_axes = decoder.logical_axes(critic.graph)
    return ({"policy": policy.params, "critic": critic_params},
            {"policy": policy.logical_axes(), "critic": critic_axes})

  def policy_params(self, params):
    return params["policy"]

  def value_fn(self):
    graph, critic_graph = self.graph, self.critic_graph

    def values(params, query, query_mask, response, response_mask):
      if critic_graph is None:
        _, hidden = sequences.response_hidden(graph, params["policy"], query, query_mask, response, response_mask)
        return _head_values(params["critic"], hidden)
      return _critic_values(critic_graph, params["critic"], query, query_mask, response, response_mask)
    return values

  def kl_controller(self):
    hp = self.hp
    return KLController(hp.kl_init, hp.kl_target if hp.adaptive_kl else None, hp.kl_horizon)

  def make_batch(self, exp, rewards, kl_coef):
    hp = self.hp
    return group(exp, **ppo_advantages(exp, rewards, kl_coef=kl_coef, gamma=hp.gamma, lam=hp.lam,
                                       whiten_advantages=hp.whiten_advantages))

  def loss(self, params, batch, normaliser=None, hp=None):
    """params = {'policy': ..., 'critic': ...}."""
    hp = hp or self.hp
    logp, model, hidden = self.token_logprobs(params["policy"], batch)
    flat = rows(batch)
    values = (_head_values(params["critic"], hidden) if self.critic_graph is None
              else _critic_values(self.critic_graph, params["critic"], *group_rows(batch)))
    entropy = sequences.response_entropy(model, hidden, flat["response_mask"], self.temperature)
    advantages = flat["advantages"]
    if "sample_weight" in flat:
      advantages = advantages * flat["sample_weight"]
    loss, metrics = losses.ppo(
        logp.reshape(flat["response_mask"].shape), flat["logp_old"], advantages, flat["response_mask"],
        eps=hp.eps, values=values, old_values=flat["values"], returns=flat["returns"],
        eps_value=hp.cliprange_value, vf_coef=hp.vf_coef, normaliser=normaliser)
    return loss, {**metrics, "policy/entropy_avg": entropy}

  def count(self, batch):
    """Valid response tokens of the whole minibatch (PPO averages per token)."""
    return losses.ppo_normaliser(batch["response_mask"].astype(bool), "token")

