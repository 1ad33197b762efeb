"""Value checks for config fields: each takes a value and returns None when it is fine, else what
is wrong ("must be > 0, got -1"). `config_checks` builds its table of fields from them, and an
algorithm declares the checks of its own options with them (`p3o_jax/rl/algorithms/`), so
neither has to import the other's module for these."""

from __future__ import annotations

import math
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(*, gt=None, ge=None, lt=None, le=None, integer=False) -> Check:
  """A real (or, with integer=True, an int) within the given bounds."""
  def check(v):
    if integer and not is_int(v):
      return f"must be an int, got {type(v).__name__} {v!r}"
    if not integer and not is_number(v):
      return f"must be a number, got {type(v).__name__} {v!r}"
    if not math.isfinite(v):
      return f"must be finite, got {v}"
    for bound, ok, sign in ((gt, lambda: v > gt, ">"), (ge, lambda: v >= ge, ">="),
                            (lt, lambda: v < lt, "<"), (le, lambda: v <= le, "<=")):
      if bound is not None and not ok():
        return f"must be {sign} {bound}, got {v}"
    return None
  return check


def integer(**bounds) -> Check:
  return number(integer=True, **bounds)


def one_of(*options) -> Check:
  def check(v):
    return None if v in options else f"must be one of {', '.join(map(repr, options))}; got {v!r}"
  return check


def boolean(v):
  return None if isinstance(v, bool) else f"must be True or False, got {type(v).__name__} {v!r}"


def string(v):
  return None if isinstance(v, str) else f"must be a string, got {type(v).__name__} {v!r}"


def names_from(*options) -> Check:
  """A tuple / list of names, each one of `options` (e.g. pipeline.algos)."""
  def check(v):
    if isinstance(v, str) or not isinstance(v, (tuple, list)) or not v:
      return f"must be a non-empty tuple of names from {options}, got {v!r}"
    bad = [x for x in v if x not in options]
    return f"has unknown names {bad}; known: {', '.join(options)}" if bad else None
  return check


positive = number(gt=0)
non_negative = number(ge=0)
probability = number(ge=0, le=1)
positive_int = integer(ge=1)
non_negative_int = integer(ge=0)
