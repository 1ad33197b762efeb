"""Statistics of the multi-seed, multi-beta study (`bench/frontier.py`, `bench/invariance.py`).

Pure NumPy functions, one question each:

  curve_at(kl, y, levels)        a run's metric at given KLs, linear between its eval points
  envelope_at(curves, levels)    the frontier of several runs (one per beta): the best of them
  area_under(f, lo, hi)          frontier area over [lo, hi] (trapezoids on a fine grid)
  common_range(curves)           the KL interval every curve covers
  t_interval(samples)            mean and Student-t 95% interval across seeds (plots)
  bootstrap_ci(samples)          percentile bootstrap interval of the mean across seeds (tables)
  bootstrap_diff_ci(a, b)        the same for mean(a) - mean(b), seeds resampled independently

A "curve" is one run's eval records: KL [P] and a metric [P] (gold or proxy reward), P points
along training. Points are sorted by KL and points with equal KL averaged, so a curve is a
function of KL over [min KL, max KL]; outside that range it is NaN (a run says nothing about a
KL it never reached).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

Curve = tuple[np.ndarray, np.ndarray]  # (kl [P], metric [P])


def as_function(kl, y) -> Curve:
  """Sorted by KL, equal KLs averaged: the breakpoints of a piecewise-linear function."""
  kl, y = np.asarray(kl, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
  if kl.shape != y.shape or kl.size == 0:
    raise ValueError(f"a curve needs equal, non-empty kl and y; got {kl.shape} and {y.shape}")
  if not (np.all(np.isfinite(kl)) and np.all(np.isfinite(y))):
    raise ValueError("a curve's kl and y must be finite")
  unique, inverse = np.unique(kl, return_inverse=True)
  means = np.bincount(inverse, weights=y) / np.bincount(inverse)
  return unique, means


def curve_at(kl, y, levels) -> np.ndarray:
  """y linearly interpolated at each KL level [L]; NaN outside [min kl, max kl]."""
  xs, ys = as_function(kl, y)
  levels = np.asarray(levels, np.float64)
  out = np.interp(levels, xs, ys)
  return np.where((levels >= xs[0]) & (levels <= xs[-1]), out, np.nan)


def envelope_at(curves: Sequence[Curve], levels) -> np.ndarray:
  """Best y at each KL level over the curves that reach it (NaN where none does): the frontier
  one gets by choosing beta and stopping step per KL budget."""
  values = np.stack([curve_at(kl, y, levels) for kl, y in curves])  # [C, L]
  reached = np.isfinite(values)
  best = np.max(np.where(reached, values, -np.inf), axis=0)
  return np.where(reached.any(axis=0), best, np.nan)


def kl_range(curves: Sequence[Curve]) -> tuple[float, float]:
  """The KL interval the union of `curves` covers."""
  return min(float(np.min(kl)) for kl, _ in curves), max(float(np.max(kl)) for kl, _ in curves)


def common_range(ranges: Sequence[tuple[float, float]]) -> tuple[float, float]:
  """The KL interval inside every (lo, hi) range; (nan, nan) when they do not overlap."""
  lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
  return (lo, hi) if lo < hi else (float("nan"), float("nan"))


def area_under(f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, grid: int = 401) -> float:
  """Integral of f over [lo, hi] by trapezoids on `grid` points (exact for a piecewise-linear f
  whose breakpoints lie on the grid, within O(1/grid^2) otherwise); NaN for an empty range."""
  if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
    return float("nan")
  xs = np.linspace(lo, hi, grid)
  ys = np.asarray(f(xs), np.float64)
  return float(np.sum((ys[1:] + ys[:-1]) * np.diff(xs)) / 2)


def t_interval(samples, level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the Student-t interval of the mean of `samples` [S] (NaNs dropped; the
  interval is NaN with fewer than 2 samples)."""
  x = np.asarray(samples, np.float64)
  x = x[np.isfinite(x)]
  if x.size == 0:
    return float("nan"), float("nan"), float("nan")
  mean = float(x.mean())
  if x.size < 2:
    return mean, float("nan"), float("nan")
  half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
  return mean, mean - half, mean + half


def _bootstrap_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
  return x[rng.integers(x.size, size=(n_boot, x.size))].mean(axis=1)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(draws, [tail, 100 - tail])
  return float(low), float(high)


def _finite(samples) -> np.ndarray:
  x = np.asarray(samples, np.float64).reshape(-1)
  return x[np.isfinite(x)]


def bootstrap_ci(samples, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
  """(mean, low, high): the percentile bootstrap interval of the mean of `samples` [S] (seeds
  resampled with replacement; NaNs dropped; all NaN for no sample)."""
  x = _finite(samples)
  if x.size == 0:
    return float("nan"), float("nan"), float("nan")
  return (float(x.mean()), *_percentiles(_bootstrap_means(x, n_boot, np.random.default_rng(seed)), level))


def bootstrap_diff_ci(a, b, level: float = 0.95, n_boot: int = 10_000,
                      seed: int = 0) -> tuple[float, float, float]:
  """(mean(a) - mean(b), low, high): each side's seeds resampled independently (two algorithms
  with the same seed number share nothing but the shared SFT and reward model)."""
  a, b = _finite(a), _finite(b)
  if a.size == 0 or b.size == 0:
    return float("nan"), float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  draws = _bootstrap_means(a, n_boot, rng) - _bootstrap_means(b, n_boot, rng)
  return (float(a.mean() - b.mean()), *_percentiles(draws, level))


def format_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
  """'0.812 [0.790, 0.834]'; 'n/a' for a NaN mean, no bracket for a NaN interval."""
  if not np.isfinite(mean):
    return "n/a"
  if not (np.isfinite(low) and np.isfinite(high)):
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
