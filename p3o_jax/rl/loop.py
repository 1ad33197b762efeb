"""The RL loop: sample -> score -> prepare -> update -> log -> checkpoint, in plain Python.

Each arrow is a jitted function (sampler, teacher-forced log-probs, reward model, update).
Everything a resumed run needs to continue bitwise is checkpointed: params and optimizer
state, the step, the prompt order, the running reward statistics and the KL coefficient;
the rollout and update keys are folded from the seed and the iteration number.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import checkpoint, sharding, train_state
from p3o_jax.data.batching import EpochIterator
from p3o_jax.eval import frontier
from p3o_jax.models import decoder
from p3o_jax.rl import trainers
from p3o_jax.rl.rollout import Experience, Roller, RunningMoments, process_scores

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Policy:
  """A model as the loops use it: static graph, params dict, and its tokenizer."""
  cfg: object
  graph: object
  params: dict


def rollout_metrics(exp: Experience, kl_coef: float, eos_id: int) -> dict:
  """Rollout statistics under TRL's names where the quantity is the same."""
  seq_kl = exp.seq_kl
  lengths = exp.response_mask.sum(-1)
  out = {
      "objective/scores": float(exp.scores.mean()),
      "objective/kl": float(seq_kl.mean()),
      "objective/non_score_reward": float(-kl_coef * seq_kl.mean()),
      "objective/rlhf_reward": float((exp.scores - kl_coef * seq_kl).mean()),
      "objective/entropy": float(-(exp.logp_old * exp.response_mask).sum(-1).mean()),
      "val/num_eos_tokens": float(exp.has_eos.sum()),
      "val/response_length": float(lengths.mean()),
  }
  if exp.gold is not None:
    out["gold/reward"] = float(np.mean(exp.gold))
  return out


def evaluate(roller: Roller, params, queries, query_masks, rng, step: int, baseline=None) -> dict:
  """One sample per held-out prompt: the KL-reward frontier point at this step."""
  exp = roller(params, queries, query_masks, rng, k=1, baseline=baseline)
  record = {frontier.KL_KEY: float(exp.seq_kl.mean()), frontier.REWARD_KEY: float(exp.scores.mean()),
            "eval/kl_stderr": float(exp.seq_kl.std() / np.sqrt(len(exp.seq_kl))),
            "eval/reward_stderr": float(exp.scores.std() / np.sqrt(len(exp.scores)))}
  if exp.gold is not None:
    record[frontier.GOLD_KEY] = float(np.mean(exp.gold))
  return record


def train(config, workdir: str, policy: Policy, ref_params, roller_factory: Callable[..., Roller], *,
          train_queries, eval_queries, logger, critic: Policy | None = None, stop=None,
          train_baseline: np.ndarray | None = None, eval_baseline: np.ndarray | None = None) -> tuple[dict, dict]:
  """Runs config.rl.iterations RL iterations; returns (policy params, final eval record).

  train_queries / eval_queries: (tokens [N, P], mask [N, P]) left-padded prompt arrays.
  train_baseline / eval_baseline: [N] per-prompt rewards subtracted from the scores (or None).
  roller_factory(value_fn) -> Roller (the caller binds reference, reward and gold sources).
  """
  rl, algo = config.rl, config.rl.algo
  k = rl.k
  updates_per_iter = rl.inner_epochs * rl.num_minibatches
  tx = train_state.make_optimizer(config.optim, rl.iterations * updates_per_iter)
  temperature = config.sampler.temperature

  axes = decoder.logical_axes(policy.graph)
  if algo == "ppo":
    critic_graph = None
    if rl.critic == "head":
      D = policy.cfg.hidden_size
      critic_params = {"kernel": jnp.zeros((D, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}
    elif rl.critic == "separate":
      if critic is None:
        raise ValueError("rl.critic='separate' needs a reward model to initialise the critic from")
      critic_graph, critic_params = critic.graph, critic.params
    else:
      raise ValueError(f"rl.critic={rl.critic!r}; expected 'head' or 'separate'")
    params = {"policy": policy.params, "critic": critic_params}
    critic_axes = (decoder.logical_axes(critic_graph) if critic_graph is not None
                   else {"kernel": ("embed", None), "bias": (None,)})
    axes = {"policy": axes, "critic": critic_axes}
    loss_fn = trainers.ppo_loss_fn(policy.graph, critic_graph, rl, temperature)
    roller = roller_factory(trainers.critic_values_fn(policy.graph, critic_graph))
  elif algo == "p3o":
    params, loss_fn, roller = policy.params, trainers.p3o_loss_fn(policy.graph, rl, temperature), roller_factory(None)
  elif algo == "online_dpo":
    params, loss_fn = policy.params, trainers.online_dpo_loss_fn(policy.graph, rl, temperature)
    roller = roller_factory(None)
  else:
    raise ValueError(f"rl.algo={algo!r}; expected one of {trainers.ALGOS}")
  policy_params = (lambda p: p["policy"]) if algo == "ppo" else (lambda p: p)

  mesh = sharding.mesh_from_config(config.mesh)
  state = train_state.create(params, tx)
  state_shardings = sharding.train_state_shardings(state, axes, mesh)
  state = jax.device_put(state, state_shardings)
  update = trainers.make_update(loss_fn, tx, epochs=rl.inner_epochs, num_minibatches=rl.num_minibatches,
                                state_shardings=state_shardings, micro_batches=rl.micro_batches,
                                count_fn=trainers.COUNTS[algo](rl))
  queries, query_masks = train_queries
  order = EpochIterator(len(queries), rl.prompts_per_rollout, seed=config.seed)
  moments = RunningMoments() if rl.reward_scaling else None
  kl = trainers.AdaptiveKL(rl.kl_init if algo == "ppo" else rl.beta,
                           rl.kl_target if (algo == "ppo" and rl.adaptive_kl) else None, rl.kl_horizon)
  key = jax.random.key(config.seed)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), keep=config.ckpt.keep)
  start = 0
  if config.ckpt.resume and ckpt.latest_step() is not None:
    restored = ckpt.restore(jax.tree.map(checkpoint.abstract_like, state))
    state, start, meta = restored.state, restored.step, restored.meta
    order.restore(meta["data"])
    kl.value = meta["kl_coef"]
    if moments is not None:
      moments = RunningMoments(**meta["reward_moments"])
    log.info("rl: resumed from iteration %d", start)

  eval_key = jax.random.key(config.seed + 1)  # the same held-out samples' keys at every eval
  if start == 0:  # the frontier's first point: the initial policy
    record = evaluate(roller, policy_params(state.params), *eval_queries, eval_key, 0, eval_baseline)
    logger.log(0, {**record, "algo": algo})
  bar = logger.progress(rl.iterations, desc=f"rl/{algo}", initial=start)
  record, t0, tokens = {}, time.time(), 0
  for it in range(start, rl.iterations):
    rollout_key, update_key = jax.random.split(jax.random.fold_in(key, it))
    idx = next(order)
    exp = roller(policy_params(state.params), queries[idx], query_masks[idx], rollout_key, k,
                 value_params=state.params, baseline=None if train_baseline is None else train_baseline[idx])
    rewards = process_scores(exp.scores, clip=rl.reward_clip, moments=moments)
    if algo == "p3o":
      batch = trainers.p3o_prepare(exp, rewards)
    elif algo == "ppo":
      batch = trainers.ppo_prepare(exp, rewards, kl_coef=kl.value, gamma=rl.gamma, lam=rl.lam,
                                   whiten_advantages=rl.whiten_advantages)
    else:
      batch = trainers.online_dpo_prepare(exp, exp.scores)
    state, step_metrics = update(state, sharding.shard_batch(batch, mesh), update_key)
    step_metrics = jax.device_get(step_metrics)
    metrics = {name: float(np.mean(v)) for name, v in step_metrics.items()}
    if "val/ratio" in step_metrics:  # PITFALLS 1: exactly 1 on the first minibatch of an update
      metrics["val/ratio_first_minibatch"] = float(np.asarray(step_metrics["val/ratio"]).reshape(-1)[0])
    if not np.isfinite(metrics["loss/total"]):
      raise FloatingPointError(f"rl: non-finite loss at iteration {it + 1}; nothing saved. {metrics}")
    metrics.update(rollout_metrics(exp, kl.value, roller.eos_id))
    tokens += exp.num_response_tokens
    metrics["rl/tokens_per_s"] = tokens / (time.time() - t0)
    metrics["objective/kl_coef"] = kl.value
    kl.update(metrics["objective/kl"], rl.prompts_per_rollout * k)
    done = it + 1
    if done % config.eval.every == 0 or done == rl.iterations:
      record = evaluate(roller, policy_params(state.params), *eval_queries, eval_key, done, eval_baseline)
      logger.log(done, {**record, "algo": algo})
    logger.log(done, metrics)
    bar.advance(1, tokens=exp.num_response_tokens, score=metrics["objective/scores"], kl=metrics["objective/kl"])
    stopping = stop is not None and stop.requested
    if done % config.ckpt.every == 0 or done == rl.iterations or stopping:
      ckpt.save(done, state, meta={"data": order.state(), "kl_coef": kl.value,
                                   "reward_moments": moments.state() if moments else None})
    if stopping:
      log.warning("rl: stop requested; saved iteration %d", done)
      break
  bar.close()
  ckpt.close()
  return policy_params(state.params), record
