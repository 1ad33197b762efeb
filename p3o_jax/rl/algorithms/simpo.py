"""SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward"): DPO's
sigmoid loss on length-averaged log-probabilities, with a target margin and no reference model.
Trained on the preference dataset as DPO is (`p3o_jax/preference.py`); its KL to the SFT policy
is still what the frontier measures, since nothing in its loss holds the policy near it."""

from __future__ import annotations

import dataclasses

from p3o_jax import losses
from p3o_jax.rl.algorithms.base import OfflineAlgorithm, register
from p3o_jax.value_checks import non_negative, positive


@register
class SimPO(OfflineAlgorithm):
  name = "simpo"
  order = 4
  uses_reference = False
  # the paper's ranges: beta 2 to 2.5, gamma / beta about 0.5
  options = {"simpo_beta": (2.0, positive), "simpo_gamma": (1.0, non_negative)}

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    simpo_beta: float
    simpo_gamma: float
    dpo_label_smoothing: float

  def loss(self, params, batch, normaliser=None, hp=None):
    hp = hp or self.hp
    logp, length = self.sequence_logprobs(params, batch), batch["response_mask"].sum(-1)  # [B, 2]
    return losses.simpo(logp[:, 0], logp[:, 1], length[:, 0], length[:, 1], beta=hp.simpo_beta, gamma=hp.simpo_gamma,
                        label_smoothing=hp.dpo_label_smoothing, normaliser=normaliser)
