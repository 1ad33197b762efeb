"""The RL algorithms, one module each, registered by name (see base.py for the interface).

Every module in this package is imported here, so a new algorithm registers itself by
existing; the list of algorithms lives only in `REGISTRY`.
"""

from __future__ import annotations

import importlib
import pkgutil

from p3o_jax.rl.algorithms.base import REGISTRY, Algorithm, KLController, OfflineAlgorithm, register  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
  if _module.name != "base":
    importlib.import_module(f"{__name__}.{_module.name}")



def names() -> tuple[str, ...]:
  """Every registered name, in the order users see in help and errors (`Algorithm.order`, then name)."""
  return tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].order, n)))


def get(name: str) -> type[Algorithm]:
  if name not in REGISTRY:
    raise ValueError(f"rl.algo={name!r}; expected one of {names()}")
  return REGISTRY[name]


def create(rl, graph, temperature: float, critic_graph=None) -> Algorithm:
  """The algorithm `rl.algo`, with its hyperparameters read from `rl`."""
  return get(rl.algo)(rl, graph, temperature, critic_graph)


def options() -> dict:
  """{field: (default, check)} of the config.rl fields that algorithms add."""
  out = {}
  for cls in REGISTRY.values():
    out.update(cls.options)
  return out
