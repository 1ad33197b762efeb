"""Verifiable rewards: Python reward functions (model.reward_fn) that check a response against its
prompt's answer in the dataset, which they get as a keyword argument named after its column
(`rl.rollout.TextReward` passes a prompt dataset's other columns so).

    --config.model.reward_fn=p3o_jax.rewards:gsm8k_correct     # openai/gsm8k: column 'answer'
"""

from __future__ import annotations

import re
from typing import Sequence

_MARKED = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> float | None:
  """The number a GSM8K-style solution ends on: the one after its last '####' mark, else the last
  number in the text (thousands commas allowed); None when there is none."""
  marked = _MARKED.findall(text)
  found = marked or _NUMBER.findall(text)
  if not found:
    return None
  return float(found[-1].replace(",", ""))  # both patterns end on a digit


def gsm8k_correct(prompts: Sequence[str], responses: Sequence[str], answer: Sequence[str]) -> list[float]:
  """1.0 for each response whose final number equals its answer's (the number after '####' in
  openai/gsm8k's 'answer' column), else 0.0."""
  out = []
  for response, reference in zip(responses, answer, strict=True):
    expected = final_number(reference)
    if expected is None:
      raise ValueError(f"answer {reference[-80:]!r} has no final number")
    got = final_number(response)
    out.append(float(got is not None and abs(got - expected) < 1e-6))
  return out
