"""P3O, PPO and online DPO as (prepare, loss) pairs over one shared jitted update.

Each algorithm supplies
  prepare(exp, ...) -> batch             host side: rewards, advantages, winners; arrays [G, K, ...]
  loss_fn(params, batch, normaliser)     pure: minibatch of groups -> (loss, metrics)
  count(rl)(batch) -> normaliser         the minibatch's loss count, for exact micro-batching
and `make_update` runs inner epochs x minibatches as nested `lax.scan`s inside one jit, each
scan step the pure `(state, batch) -> (state, metrics)` of `train_state.make_step`.
A group is the K responses to one prompt, kept together so pairs never straddle minibatches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import losses, train_state
from p3o_jax.rl import sequences
from p3o_jax.rl.rollout import Experience

ALGOS = ("p3o", "ppo", "online_dpo")


def group(exp: Experience, **extra) -> dict:
  """Rollout arrays regrouped [N, ...] -> [N / K, K, ...] plus any extra per-row arrays."""
  arrays = dict(query=exp.query, query_mask=exp.query_mask, response=exp.response,
                response_mask=exp.response_mask, logp_old=exp.logp_old, logp_ref=exp.logp_ref, **extra)
  return {k: np.asarray(v).reshape(-1, exp.k, *np.shape(v)[1:]) for k, v in arrays.items()}


def _rows(batch):
  """[M, K, ...] -> [M * K, ...] for the model forward."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def _policy_logprobs(graph, params, rows, temperature):
  return sequences.response_logprobs_and_hidden(
      graph, params, rows["query"], rows["query_mask"], rows["response"], rows["response_mask"], temperature)


# ----------------------------------------------------------------------------- P3O

def p3o_prepare(exp: Experience, rewards: np.ndarray) -> dict:
  return group(exp, rewards=rewards)


def p3o_count(rl):
  """The whole minibatch's P3O normaliser (pairs, or mean pair tokens): see losses.p3o_normaliser."""
  def count(batch):
    mask = batch["response_mask"].astype(bool)
    return losses.p3o_normaliser(jnp.ones(mask.shape[:2], bool), mask, rl.normalise)
  return count


def p3o_loss_fn(graph, rl, temperature: float):
  def loss_fn(params, batch, normaliser=None):
    M, K = batch["rewards"].shape
    rows = _rows(batch)
    logp_tok, _, _ = _policy_logprobs(graph, params, rows, temperature)
    shape = (M, K, -1)
    return losses.p3o(
        logp_tok.reshape(shape), batch["logp_old"], batch["logp_ref"], batch["rewards"],
        token_mask=batch["response_mask"], variant=rl.variant, beta=rl.beta, eps=rl.eps, c=rl.c,
        kl_source=rl.kl_source, whiten_delta=rl.whiten_delta, clip_per_token=rl.clip_per_token,
        normalise=rl.normalise, normaliser=normaliser)
  return loss_fn


# ----------------------------------------------------------------------------- online DPO

def online_dpo_prepare(exp: Experience, scores: np.ndarray) -> dict:
  """The reward model picks the winner of each pair of samples."""
  if exp.k != 2:
    raise ValueError(f"online DPO compares two samples per prompt; rl.k={exp.k}")
  chosen = np.argmax(np.asarray(scores).reshape(-1, 2), axis=1).astype(np.int32)
  batch = group(exp)
  batch["chosen"] = chosen
  return batch


def online_dpo_count(rl):
  """One term per prompt (pair)."""
  return lambda batch: jnp.float32(batch["chosen"].shape[0])


def online_dpo_loss_fn(graph, rl, temperature: float):
  def loss_fn(params, batch, normaliser=None):
    rows = _rows({k: v for k, v in batch.items() if k != "chosen"})
    logp_tok, _, _ = _policy_logprobs(graph, params, rows, temperature)
    mask = batch["response_mask"]
    logp = (logp_tok.reshape(mask.shape) * mask).sum(-1)          # [M, 2]
    ref = (batch["logp_ref"] * mask).sum(-1)
    pick = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
    c, r = batch["chosen"], 1 - batch["chosen"]
    return losses.dpo(pick(logp, c), pick(logp, r), pick(ref, c), pick(ref, r), beta=rl.dpo_beta,
                      normaliser=normaliser)
  return loss_fn


# ----------------------------------------------------------------------------- PPO

class AdaptiveKL:
  """Ziegler et al. adaptive KL coefficient (trlx defaults: init 0.05, target 6, horizon 10000)."""

  def __init__(self, value: float, target: float | None, horizon: int):
    self.value, self.target, self.horizon = float(value), target, horizon

  def update(self, current_kl: float, n_steps: int):
    if self.target:
      error = np.clip(current_kl / self.target - 1.0, -0.2, 0.2)
      self.value *= 1.0 + error * n_steps / self.horizon


def ppo_prepare(exp: Experience, scores: np.ndarray, *, kl_coef: float, gamma: float, lam: float,
                whiten_advantages: bool = True) -> dict:
  """Per-token reward -kl_coef * (log pi_old - log pi_ref) plus the score at the last response
  token; GAE advantages against the rollout values; returns = advantages + values."""
  mask = exp.response_mask.astype(np.float32)
  rewards = -kl_coef * (exp.logp_old - exp.logp_ref) * mask
  last = np.maximum(mask.sum(-1).astype(np.int64) - 1, 0)
  rewards[np.arange(len(last)), last] += scores
  values = exp.values * mask
  advantages, returns = losses.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  if whiten_advantages:  # statistics over the whole rollout, every process's rows
    everything = losses.whiten(jnp.asarray(exp.all_rows(advantages)), jnp.asarray(exp.all_rows(mask)))
    advantages = exp.own(everything)
  return group(exp, values=values, advantages=advantages, returns=returns)


def ppo_count(rl):
  """Valid response tokens of the whole minibatch (PPO averages per token)."""
  return lambda batch: losses.ppo_normaliser(batch["response_mask"].astype(bool), "token")


def ppo_loss_fn(graph, critic_graph, rl, temperature: float):
  """params = {'policy': ..., 'critic': ...}; the critic is a linear head on the policy's
  hidden states (rl.critic='head') or a separate model with a scalar head ('separate')."""
  def loss_fn(params, batch, normaliser=None):
    rows = _rows(batch)
    logp_tok, model, hidden = _policy_logprobs(graph, params["policy"], rows, temperature)
    values = (_head_values(params["critic"], hidden) if critic_graph is None
              else _critic_values(critic_graph, params["critic"], rows))
    entropy = sequences.response_entropy(model, hidden, rows["response_mask"], temperature)
    loss, metrics = losses.ppo(
        logp_tok, rows["logp_old"], rows["advantages"], rows["response_mask"], eps=rl.eps,
        values=values, old_values=rows["values"], returns=rows["returns"],
        eps_value=rl.cliprange_value, vf_coef=rl.vf_coef, normaliser=normaliser)
    return loss, {**metrics, "policy/entropy_avg": entropy}
  return loss_fn


def _head_values(head, hidden):
  """rl.critic='head': a linear value head on the policy's hidden states -> [N, R]."""
  return (hidden.astype(jnp.float32) @ head["kernel"] + head["bias"])[..., 0]


def _critic_values(critic_graph, critic_params, rows):
  """rl.critic='separate': the critic model's scalar head at each response position -> [N, R]."""
  model, hidden = sequences.response_hidden(critic_graph, critic_params, rows["query"], rows["query_mask"],
                                            rows["response"], rows["response_mask"])
  return model.scalar(hidden)


def critic_values_fn(graph, critic_graph):
  """Rollout-time values [N, R] for the critic layout that `ppo_loss_fn` trains."""
  def values(params, query, query_mask, response, response_mask):
    if critic_graph is None:
      _, hidden = sequences.response_hidden(graph, params["policy"], query, query_mask, response, response_mask)
      return _head_values(params["critic"], hidden)
    rows = dict(query=query, query_mask=query_mask, response=response, response_mask=response_mask)
    return _critic_values(critic_graph, params["critic"], rows)
  return jax.jit(values)


# ----------------------------------------------------------------------------- the shared update

COUNTS = {"p3o": p3o_count, "ppo": ppo_count, "online_dpo": online_dpo_count}


def make_update(loss_fn, tx, *, epochs: int, num_minibatches: int, state_shardings=None,
                micro_batches: int = 1, count_fn=None):
  """(state, batch of G groups, rng) -> (state, metrics[epochs, num_minibatches]), jitted once.

  Every epoch reshuffles the groups; G must divide evenly into minibatches (config checks it).
  With `state_shardings` the new state keeps the old one's layout on the mesh, so the donated
  buffers are reused and the next call hits the same compiled program. `micro_batches` and
  `count_fn` accumulate each minibatch's gradient exactly (see train_state.make_step).
  """
  step = train_state.make_step(loss_fn, tx, micro_batches=micro_batches, count_fn=count_fn)

  def update(state, batch, rng):
    G = next(iter(batch.values())).shape[0]
    size = G // num_minibatches

    def epoch(state, key):
      order = jax.random.permutation(key, G)[: size * num_minibatches].reshape(num_minibatches, size)
      return jax.lax.scan(lambda s, idx: step(s, jax.tree.map(lambda x: x[idx], batch)), state, order)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, epochs))
    return state, metrics

  if state_shardings is None:
    return jax.jit(update, donate_argnums=0)
  mesh = jax.tree.leaves(state_shardings)[0].mesh  # metrics replicated: every process reads them
  return jax.jit(update, donate_argnums=0,
                 out_shardings=(state_shardings, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
