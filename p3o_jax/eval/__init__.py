"""Evaluation as the P3O paper does it: KL-reward frontier and head-to-head win rates.

`frontier` and `winrate` need only NumPy and are re-exported here. Plots and the markdown
report pull in matplotlib, so import them explicitly: `from p3o_jax.eval import plots,
report`.
"""

from p3o_jax.eval.frontier import (ALGO_KEY, EVAL_KEYS, GOLD_KEY, KL_KEY, REWARD_KEY,
                                   STEP_KEY, FrontierPoint, Line, dominates, eval_record,
                                   fit_line, frontier_gap, frontier_point, load_frontier)
from p3o_jax.eval.winrate import (WinRate, win_rate, win_rate_matrix,
                                  win_rate_matrix_by_judge)

__all__ = [
    "ALGO_KEY", "EVAL_KEYS", "GOLD_KEY", "KL_KEY", "REWARD_KEY", "STEP_KEY", "FrontierPoint",
    "Line", "dominates", "eval_record", "fit_line", "frontier_gap", "frontier_point",
    "load_frontier", "WinRate", "win_rate", "win_rate_matrix", "win_rate_matrix_by_judge",
]
