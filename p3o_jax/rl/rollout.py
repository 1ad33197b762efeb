"""Rollout: K responses per prompt from the jitted sampler, scored, with old and reference
log-probs and the sequence KL. Everything here runs once per RL iteration, outside the
update; every arrow is a jitted function.

Rows are prompt-major: row b * K + k is the k-th response to prompt b.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import sampling
from p3o_jax.rl import sequences


class RewardSource(Protocol):
  def __call__(self, query, query_mask, response, response_mask) -> np.ndarray: ...


class ModelReward:
  """A Flax reward model (scalar head read at the last real token)."""

  def __init__(self, graph, params):
    self.params = params
    self._score = jax.jit(functools.partial(sequences.response_scores, graph))

  def __call__(self, query, query_mask, response, response_mask):
    return np.asarray(self._score(self.params, query, query_mask, response, response_mask))


class TextReward:
  """Any Python function of the decoded texts: fn(prompts: list[str], responses: list[str])."""

  def __init__(self, fn: Callable, tokenizer):
    self.fn, self.tokenizer = fn, tokenizer

  def __call__(self, query, query_mask, response, response_mask):
    prompts, responses = decode_rows(self.tokenizer, query, query_mask, response, response_mask)
    return np.asarray(self.fn(prompts, responses), np.float32)


def decode_rows(tokenizer, query, query_mask, response, response_mask):
  """Texts of the real tokens only: masks, never token ids, decide what is real (PITFALLS 2).

  The response keeps special tokens other than its final EOS, so a stray pad or BOS that the
  policy emitted is scored as what it is rather than silently dropped.
  """
  query, query_mask = np.asarray(query), np.asarray(query_mask).astype(bool)
  response, response_mask = np.asarray(response), np.asarray(response_mask).astype(bool)
  eos = tokenizer.eos_token_id
  prompts = tokenizer.batch_decode([q[m] for q, m in zip(query, query_mask)], skip_special_tokens=True)
  kept = []
  for r, m in zip(response, response_mask):
    ids = r[m]
    kept.append(ids[:-1] if len(ids) and ids[-1] == eos else ids)
  return prompts, tokenizer.batch_decode(kept, skip_special_tokens=False)


@dataclasses.dataclass
class Experience:
  """One rollout, as host arrays. N = prompts * K rows."""
  query: np.ndarray           # [N, P] left-padded
  query_mask: np.ndarray      # [N, P]
  response: np.ndarray        # [N, R] right-padded after EOS
  response_mask: np.ndarray   # [N, R] 1 up to and including the first EOS
  logp_old: np.ndarray        # [N, R] per-token, under the policy that sampled
  logp_ref: np.ndarray        # [N, R] per-token, under the frozen reference
  scores: np.ndarray          # [N] reward source output, after the missing-EOS penalty
  has_eos: np.ndarray         # [N] bool
  k: int                      # responses per prompt
  values: np.ndarray | None = None  # [N, R] PPO only
  gold: np.ndarray | None = None    # [N] the demo's gold reward, for logging

  @property
  def seq_kl(self) -> np.ndarray:
    """k1 estimate of KL(pi || pi_ref) per response: sum_t log pi - log pi_ref (PITFALLS 4)."""
    return ((self.logp_old - self.logp_ref) * self.response_mask).sum(-1)

  @property
  def num_response_tokens(self) -> int:
    return int(self.response_mask.sum())


class Roller:
  """Samples and scores. Holds the jitted functions so they compile once per shape."""

  def __init__(self, graph, ref_params, reward: RewardSource, *, sampler_cfg, eos_id: int, pad_id: int,
               missing_eos_penalty: float | None = None, value_fn: Callable | None = None,
               gold: RewardSource | None = None, mesh=None):
    self.graph, self.ref_params, self.reward, self.gold = graph, ref_params, reward, gold
    self.mesh = mesh  # each batch shard of the mesh samples its own rows (sampling.generate)
    self.sampler_cfg, self.eos_id, self.pad_id = sampler_cfg, eos_id, pad_id
    self.missing_eos_penalty = missing_eos_penalty
    temperature = sampler_cfg.temperature
    self._logprobs = jax.jit(functools.partial(sequences.response_logprobs, graph, temperature=temperature))
    self._value_fn = value_fn

  def __call__(self, params, query, query_mask, rng, k: int, value_params=None,
               baseline: np.ndarray | None = None) -> Experience:
    """baseline: [B] per-prompt reward subtracted from each of its K scores (or None)."""
    s = self.sampler_cfg
    out = sampling.generate(
        self.graph, params, query, query_mask, rng, max_new_tokens=s.max_new_tokens, num_samples=k,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_new_tokens=s.get("min_new_tokens", 0),
        eos_id=self.eos_id, pad_id=self.pad_id, mesh=self.mesh)
    query = jnp.repeat(jnp.asarray(query), k, axis=0)
    query_mask = jnp.repeat(jnp.asarray(query_mask), k, axis=0)
    response, response_mask = out.tokens, out.mask.astype(jnp.int32)
    # Old log-probs from the trainer's own forward: the first inner step's ratio is exactly 1.
    logp_old = self._logprobs(params, query, query_mask, response, response_mask)
    logp_ref = self._logprobs(self.ref_params, query, query_mask, response, response_mask)
    has_eos = np.asarray(((response == self.eos_id) & (response_mask > 0)).any(-1))
    scores = np.asarray(self.reward(query, query_mask, response, response_mask), np.float32)
    if scores.shape != (response.shape[0],):  # a scalar or [N, 1] would broadcast silently below
      raise ValueError(f"reward source returned scores of shape {scores.shape}; expected "
                       f"({response.shape[0]},), one per response row")
    if not np.all(np.isfinite(scores)):
      bad = np.flatnonzero(~np.isfinite(scores))
      raise FloatingPointError(f"reward source returned non-finite scores at rows {bad[:10].tolist()}")
    if baseline is not None:
      scores = scores - np.repeat(np.asarray(baseline, np.float32), k)
    if self.missing_eos_penalty is not None:
      scores = scores - self.missing_eos_penalty * (~has_eos)
    exp = Experience(
        query=np.asarray(query), query_mask=np.asarray(query_mask), response=np.asarray(response),
        response_mask=np.asarray(response_mask), logp_old=np.asarray(logp_old), logp_ref=np.asarray(logp_ref),
        scores=scores, has_eos=has_eos, k=k)
    if self._value_fn is not None and value_params is not None:
      exp.values = np.asarray(self._value_fn(value_params, query, query_mask, response, response_mask))
    if self.gold is not None:
      exp.gold = self.gold(query, query_mask, response, response_mask)
    return exp


def reference_rewards(reward: RewardSource, query, query_mask, response, response_mask,
                      chunk: int = 64) -> np.ndarray:
  """[N] rewards of given (prompt, response) rows, e.g. each prompt's dataset response: the
  baseline of rl.reward_baseline='reference'. Scored in chunks of `chunk` rows."""
  out = [reward(query[i:i + chunk], query_mask[i:i + chunk], response[i:i + chunk], response_mask[i:i + chunk])
         for i in range(0, len(query), chunk)]
  scores = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in out])
  if scores.shape != (len(query),) or not np.all(np.isfinite(scores)):
    raise ValueError(f"reference rewards: expected {len(query)} finite scores, got shape {scores.shape}")
  return scores


class RunningMoments:
  """Running mean/std over all rewards seen (Chan et al. parallel update); host-side, saved
  in checkpoints so a resumed run scales rewards exactly as before (PITFALLS 10)."""

  def __init__(self, count=0.0, mean=0.0, m2=0.0):
    self.count, self.mean, self.m2 = float(count), float(mean), float(m2)

  def update(self, x: np.ndarray):
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
      return
    n, mean, m2 = x.size, x.mean(), ((x - x.mean()) ** 2).sum()
    delta, total = mean - self.mean, self.count + n
    self.mean += delta * n / total
    self.m2 += m2 + delta ** 2 * self.count * n / total
    self.count = total

  @property
  def std(self) -> float:
    return float(np.sqrt(self.m2 / max(self.count - 1, 1)))

  def state(self) -> dict:
    return {"count": self.count, "mean": self.mean, "m2": self.m2}


def process_scores(scores: np.ndarray, *, clip: float | None, moments: RunningMoments | None) -> np.ndarray:
  """Reward clip to +-clip, then divide by the running std (no mean shift: P3O is invariant to
  per-prompt shifts anyway, and PPO's critic sees the same scale). The std is guarded."""
  scores = np.asarray(scores, np.float32)
  if clip is not None and clip > 0:
    scores = np.clip(scores, -clip, clip)
  if moments is not None:
    moments.update(scores)
    std = moments.std
    if np.isfinite(std) and std > 1e-8:
      scores = scores / std
  return scores
