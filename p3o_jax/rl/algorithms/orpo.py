"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):
SFT's NLL on the chosen responses plus an odds-ratio term that favours them over the rejected
ones, with no reference model; meant to run from a base model as SFT and preference learning in
one. Trained on the preference pairs as DPO is (`p3o_jax/preference.py`), here from the SFT
policy."""

from __future__ import annotations

import dataclasses

from p3o_jax import losses
from p3o_jax.rl.algorithms.base import OfflineAlgorithm, register
from p3o_jax.value_checks import non_negative


@register
class ORPO(OfflineAlgorithm):
  name = "orpo"
  order = 5
  uses_reference = False
  options = {"orpo_lambda": (0.1, non_negative)}  # the odds-ratio term's weight (the paper's lambda, TRL's beta)

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    orpo_lambda: float

  def loss(self, params, batch, normaliser=None, hp=None):
    hp = hp or self.hp
    logp, length = self.sequence_logprobs(params, batch), batch["response_mask"].sum(-1)  # [B, 2]
    return losses.orpo(logp[:, 0], logp[:, 1], length[:, 0], length[:, 1], lam=hp.orpo_lambda, normaliser=normaliser)
