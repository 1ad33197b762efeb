"""Offline preference optimisation (the DPO family): train on a preference dataset, evaluate
on the KL-reward frontier as the RL loop does.

    pairs -> [reference log-probs, once] -> supervised.fit(algorithm's loss) -> frontier evals

The algorithm (`OfflineAlgorithm` in `p3o_jax/rl/algorithms/`) supplies the loss; this module
builds its batches (of pairs, or for KTO of single labelled responses, `unpair`), computes the
reference's sequence log-probs of every row once before training (so a step runs no reference
pass, as TRL's precompute_ref_log_probs), and every eval.every steps samples the held-out prompts
to log the same frontier records the RL loop logs (`loop.evaluate`). Sizes and the optimizer
come from `config.dpo`.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from p3o_jax import sharding, supervised
from p3o_jax.data import batching
from p3o_jax.models import lora
from p3o_jax.models.policy import Policy
from p3o_jax.rl import algorithms, loop
from p3o_jax.rl.rollout import Roller

log = logging.getLogger(__name__)


def pair_batches(config, tokenizer, pairs: dict):
  """make_rows(indices) -> the preference batch of those pairs (`batching.preference_batch`); of
  `unpair`'s examples, each response and its mismatched one in the two slots, with its label."""
  first, second = ("completion", "mismatched") if "label" in pairs else ("chosen", "rejected")

  def make_rows(idx):
    pick = lambda key: [pairs[key][i] for i in idx]
    rows = batching.preference_batch(tokenizer, pick("prompt"), pick(first), pick(second),
                                     config.data.max_prompt_len, config.sampler.max_new_tokens,
                                     config.data.truncate_prompts)
    return rows | ({"label": np.asarray(pick("label"), np.float32)} if "label" in pairs else {})
  return make_rows


def unpair(pairs: dict) -> dict:
  """KTO's examples: of preference pairs, as TRL unpairs a paired dataset, every chosen response
  labelled desirable (1), then every rejected one undesirable (0); of an unpaired dataset
  ({prompt, completion, label}), its rows as they are. Each example also gets a `mismatched`
  response for the KL reference point: the next example's (cyclically) whose prompt differs from
  its own, so a prompt's other responses never estimate it."""
  if "label" in pairs:
    prompts, completions = list(pairs["prompt"]), list(pairs["completion"])
    labels = [float(bool(label)) for label in pairs["label"]]
  else:
    n = len(pairs["prompt"])
    prompts, completions = list(pairs["prompt"]) * 2, list(pairs["chosen"]) + list(pairs["rejected"])
    labels = [1.0] * n + [0.0] * n
  n = len(prompts)
  mismatched = []
  for i, prompt in enumerate(prompts):
    j = next((j % n for j in range(i + 1, i + n) if prompts[j % n] != prompt), None)
    if j is None:
      raise ValueError(f"KTO's KL reference point needs responses to at least two prompts; all {n} responses "
                       f"answer the prompt {prompt[:60]!r}")
    mismatched.append(completions[j])
  return {"prompt": prompts, "completion": completions, "mismatched": mismatched, "label": labels}


def reference_logprobs(score, params, make_rows, num_pairs: int, batch_size: int, mesh) -> np.ndarray:
  """[num_pairs, 2] sequence log-probs of both slots (chosen and rejected, or KTO's response and
  its mismatched one) under `params` by `score` (the jitted `algo.sequence_logprobs`, made once
  by the caller so that every call reuses its program), batch_size pairs at a time (the last
  batch filled by wrapping round, so one program serves all), each process computing its rows of
  each batch; every process gets all of them."""
  split = sharding.RowSplit(batch_size, mesh)
  out = np.zeros((num_pairs, 2), np.float32)
  for start in range(0, num_pairs, batch_size):
    rows = np.arange(start, start + batch_size) % num_pairs
    logp = split.gather(split.local(score(params, split.to_global(make_rows(rows[split.rows])))))
    out[rows[: min(batch_size, num_pairs - start)]] = logp[: min(batch_size, num_pairs - start)]
  if not np.all(np.isfinite(out)):
    bad = np.flatnonzero(~np.isfinite(out).all(-1))
    raise FloatingPointError(f"reference log-probs are not finite for pairs {bad[:10].tolist()}")
  return out


def train(config, workdir: str, policy: Policy, roller: Roller, *, pairs: dict, eval_prompts: loop.Prompts,
          logger, held_out_pairs: dict | None = None, stop=None) -> tuple[dict, dict]:
  """Trains `config.rl.algo` (an offline algorithm) on `pairs` ({'prompt', 'chosen', 'rejected'}
  lists) for config.dpo.steps steps from `policy`, which is also the reference; returns (params,
  the last eval record). Each evaluation also scores the loss on `held_out_pairs`, when given
  (`held_out/*`: the implicit reward's accuracy on pairs it does not train on). A policy holding
  LoRA adapters trains them alone, as in `loop.train`."""
  algo = algorithms.create(config.rl, policy.graph, temperature=1.0)
  if algo.unpaired:
    pairs, held_out_pairs = unpair(pairs), held_out_pairs and unpair(held_out_pairs)
  elif "label" in pairs:
    raise ValueError(f"rl.algo={config.rl.algo!r} trains on pairs; data.preference={config.data.preference!r} holds "
                     "unpaired responses (prompt, completion, label), which train rl.algo='kto' alone")
  num_pairs = len(pairs["prompt"])
  if num_pairs < config.dpo.batch_size:
    raise ValueError(f"rl.algo={config.rl.algo!r}: {num_pairs} preference {'examples' if algo.unpaired else 'pairs'}"
                     f", fewer than dpo.batch_size={config.dpo.batch_size}")
  mesh = sharding.mesh_from_config(config.mesh)
  score = jax.jit(algo.sequence_logprobs)  # one program for the training pairs' and the held-out ones

  def batches_of(some_pairs):
    """make_batch(indices) of `some_pairs`, with the reference's log-probs when the loss reads them:
    the policy's own forward at the start (its adapters, B = 0, add nothing)."""
    make_rows, count = pair_batches(config, policy.tokenizer, some_pairs), len(some_pairs["prompt"])
    ref = (reference_logprobs(score, lora.without_adapters(policy.params), make_rows, count, config.dpo.batch_size,
                              mesh) if algo.uses_reference else None)
    return lambda idx: make_rows(idx) | ({} if ref is None else {"ref_logp": ref[idx]})

  make_batch = batches_of(pairs)
  held_out = None
  if held_out_pairs:
    held_out = supervised.held_out_metrics(lambda p, batch: algo.loss(p, batch), batches_of(held_out_pairs),
                                           len(held_out_pairs["prompt"]), config.dpo.batch_size, mesh)
  log.info("%s: %d preference %s, %d held out", config.rl.algo, num_pairs, "examples" if algo.unpaired else "pairs",
           len(held_out_pairs["prompt"]) if held_out_pairs else 0)

  frontier_record = loop.frontier_evaluator(config, roller, eval_prompts, mesh,
                                            *loop.policy_views(roller, policy.params))
  last = {}

  def evaluate(step, params):
    last.clear()
    last.update(frontier_record(step, params))
    if held_out is not None:
      last.update({f"held_out/{k}": v for k, v in held_out(params).items()})
    logger.log(step, last)

  # Its metrics are logged under TRL's DPO names (loss/total, rewards/*, logps/*) beside the eval
  # records; its hyperparameters' floats are inputs of the step, so a beta sweep compiles it once.
  params, metrics = supervised.fit(
      f"rl/{config.rl.algo}", lambda p, batch, hp: algo.loss(p, batch, hp=hp), policy.params, make_batch, num_pairs,
      params_axes=policy.logical_axes(), mesh_cfg=config.mesh, stage_cfg=config.dpo, seed=config.seed,
      workdir=workdir, logger=logger, ckpt_cfg=config.ckpt, log_every=config.log.every, stop=stop,
      evaluate=evaluate, eval_every=config.eval.every, metric_prefix="", hyper=algo.hp)
  return params, {**metrics, **last}
