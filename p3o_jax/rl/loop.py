"""The RL loop: sample -> score -> prepare -> update -> log -> checkpoint, in plain Python.

Each arrow is a jitted function (sampler, teacher-forced log-probs, reward model, update);
the algorithm (`p3o_jax/rl/algorithms/`) supplies `prepare`, `loss` and `count`, and this loop
names none. Everything a resumed run needs to continue bitwise is checkpointed: params and
optimizer state, the step, the prompt order, the running reward statistics and the KL
coefficient; the rollout and update keys are folded from the seed and the iteration number.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable

import jax
import numpy as np

from p3o_jax import resume, sharding, train_state
from p3o_jax.data.batching import EpochIterator
from p3o_jax.eval import frontier
from p3o_jax.models import lora
from p3o_jax.models.policy import Policy
from p3o_jax.rl import algorithms
from p3o_jax.rl.rollout import Experience, Roller, RunningMoments, process_scores
from p3o_jax.rl.update import for_run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prompts:
  """The loop's prompts: how many, how to tokenize the rows a process feeds, their baselines, and
  their dataset's other columns (what a Python reward reads beside the texts)."""
  count: int
  tokenize: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # row indices -> (tokens, mask) [n, P]
  baseline: np.ndarray | None = None  # [count] per-prompt rewards subtracted from the scores
  columns: Callable[[np.ndarray], dict] | None = None  # row indices -> {name: a value per row}

  def columns_of(self, rows) -> dict | None:
    return None if self.columns is None else self.columns(rows)


def rollout_metrics(exp: Experience, kl_coef: float) -> dict:
  """Rollout statistics under TRL's names where the quantity is the same, over every
  process's rows."""
  seq_kl, scores = exp.all_rows(exp.seq_kl), exp.all_rows(exp.scores)
  lengths = exp.all_rows(exp.response_mask.sum(-1))
  entropy = exp.all_rows(-(exp.logp_policy * exp.response_mask).sum(-1))
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


def evaluate(roller: Roller, params, prompts: Prompts, split, queries, rng, step: int, algo: str,
             chunk: int = 0, ref_params=None, greedy: bool = False) -> dict:
  """One sample per held-out prompt: the KL-reward frontier point at this step, as the record
  the frontier reader loads (`frontier.eval_record`). `chunk` prompts at a time when it divides
  their number. greedy: also the mean reward of the greedy responses (eval/greedy_reward; for
  a verifiable reward, the accuracy most papers report), which a KL estimate cannot use."""
  baseline = None if prompts.baseline is None else prompts.baseline[split.rows]
  chunk = chunk if chunk and prompts.count % chunk == 0 else None
  run = functools.partial(roller, params, *queries, rng, k=1, baseline=baseline, split=split, chunk=chunk,
                          ref_params=ref_params, columns=prompts.columns_of(split.rows))
  exp = run()
  gold = None if exp.gold is None else exp.all_rows(exp.gold)
  point = frontier.frontier_point(algo, step, exp.all_rows(exp.seq_kl), exp.all_rows(exp.scores), gold)
  record = {k: v for k, v in frontier.eval_record(point).items() if k != frontier.STEP_KEY}
  if greedy:
    argmax = run(greedy=True, old_pass=False)
    record["eval/greedy_reward"] = float(np.mean(argmax.all_rows(argmax.scores)))
  return record


def policy_views(roller: Roller, params, policy_params=lambda p: p) -> tuple[Callable, Callable]:
  """(view, reference) of a run's trained params. `view(params)`: what the sampler and the
  evaluations read, a policy holding LoRA adapters as the model's params with its targeted kernels
  `lora.Adapted` (x W + (x A) s B in every matmul, decoding included: no merged copy of the
  weights, and the sampler computes what the update does). `reference(params)`: for a roller
  built without a reference, the one it reads at each call, the policy's frozen model; else None."""
  view = jax.jit(lora.adapted) if lora.has_adapters(params) else (lambda p: p)
  if roller.ref_params is None:
    return view, lambda p: lora.without_adapters(policy_params(p))
  return view, lambda p: None


def frontier_evaluator(config, roller: Roller, prompts: Prompts, mesh, view: Callable, reference: Callable,
                       policy_params=lambda p: p) -> Callable[[int, dict], dict]:
  """fn(step, params) -> the frontier record of the trained `params` on the held-out prompts
  (`evaluate`), each process tokenizing its rows once; the same sampling keys at every evaluation."""
  split = sharding.RowSplit(prompts.count, mesh)
  queries = prompts.tokenize(split.rows)
  return lambda step, params: evaluate(roller, policy_params(view(params)), prompts, split, queries,
                                       jax.random.key(config.seed + 1), step, config.rl.algo,
                                       config.rl.rollout_chunk, reference(params), config.eval.greedy)


def train(config, workdir: str, policy: Policy, roller: Roller, *, train_prompts: Prompts, eval_prompts: Prompts,
          logger, critic: Policy | None = None, stop=None) -> tuple[dict, dict]:
  """Runs config.rl.iterations RL iterations of `config.rl.algo`; returns (policy params, final
  eval record). A policy holding LoRA adapters (models/lora.py) trains them alone, and the
  params returned hold them: `lora.merged` gives the model's own.

  Each process tokenizes only the prompt rows its devices hold (sharding.RowSplit) of the
  global order a single process would use. `critic`: the reward model, for algorithms that
  initialise a separate critic from it (they copy it: the update donates its buffers).
  """
  rl = config.rl
  algo = algorithms.create(rl, policy.graph, config.sampler.temperature)
  total_steps = rl.iterations * rl.inner_epochs * rl.num_minibatches
  tx = train_state.make_optimizer(config.optim, total_steps)
  params, axes = algo.init_params(policy, critic)
  view, reference = policy_views(roller, policy.params, algo.policy_params)
  order = EpochIterator(train_prompts.count, rl.prompts_per_rollout, seed=config.seed)
  run = resume.start("rl", params, tx, axes, mesh_cfg=config.mesh, workdir=workdir, ckpt_cfg=config.ckpt,
                     order=order)
  # The hyperparameters go in as inputs of the update (`hyper`): a sweep over them compiles it once.
  update, hyper = for_run(algo, config.optim, total_steps, epochs=rl.inner_epochs, num_minibatches=rl.num_minibatches,
                          state_shardings=run.shardings, micro_batches=rl.micro_batches)
  value_fn = algo.value_fn()
  old_pass = not algo.skips_old_pass(rl)  # one epoch of one minibatch: the update's forward is pi_old's
  split = sharding.RowSplit(rl.prompts_per_rollout, run.mesh)      # this process's rows of each rollout
  evaluator = frontier_evaluator(config, roller, eval_prompts, run.mesh, view, reference, algo.policy_params)
  moments = RunningMoments() if rl.reward_scaling else None
  kl = algo.kl_controller()
  if run.start:
    kl.value = run.meta["kl_coef"]
    if moments is not None:
      moments = RunningMoments(**run.meta["reward_moments"])
  key = jax.random.key(config.seed)

  def held_out(step):
    record = evaluator(step, run.state.params)
    logger.log(step, record)
    return record

  record = held_out(0) if run.start == 0 else {}  # the frontier's first point: the initial policy
  bar = logger.progress(rl.iterations, desc=f"rl/{rl.algo}", initial=run.start)
  t0, tokens, prompts_read = time.time(), 0, 0
  for it in range(run.start, rl.iterations):
    rollout_key, update_key = jax.random.split(jax.random.fold_in(key, it))
    idx = next(order)[split.rows]
    prompts_read += len(idx)
    now = view(run.state.params)
    exp = roller(algo.policy_params(now), *train_prompts.tokenize(idx), rollout_key, rl.k,
                 split=split, critic=None if value_fn is None else (value_fn, now), chunk=rl.rollout_chunk,
                 baseline=None if train_prompts.baseline is None else train_prompts.baseline[idx], old_pass=old_pass,
                 ref_params=reference(run.state.params), columns=train_prompts.columns_of(idx))
    rewards = process_scores(exp.scores, clip=rl.reward_clip, moments=moments, everything=exp.all_rows)
    batch, metrics = algo.prepare(exp, rewards, kl.value)
    run.state, step_metrics = update(run.state, split.to_global(batch), update_key, hyper)
    step_metrics = jax.device_get(step_metrics)
    metrics.update({name: float(np.mean(v)) for name, v in step_metrics.items()})
    if "val/ratio" in step_metrics:  # docs/pitfalls.md, 1: exactly 1 on the first minibatch of an update
      metrics["val/ratio_first_minibatch"] = float(np.asarray(step_metrics["val/ratio"]).reshape(-1)[0])
    if not np.isfinite(metrics["loss/total"]):
      raise FloatingPointError(f"rl: non-finite loss at iteration {it + 1}; nothing saved. {metrics}")
    metrics.update(rollout_metrics(exp, kl.value))
    response_tokens = exp.num_response_tokens
    tokens += response_tokens
    metrics["rl/tokens_per_s"] = tokens / (time.time() - t0)
    metrics["objective/kl_coef"] = kl.value
    kl.update(metrics["objective/kl"], rl.prompts_per_rollout * rl.k)
    done = it + 1
    if done % config.eval.every == 0 or done == rl.iterations:
      record = held_out(done)
    logger.log(done, metrics)
    bar.advance(1, tokens=response_tokens, score=metrics["objective/scores"], kl=metrics["objective/kl"])
    if run.checkpoint(done, rl.iterations, stop, {"kl_coef": kl.value,
                                                  "reward_moments": moments.state() if moments else None}):
      break
  bar.close()
  run.close()
  log.info("rl: process %d of %d tokenized %d prompts: rows %s of each %d-prompt rollout", jax.process_index(),
           jax.process_count(), prompts_read, sharding.row_ranges(split.rows), rl.prompts_per_rollout)
  return algo.policy_params(run.state.params), record
