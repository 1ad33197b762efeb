"""PNG plots of the KL-reward frontier and the win-rate matrix.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global
backend switch), so it is safe inside training jobs and tests. Files are written to a
temporary name in the target directory and moved into place, so a reader never sees a
half-written PNG.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from p3o_jax.eval.frontier import FrontierPoint, by_algo, fit_line


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
  """Writes `fig` as PNG to `path` atomically (temporary file, then os.replace)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  FigureCanvasAgg(fig)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
  try:
    with os.fdopen(fd, "wb") as f:
      fig.savefig(f, format="png", dpi=120)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def _errors(values: list[float | None]) -> np.ndarray:
  # Unknown stderr (NaN / None) draws no bar rather than failing.
  return np.array([0.0 if v is None or math.isnan(v) else v for v in values])


def _frontier_panel(ax, groups: dict[str, list[FrontierPoint]], metric: str, label: str):
  for index, (name, group) in enumerate(groups.items()):
    group = [p for p in group if getattr(p, metric) is not None]
    if not group:
      continue
    try:
      line = fit_line(group, metric)[name]
    except ValueError:
      line = None  # fewer than 2 distinct KL values: scatter only
    color = f"C{index % 10}"
    ax.errorbar([p.kl for p in group], [getattr(p, metric) for p in group],
                xerr=_errors([p.kl_stderr for p in group]),
                yerr=_errors([getattr(p, metric + "_stderr") for p in group]),
                fmt="o", ms=4, capsize=2, color=color, label=name)
    if line is not None:
      kl = np.linspace(line.kl_min, line.kl_max, 2)
      ax.plot(kl, line(kl), "-", color=color, alpha=0.7,
              label=f"{name} fit: {line.intercept:.3g} + {line.slope:.3g}·KL")
  ax.set_xlabel("KL(π_θ || π_ref), nats per response")
  ax.set_ylabel(label)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)


def plot_frontier(points: Sequence[FrontierPoint], path: str | os.PathLike,
                  title: str = "KL-reward frontier") -> str:
  """Reward against KL per algorithm, with error bars and fitted lines; returns the path.

  When any point carries a gold reward, a second panel plots gold reward against KL.
  """
  points = list(points)
  if not points:
    raise ValueError("plot_frontier needs at least one point")
  groups = by_algo(points)
  has_gold = any(p.gold_reward is not None for p in points)
  fig = Figure(figsize=(11 if has_gold else 6, 4.5))
  axes = fig.subplots(1, 2 if has_gold else 1, squeeze=False)[0]
  _frontier_panel(axes[0], groups, "reward", "reward (RM)")
  if has_gold:
    _frontier_panel(axes[1], groups, "gold_reward", "gold reward")
  fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, path)


def plot_win_matrix(names: Sequence[str], matrix, path: str | os.PathLike,
                    title: str = "win rate (row beats column)") -> str:
  """Heatmap of matrix [M, M] (matrix[i, j] = P(i beats j)) with the values written in."""
  names = list(names)
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.shape != (len(names), len(names)):
    raise ValueError(f"matrix shape {matrix.shape} does not match {len(names)} names")
  size = 1.0 + 0.9 * len(names)
  fig = Figure(figsize=(size + 1.5, size))
  ax = fig.subplots()
  image = ax.imshow(matrix, cmap="RdBu", vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
  ax.set_yticks(range(len(names)), names)
  for i in range(len(names)):
    for j in range(len(names)):
      value = matrix[i, j]
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
              color="white" if abs(value - 0.5) > 0.3 else "black")
  ax.set_title(title)
  fig.tight_layout()
  return save_figure(fig, path)
