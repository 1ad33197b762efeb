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


@dataclasses.dataclass
class Prompts:
  """The loop's prompts: how many, how to tokenize the rows a process feeds, their baselines."""
  count: int
  tokenize: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # row indices -> (tokens, mask) [n, P]
  baseline: np.ndarray | None = None  # [count] per-prompt rewards subtracted from the scores


def rollout_metrics(exp: Experience, kl_coef: float, eos_id: int) -> dict:
  """Rollout statistics under TRL's names where the quantity is the same, over every
  process's rows."""
  seq_kl, scores = exp.all_rows(exp.seq_kl), exp.all_rows(exp.scores)
  lengths = exp.all_rows(exp.response_mask.sum(-1))
  entropy = exp.all_rows(-(exp.logp_old * exp.response_mask).sum(-1))
  out = {
      "objective/scores": float(scores.mean()),
      "objective/kl": float(seq_kl.mean()),
      "objective/non_score_reward": float(-kl_coef * seq_kl.mean()),
      "objective/rlhf_reward": float((scores - kl_coef * seq_kl).mean()),
      "objective/entropy": float(entropy.mean()),
      "val/num_eos_tokens": float(exp.all_rows(exp.has_eos).sum()),
      "val/response_length": float(lengths.mean()),
  }
  if exp.gold is not None:
    out["gold/reward"] = float(np.mean(exp.all_rows(exp.gold)))
  return out


def evaluate(roller: Roller, params, prompts: Prompts, split, queries, rng, step: int) -> dict:
  """One sample per held-out prompt: the KL-reward frontier point at this step."""
  baseline = None if prompts.baseline is None else prompts.baseline[split.rows]
  exp = roller(params, *queries, rng, k=1, baseline=baseline, split=split)
  seq_kl, scores = exp.all_rows(exp.seq_kl), exp.all_rows(exp.scores)
  record = {frontier.KL_KEY: float(seq_kl.mean()), frontier.REWARD_KEY: float(scores.mean()),
            "eval/kl_stderr": float(seq_kl.std() / np.sqrt(len(seq_kl))),
            "eval/reward_stderr": float(scores.std() / np.sqrt(len(scores)))}
  if exp.gold is not None:
    record[frontier.GOLD_KEY] = float(np.mean(exp.all_rows(exp.gold)))
  return record


def train(config, workdir: str, policy: Policy, ref_params, roller_factory: Callable[..., Roller], *,
          train_prompts: Prompts, eval_prompts: Prompts, logger, critic: Policy | None = None,
          stop=None) -> tuple[dict, dict]:
  """Runs config.rl.iterations RL iterations; returns (policy params, final eval record).

  Each process tokenizes only the prompt rows its devices hold (sharding.RowSplit) of the
  global order a single process would use. roller_factory(value_fn) -> Roller (the caller
  binds reference, reward and gold sources).
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
  state, state_shardings = train_state.create_on_mesh(params, tx, axes, mesh)
  update = trainers.make_update(loss_fn, tx, epochs=rl.inner_epochs, num_minibatches=rl.num_minibatches,
                                state_shardings=state_shardings, micro_batches=rl.micro_batches,
                                count_fn=trainers.COUNTS[algo](rl))
  order = EpochIterator(train_prompts.count, rl.prompts_per_rollout, seed=config.seed)
  split = sharding.RowSplit(rl.prompts_per_rollout, mesh)       # this process's rows of each rollout
  eval_split = sharding.RowSplit(eval_prompts.count, mesh)
  eval_queries = eval_prompts.tokenize(eval_split.rows)
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
    record = evaluate(roller, policy_params(state.params), eval_prompts, eval_split, eval_queries, eval_key, 0)
    logger.log(0, {**record, "algo": algo})
  bar = logger.progress(rl.iterations, desc=f"rl/{algo}", initial=start)
  record, t0, tokens, prompts_read = {}, time.time(), 0, 0
  for it in range(start, rl.iterations):
    rollout_key, update_key = jax.random.split(jax.random.fold_in(key, it))
    idx = next(order)[split.rows]
    prompts_read += len(idx)
    exp = roller(policy_params(state.params), *train_prompts.tokenize(idx), rollout_key, k,
                 value_params=state.params, split=split,
                 baseline=None if train_prompts.baseline is None else train_prompts.baseline[idx])
    rewards = process_scores(exp.scores, clip=rl.reward_clip, moments=moments, everything=exp.all_rows)
    if algo == "p3o":
      batch = trainers.p3o_prepare(exp, rewards)
    elif algo == "ppo":
      batch = trainers.ppo_prepare(exp, rewards, kl_coef=kl.value, gamma=rl.gamma, lam=rl.lam,
                                   whiten_advantages=rl.whiten_advantages)
    else:
      batch = trainers.online_dpo_prepare(exp, exp.scores)
    state, step_metrics = update(state, split.to_global(batch), update_key)
    step_metrics = jax.device_get(step_metrics)
    metrics = {name: float(np.mean(v)) for name, v in step_metrics.items()}
    if "val/ratio" in step_metrics:  # PITFALLS 1: exactly 1 on the first minibatch of an update
      metrics["val/ratio_first_minibatch"] = float(np.asarray(step_metrics["val/ratio"]).reshape(-1)[0])
    if not np.isfinite(metrics["loss/total"]):
      raise FloatingPointError(f"rl: non-finite loss at iteration {it + 1}; nothing saved. {metrics}")
    metrics.update(rollout_metrics(exp, kl.value, roller.eos_id))
    response_tokens = exp.num_response_tokens
    tokens += response_tokens
    metrics["rl/tokens_per_s"] = tokens / (time.time() - t0)
    metrics["objective/kl_coef"] = kl.value
    kl.update(metrics["objective/kl"], rl.prompts_per_rollout * k)
    done = it + 1
    if done % config.eval.every == 0 or done == rl.iterations:
      record = evaluate(roller, policy_params(state.params), eval_prompts, eval_split, eval_queries, eval_key, done)
      logger.log(done, {**record, "algo": algo})
    logger.log(done, metrics)
    bar.advance(1, tokens=response_tokens, score=metrics["objective/scores"], kl=metrics["objective/kl"])
    stopping = stop is not None and stop.requested
    if done % config.ckpt.every == 0 or done == rl.iterations or stopping:
      ckpt.save(done, state, meta={"data": order.state(), "kl_coef": kl.value,
                                   "reward_moments": moments.state() if moments else None})
    if stopping:
      log.warning("rl: stop requested; saved iteration %d", done)
      break
  bar.close()
  ckpt.close()
  log.info("rl: process %d of %d tokenized %d prompts: rows %s of each %d-prompt rollout", jax.process_index(),
           jax.process_count(), prompts_read, sharding.row_ranges(split.rows), rl.prompts_per_rollout)
  return policy_params(state.params), record
