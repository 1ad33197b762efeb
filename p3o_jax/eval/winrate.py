"""Head-to-head win rates between final policies on the same prompts.

Two judges, as in the paper: the reward model (policy i wins prompt n when its response
scores higher) and a judge model (a callable, e.g. a wrapper around an LLM grader).
A tie counts as half a win, so matrix[i, j] + matrix[j, i] = 1 and the diagonal is 0.5.

Position bias: LLM judges favour the first (or second) response shown. The judge path
draws, per comparison, whether policy i's response is shown first or second (seeded
RNG, so runs repeat) and maps the verdict back to policy i. A judge that always prefers
the first slot then scores about 0.5 for every pair instead of inflating one side.

Shape letters: N prompts, M policies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

JudgeFn = Callable[[str, str, str], float]  # (prompt, first, second) -> 1 / 0 / 0.5
_JUDGE_VERDICTS = (0.0, 0.5, 1.0)


class WinRate(NamedTuple):
  """P(a beats b) with ties as half, its standard error, and the counts behind it."""
  rate: float
  stderr: float
  wins: int
  ties: int
  losses: int

  @property
  def n(self) -> int:
    return self.wins + self.ties + self.losses


def _rewards(name: str, values) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array [N], got shape {array.shape}")
  bad = np.flatnonzero(~np.isfinite(array))
  if bad.size:
    raise ValueError(f"{name} has non-finite values at rows {bad[:10].tolist()}")
  return array


def bootstrap_stderr(scores, num_resamples: int = 1000, seed: int = 0) -> float:
  """Standard deviation of the mean of `scores` [N] over bootstrap resamples of prompts."""
  scores = np.asarray(scores, dtype=np.float64)
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, scores.size, size=(num_resamples, scores.size))  # [R, N]
  return float(scores[rows].mean(axis=1).std(ddof=1))


def win_rate_from_scores(scores, stderr: str = "analytic", num_resamples: int = 1000,
              seed: int = 0) -> WinRate:
  """WinRate from per-prompt scores [N] in {0, 0.5, 1}.

  stderr 'analytic': sample std (ddof=1) / sqrt(N) of the scores, which is the binomial
  sqrt(p(1-p)/N) (times sqrt(N/(N-1))) when there are no ties, and stays right with ties.
  stderr 'bootstrap': resample prompts with replacement.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(f"scores must be a non-empty 1-D array [N], got shape {scores.shape}")
  if not np.all(np.isin(scores, _JUDGE_VERDICTS)):
    raise ValueError(f"scores must be 0, 0.5 or 1, got {np.unique(scores).tolist()}")
  if stderr == "analytic":
    se = float(scores.std(ddof=1) / math.sqrt(scores.size)) if scores.size > 1 else math.nan
  elif stderr == "bootstrap":
    se = bootstrap_stderr(scores, num_resamples, seed)
  else:
    raise ValueError(f"stderr must be 'analytic' or 'bootstrap', got {stderr!r}")
  return WinRate(rate=float(scores.mean()), stderr=se, wins=int(np.sum(scores == 1.0)),
                 ties=int(np.sum(scores == 0.5)), losses=int(np.sum(scores == 0.0)))


def reward_scores(rewards_a, rewards_b, tie_tolerance: float = 0.0) -> np.ndarray:
  """Per-prompt score [N] of a against b: 1 if a's reward is higher, 0.5 within tolerance."""
  a, b = _rewards("rewards_a", rewards_a), _rewards("rewards_b", rewards_b)
  if a.shape != b.shape:
    raise ValueError(f"rewards_a shape {a.shape} != rewards_b shape {b.shape}: "
                     "win rates compare responses to the same prompts")
  diff = a - b
  return np.where(np.abs(diff) <= tie_tolerance, 0.5, (diff > 0).astype(np.float64))


def win_rate(rewards_a, rewards_b, stderr: str = "analytic",
             tie_tolerance: float = 0.0) -> WinRate:
  """P(policy a beats b) by reward on the same N prompts; rewards_a[n], rewards_b[n]."""
  return win_rate_from_scores(reward_scores(rewards_a, rewards_b, tie_tolerance), stderr)


def _matrix_from_pairs(names: list[str], pair_rate: Callable[[int, int], float]) -> np.ndarray:
  num = len(names)
  matrix = np.full((num, num), 0.5)  # [M, M]
  for i in range(num):
    for j in range(i + 1, num):
      matrix[i, j] = pair_rate(i, j)
      matrix[j, i] = 1.0 - matrix[i, j]
  return matrix


def win_rate_matrix(rewards_by_policy: Mapping[str, Sequence[float]],
                    tie_tolerance: float = 0.0) -> tuple[list[str], np.ndarray]:
  """(names [M], matrix [M, M]) with matrix[i, j] = P(policy i beats j) by reward.

  Every policy's rewards [N] must be for the same N prompts, in the same order.
  """
  names = list(rewards_by_policy)
  if not names:
    raise ValueError("rewards_by_policy is empty")
  rewards = [_rewards(f"rewards of {name!r}", rewards_by_policy[name]) for name in names]
  for name, values in zip(names, rewards):
    if values.shape != rewards[0].shape:
      raise ValueError(f"rewards of {name!r} have shape {values.shape}, "
                       f"{names[0]!r} has {rewards[0].shape}: policies must share prompts")
  return names, _matrix_from_pairs(
      names, lambda i, j: float(reward_scores(rewards[i], rewards[j], tie_tolerance).mean()))


def judge_scores(prompts: Sequence[str], responses_a: Sequence[str],
                 responses_b: Sequence[str], judge_fn: JudgeFn,
                 rng: np.random.Generator) -> np.ndarray:
  """Per-prompt score [N] of a against b by the judge, with the shown order randomised.

  For each prompt a coin decides whether a is shown first; the verdict (1: first wins,
  0: second wins, 0.5: tie) is mapped back to a's point of view.
  """
  if not len(prompts) == len(responses_a) == len(responses_b):
    raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses_a)} and "
                     f"{len(responses_b)} responses")
  a_first = rng.random(len(prompts)) < 0.5  # [N]
  scores = np.empty(len(prompts))
  for n, prompt in enumerate(prompts):
    first, second = ((responses_a[n], responses_b[n]) if a_first[n]
                     else (responses_b[n], responses_a[n]))
    verdict = float(judge_fn(prompt, first, second))
    if verdict not in _JUDGE_VERDICTS:
      raise ValueError(f"judge_fn returned {verdict!r} for prompt {n}; expected 1, 0 or 0.5")
    scores[n] = verdict if a_first[n] else 1.0 - verdict
  return scores


def win_rate_matrix_by_judge(responses_by_policy: Mapping[str, Sequence[str]],
                             prompts: Sequence[str], judge_fn: JudgeFn,
                             seed: int = 0) -> tuple[list[str], np.ndarray]:
  """(names [M], matrix [M, M]): matrix[i, j] = P(judge prefers policy i's response to j's).

  judge_fn(prompt, first, second) returns 1 when `first` is better, 0 when `second` is,
  0.5 for a tie. Each policy pair and prompt is judged once, in an order drawn from an RNG
  seeded by `seed` (see the module docstring on position bias).
  """
  names = list(responses_by_policy)
  if not names:
    raise ValueError("responses_by_policy is empty")
  if len(prompts) == 0:
    raise ValueError("prompts is empty")
  for name in names:
    if len(responses_by_policy[name]) != len(prompts):
      raise ValueError(f"policy {name!r} has {len(responses_by_policy[name])} responses "
                       f"for {len(prompts)} prompts")
  rng = np.random.default_rng(seed)
  return names, _matrix_from_pairs(names, lambda i, j: float(judge_scores(
      prompts, responses_by_policy[names[i]], responses_by_policy[names[j]], judge_fn,
      rng).mean()))
