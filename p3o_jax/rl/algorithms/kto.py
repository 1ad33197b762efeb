"""KTO (Ethayarajh et al. 2024, "Model Alignment as Prospect Theoretic Optimization"): each
response on its own, labelled desirable or undesirable, against a KL reference point estimated
on responses to other prompts. It needs no pairs: it trains on a dataset of labelled responses
(`data.preference` with prompt, completion, label) or on the preference pairs, each giving its
chosen response as desirable and its rejected one as undesirable, as TRL unpairs a paired
dataset (`p3o_jax/preference.py`, `unpair`). Its beta is rl.dpo_beta, as DPO's."""

from __future__ import annotations

import dataclasses

import jax

from p3o_jax import losses
from p3o_jax.rl.algorithms.base import OfflineAlgorithm, register
from p3o_jax.value_checks import non_negative


@register
class KTO(OfflineAlgorithm):
  name = "kto"
  order = 6
  unpaired = True
  # lam_D and lam_U (TRL's desirable_weight, undesirable_weight)
  options = {"kto_desirable_weight": (1.0, non_negative), "kto_undesirable_weight": (1.0, non_negative)}

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    dpo_beta: float
    kto_desirable_weight: float
    kto_undesirable_weight: float

  def loss(self, params, batch, normaliser=None, hp=None):
    hp = hp or self.hp
    labelled, mismatched = (_slot(batch, i) for i in (0, 1))
    logp = self.sequence_logprobs(params, labelled)[:, 0]
    # The reference point carries no gradient, so its responses run forward only.
    kl_logp = self.sequence_logprobs(jax.lax.stop_gradient(params), mismatched)[:, 0]
    ref = batch["ref_logp"]
    return losses.kto(logp, ref[:, 0], batch["label"] > 0, kl_logp, ref[:, 1], beta=hp.dpo_beta,
                      desirable_weight=hp.kto_desirable_weight, undesirable_weight=hp.kto_undesirable_weight,
                      normaliser=normaliser)


def _slot(batch: dict, i: int) -> dict:
  """The batch with response slot i alone: 0 the labelled responses, 1 the mismatched ones."""
  return {**batch, "response": batch["response"][:, i:i + 1], "response_mask": batch["response_mask"][:, i:i + 1]}
