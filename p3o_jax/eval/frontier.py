"""KL-reward frontier: mean reward against mean sequence-level KL, per algorithm.

The paper's main plot (docs/algorithms.md, How it is evaluated): every N steps the policy
samples responses to held-out prompts; for each response the caller computes

  seq_kl[n]  = sum over response tokens of log pi_theta - log pi_ref   (k1, on own samples)
  rewards[n] = reward-model score of the response (and gold[n], a gold RM, if any)

and `frontier_point` reduces them to means with standard errors. Reward against KL is
close to a straight line, so frontiers are compared through least-squares lines:
algorithm A dominates B when A's line is at least B's over the KL range both cover.

Log format (what the RL loop writes, what `load_frontier` reads). One JSON object per
line; training metrics may share the file, only lines holding `KL_KEY` are eval records:

  {"step": 400, "algo": "p3o", "eval/kl": 3.1, "eval/reward": 0.42,
   "eval/kl_stderr": 0.2, "eval/reward_stderr": 0.03,             # optional
   "eval/gold_reward": 0.1, "eval/gold_reward_stderr": 0.02}      # optional

`eval_record(point)` builds exactly this dict, so the loop need not spell the keys.

Shape letters: N evaluation responses (one per held-out prompt), P points, G grid size.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from p3o_jax import metrics_log

# Keys of an eval record in the JSONL training log.
STEP_KEY = "step"
ALGO_KEY = "algo"
KL_KEY = "eval/kl"
REWARD_KEY = "eval/reward"
GOLD_KEY = "eval/gold_reward"
KL_STDERR_KEY = "eval/kl_stderr"
REWARD_STDERR_KEY = "eval/reward_stderr"
GOLD_STDERR_KEY = "eval/gold_reward_stderr"
EVAL_KEYS = {
    "step": STEP_KEY, "algo": ALGO_KEY, "kl": KL_KEY, "reward": REWARD_KEY,
    "gold_reward": GOLD_KEY, "kl_stderr": KL_STDERR_KEY,
    "reward_stderr": REWARD_STDERR_KEY, "gold_reward_stderr": GOLD_STDERR_KEY,
}


@dataclasses.dataclass(frozen=True)
class FrontierPoint:
  """One evaluation of one policy: means and standard errors over N held-out prompts.

  A stderr of NaN means unknown (a log record that did not carry it).
  """
  algo: str
  step: int
  kl: float
  kl_stderr: float
  reward: float
  reward_stderr: float
  gold_reward: float | None = None
  gold_reward_stderr: float | None = None


class Line(NamedTuple):
  """reward = intercept + slope * kl, fitted on `num_points` points with KL in [kl_min, kl_max]."""
  intercept: float
  slope: float
  kl_min: float
  kl_max: float
  num_points: int

  def __call__(self, kl):
    return self.intercept + self.slope * np.asarray(kl, dtype=np.float64)


def _as_finite_1d(name: str, values) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1:
    raise ValueError(f"{name} must be 1-D [N], got shape {array.shape}")
  if array.size < 2:
    raise ValueError(f"{name} needs at least 2 values for a standard error, got {array.size}")
  bad = np.flatnonzero(~np.isfinite(array))
  if bad.size:
    raise ValueError(f"{name} has non-finite values at rows {bad[:10].tolist()}")
  return array


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  """Sample mean and standard error of the mean (ddof=1) of a 1-D array [N]."""
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def frontier_point(algo: str, step: int, seq_kl, rewards, gold=None) -> FrontierPoint:
  """Reduces per-response KL [N], reward [N] (and gold reward [N]) to one frontier point."""
  seq_kl = _as_finite_1d("seq_kl", seq_kl)
  rewards = _as_finite_1d("rewards", rewards)
  if rewards.shape != seq_kl.shape:
    raise ValueError(f"rewards shape {rewards.shape} != seq_kl shape {seq_kl.shape}")
  kl, kl_se = mean_and_stderr(seq_kl)
  reward, reward_se = mean_and_stderr(rewards)
  gold_mean = gold_se = None
  if gold is not None:
    gold = _as_finite_1d("gold", gold)
    if gold.shape != seq_kl.shape:
      raise ValueError(f"gold shape {gold.shape} != seq_kl shape {seq_kl.shape}")
    gold_mean, gold_se = mean_and_stderr(gold)
  return FrontierPoint(str(algo), int(step), kl, kl_se, reward, reward_se, gold_mean, gold_se)


def eval_record(point: FrontierPoint) -> dict:
  """The JSONL record for a point (the keys `load_frontier` reads)."""
  record = {STEP_KEY: point.step, ALGO_KEY: point.algo, KL_KEY: point.kl,
            KL_STDERR_KEY: point.kl_stderr, REWARD_KEY: point.reward,
            REWARD_STDERR_KEY: point.reward_stderr}
  if point.gold_reward is not None:
    record[GOLD_KEY] = point.gold_reward
    record[GOLD_STDERR_KEY] = point.gold_reward_stderr
  return record


def _point_from_record(record: dict, where: str, algo: str | None) -> FrontierPoint:
  def number(key, default=None):
    value = record.get(key, default)
    if value is None:
      return None
    try:
      return float(value)
    except (TypeError, ValueError):
      raise ValueError(f"{where}: {key!r} is not a number: {value!r}") from None

  for key in (STEP_KEY, REWARD_KEY):
    if key not in record:
      raise ValueError(f"{where}: eval record has {KL_KEY!r} but no {key!r}")
  name = record.get(ALGO_KEY, algo)
  if name is None:
    raise ValueError(f"{where}: eval record has no {ALGO_KEY!r} and no algo= was given")
  gold = number(GOLD_KEY)
  return FrontierPoint(
      algo=str(name), step=int(record[STEP_KEY]),
      kl=number(KL_KEY), kl_stderr=number(KL_STDERR_KEY, math.nan),
      reward=number(REWARD_KEY), reward_stderr=number(REWARD_STDERR_KEY, math.nan),
      gold_reward=gold,
      gold_reward_stderr=None if gold is None else number(GOLD_STDERR_KEY, math.nan))


def load_frontier(jsonl_paths: str | os.PathLike | Iterable[str | os.PathLike],
                  algo: str | None = None) -> list[FrontierPoint]:
  """Collects eval records from JSONL training logs, sorted by (algo, step).

  Lines without `KL_KEY` (training metrics) are skipped. `algo` names records that lack
  `ALGO_KEY`. A resumed run may log a step twice: the later record wins. Malformed lines (a
  last line cut by a crash, garbage) are skipped and counted in a warning
  (`metrics_log.read_records`).
  """
  if isinstance(jsonl_paths, (str, os.PathLike)):
    jsonl_paths = [jsonl_paths]
  points: dict[tuple[str, int], FrontierPoint] = {}
  for path in jsonl_paths:
    for number, record in metrics_log.read_records(path)[0]:
      if KL_KEY not in record:
        continue
      point = _point_from_record(record, f"{path}:{number}", algo)
      points[(point.algo, point.step)] = point
  return [points[key] for key in sorted(points)]


def by_algo(points: Iterable[FrontierPoint]) -> dict[str, list[FrontierPoint]]:
  """Groups points by algorithm (first-seen order), each group sorted by step."""
  groups: dict[str, list[FrontierPoint]] = {}
  for point in points:
    groups.setdefault(point.algo, []).append(point)
  return {name: sorted(group, key=lambda p: p.step) for name, group in groups.items()}


def _fit(kl: np.ndarray, y: np.ndarray, what: str) -> Line:
  if kl.size < 2 or np.ptp(kl) == 0:
    raise ValueError(f"{what}: a line needs at least 2 distinct KL values, got {kl.tolist()}")
  design = np.stack([np.ones_like(kl), kl], axis=1)  # [P, 2]
  (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
  return Line(float(intercept), float(slope), float(kl.min()), float(kl.max()), int(kl.size))


def fit_line(points: Iterable[FrontierPoint], metric: str = "reward") -> dict[str, Line]:
  """Least-squares `metric = a + b * kl` per algorithm (metric: 'reward' or 'gold_reward').

  Unweighted, as the paper draws it. Points without the metric (gold absent) are left out.
  """
  if metric not in ("reward", "gold_reward"):
    raise ValueError(f"metric must be 'reward' or 'gold_reward', got {metric!r}")
  lines = {}
  for name, group in by_algo(points).items():
    group = [p for p in group if getattr(p, metric) is not None]
    if not group:
      continue
    kl = np.array([p.kl for p in group], dtype=np.float64)
    y = np.array([getattr(p, metric) for p in group], dtype=np.float64)
    lines[name] = _fit(kl, y, f"algo {name!r}")
  if not lines:
    raise ValueError(f"no points carry {metric!r}")
  return lines


def _as_line(frontier: Line | Sequence[FrontierPoint], name: str) -> Line:
  if isinstance(frontier, Line):
    return frontier
  frontier = list(frontier)
  if not frontier:
    raise ValueError(f"{name} has no points")
  kl = np.array([p.kl for p in frontier], dtype=np.float64)
  reward = np.array([p.reward for p in frontier], dtype=np.float64)
  return _fit(kl, reward, name)


def frontier_gap(frontier_a: Line | Sequence[FrontierPoint],
                 frontier_b: Line | Sequence[FrontierPoint],
                 kl_grid: int | Sequence[float] = 50) -> tuple[np.ndarray, np.ndarray]:
  """(kl [G], line_a(kl) - line_b(kl) [G]) over the KL range both frontiers cover.

  A frontier is a fitted `Line` or the points of one algorithm (fitted here). `kl_grid`
  is a number of evenly spaced KL values over the shared range, or explicit KL values
  (those outside the shared range are dropped: a line says nothing where it has no data).
  """
  line_a, line_b = _as_line(frontier_a, "frontier_a"), _as_line(frontier_b, "frontier_b")
  low, high = max(line_a.kl_min, line_b.kl_min), min(line_a.kl_max, line_b.kl_max)
  if low > high:
    raise ValueError(f"frontiers do not overlap in KL: a covers [{line_a.kl_min:.4g}, "
                     f"{line_a.kl_max:.4g}], b covers [{line_b.kl_min:.4g}, {line_b.kl_max:.4g}]")
  if isinstance(kl_grid, (int, np.integer)):
    if kl_grid < 1:
      raise ValueError(f"kl_grid must be >= 1 grid points, got {kl_grid}")
    kl = np.linspace(low, high, int(kl_grid))
  else:
    kl = np.asarray(kl_grid, dtype=np.float64).reshape(-1)
    kl = kl[(kl >= low) & (kl <= high)]
    if kl.size == 0:
      raise ValueError(f"no kl_grid value lies in the shared KL range [{low:.4g}, {high:.4g}]")
  return kl, line_a(kl) - line_b(kl)


def dominates(frontier_a: Line | Sequence[FrontierPoint],
              frontier_b: Line | Sequence[FrontierPoint],
              kl_grid: int | Sequence[float] = 50) -> bool:
  """True when A's fitted line is >= B's at every grid KL of the shared range and > at one."""
  _, gap = frontier_gap(frontier_a, frontier_b, kl_grid)
  return bool(np.all(gap >= 0) and np.any(gap > 0))
