"""Demo-task rewards for the reward-translation experiment (`bench/invariance.py`):
the gold reward r(x, y) and r(x, y) + delta(x), a large offset that depends only on the prompt.

Used as `--config.model.reward_fn=p3o_jax.data.shifted_gold:<name>`.

Exact arithmetic, so that invariance can be checked bitwise: r is the gold reward rounded to a
multiple of 2^-10 (|r| <= 1, so 11 significant bits) and delta(x) is an integer with
|delta| < 2^12, so r + delta has at most 23 significant bits and is exact in float32, and so is
(r_i + delta) - (r_j + delta) = r_i - r_j. An algorithm that only ever sees reward differences
within a prompt then gets bitwise the same numbers with and without the offset. (Unrounded, the
sum would lose r's low bits to rounding and invariance could only hold to ~1e-6.)
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from p3o_jax.data import synthetic

QUANTUM = 2.0 ** -10
OFFSET_STD = 10.0


def gold(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """The gold reward rounded to a multiple of 2^-10: the unshifted arm."""
  return (np.round(synthetic.gold_reward(prompts, responses) / QUANTUM) * QUANTUM).astype(np.float32)


def normal_offset(prompt: str) -> float:
  """delta(x) ~ N(0, 10^2), rounded to an integer, fixed per prompt (seeded by the prompt's text,
  so every process and every run draws the same one)."""
  rng = np.random.default_rng(zlib.crc32(prompt.encode()))
  return float(np.round(OFFSET_STD * rng.standard_normal()))


def length_offset(prompt: str) -> float:
  """delta(x) = 10 * (number of digits - 4.5) * 2: -30 .. +30 over 3-6 digits, a systematic
  offset a critic can learn from the prompt."""
  _, digits = synthetic.parse_prompt(prompt)
  return float(20 * len(digits) - 90)


def _shifted(offset, prompts, responses) -> np.ndarray:
  delta = np.array([offset(p) for p in prompts], np.float32)
  return gold(prompts, responses) + delta


def gold_plus_normal_offset(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  return _shifted(normal_offset, prompts, responses)


def gold_plus_length_offset(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  return _shifted(length_offset, prompts, responses)
