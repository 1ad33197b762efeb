"""A short markdown evaluation report: final KL / reward per algorithm, win rates, plots.

  python -m p3o_jax.eval.report OUT_DIR runs/p3o/log.jsonl runs/ppo/log.jsonl

builds the frontier part from training logs alone (win rates need the final policies'
samples, so they come from the caller: `write_report(workdir, points, names, matrix)`).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from p3o_jax.eval.frontier import FrontierPoint, by_algo, fit_line, load_frontier
from p3o_jax.eval.plots import plot_frontier, plot_win_matrix

REPORT_NAME = "report.md"
FRONTIER_PLOT = "frontier.png"
WIN_PLOT = "win_rate.png"
JUDGE_WIN_PLOT = "win_rate_judge.png"


def _with_stderr(value: float | None, stderr: float | None) -> str:
  if value is None:
    return "–"
  if stderr is None or math.isnan(stderr):
    return f"{value:.4f}"
  return f"{value:.4f} ± {stderr:.4f}"


def _frontier_section(points: Sequence[FrontierPoint]) -> list[str]:
  groups = by_algo(points)
  lines = [
      "## KL-reward frontier", "",
      "Final evaluation of each algorithm (mean ± standard error over held-out prompts; "
      "KL = sum over response tokens of log π_θ − log π_ref on the policy's own samples). "
      "The fit is least squares reward = a + b·KL over all of the algorithm's evaluations.",
      "",
      "| algo | step | KL | reward | gold reward | fit a | fit b | evals |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, group in groups.items():
    final = group[-1]
    try:
      fit = fit_line(group)[name]
      a, b = f"{fit.intercept:.4f}", f"{fit.slope:.4f}"
    except ValueError:
      a = b = "–"  # fewer than 2 distinct KL values
    lines.append(
        f"| {name} | {final.step} | {_with_stderr(final.kl, final.kl_stderr)} | "
        f"{_with_stderr(final.reward, final.reward_stderr)} | "
        f"{_with_stderr(final.gold_reward, final.gold_reward_stderr)} | {a} | {b} | "
        f"{len(group)} |")
  lines += ["", f"![KL-reward frontier]({FRONTIER_PLOT})", ""]
  return lines


def _matrix_section(heading: str, names: Sequence[str], matrix: np.ndarray,
                    plot_name: str) -> list[str]:
  lines = [f"## {heading}", "",
           "Entry (row, column) = P(row's response beats column's) on the same prompts; "
           "ties count half.", "",
           "| | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for name, row in zip(names, matrix):
    lines.append(f"| **{name}** | " + " | ".join(f"{v:.3f}" for v in row) + " |")
  lines += ["", f"![{heading}]({plot_name})", ""]
  return lines


def _check_matrix(names, matrix, what: str) -> np.ndarray:
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.shape != (len(names), len(names)):
    raise ValueError(f"{what} shape {matrix.shape} does not match {len(names)} names")
  return matrix


def write_report(workdir: str | os.PathLike, points: Sequence[FrontierPoint],
                 names: Sequence[str] | None = None, matrix=None,
                 judge_matrix=None, title: str = "P3O evaluation") -> str:
  """Writes workdir/report.md (+ frontier.png, win_rate.png) and returns the report path.

  names [M] and matrix [M, M] are the reward win rates (`winrate.win_rate_matrix`);
  judge_matrix [M, M], optional, the judge's over the same names. Either section is
  left out when its inputs are None.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  points = list(points)
  if (names is None) != (matrix is None):
    raise ValueError("names and matrix go together: pass both or neither")
  if judge_matrix is not None and names is None:
    raise ValueError("judge_matrix needs names")
  if not points and names is None:
    raise ValueError("nothing to report: no frontier points and no win-rate matrix")

  lines = [f"# {title}", ""]
  if points:
    plot_frontier(points, os.path.join(workdir, FRONTIER_PLOT))
    lines += _frontier_section(points)
  if names is not None:
    names = list(names)
    matrix = _check_matrix(names, matrix, "matrix")
    plot_win_matrix(names, matrix, os.path.join(workdir, WIN_PLOT),
                    title="win rate by reward (row beats column)")
    lines += _matrix_section("Win rate by reward model", names, matrix, WIN_PLOT)
  if judge_matrix is not None:
    judge_matrix = _check_matrix(names, judge_matrix, "judge_matrix")
    plot_win_matrix(names, judge_matrix, os.path.join(workdir, JUDGE_WIN_PLOT),
                    title="win rate by judge (row beats column)")
    lines += _matrix_section("Win rate by judge", names, judge_matrix, JUDGE_WIN_PLOT)

  path = os.path.join(workdir, REPORT_NAME)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".tmp-", suffix=".md")
  with os.fdopen(fd, "w") as f:
    f.write("\n".join(lines))
  os.replace(tmp, path)
  return path


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description="Frontier report from JSONL training logs.")
  parser.add_argument("workdir", help="directory for report.md and the plots")
  parser.add_argument("logs", nargs="+", help="JSONL logs holding eval records")
  args = parser.parse_args(argv)
  path = write_report(args.workdir, load_frontier(args.logs))
  print(path)
  return path


if __name__ == "__main__":
  main()
