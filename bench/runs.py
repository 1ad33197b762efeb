"""Several runs of a benchmark in one process, summarised as the project states its targets:
each run's own ratio against the peer measured in that run, then the median of those ratios.

Run to run this VM moves by 15-30%, and the peer moves with it, so a ratio is only read within a
run, and a target only from the median over runs (README, Benchmarks)."""

from __future__ import annotations

import statistics


def ratio_summary(ratios: list[float]) -> str:
  """'median 3.12x of 5 runs (3.12 / 3.50 / ...; best 3.50x, worst 2.70x)', runs in order."""
  if not ratios:
    raise ValueError("no runs to summarise")
  each = " / ".join(f"{r:.2f}" for r in ratios)
  return (f"median {statistics.median(ratios):.2f}x of {len(ratios)} runs ({each}; best {max(ratios):.2f}x, "
          f"worst {min(ratios):.2f}x)")


def rates(seconds: list[float], units: int, name: str) -> dict:
  """{name: units per second at the median time, 'best': at the fastest}, e.g. tok_s and best."""
  return {name: units / statistics.median(seconds), "best": units / min(seconds)}
