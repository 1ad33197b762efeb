"""DPO on a preference dataset (Rafailov et al. 2023, "Direct Preference Optimization"), the
offline baseline RLHF comparisons put beside the online methods, with IPO's (Azar et al. 2023)
and SLiC's hinge (Zhao et al. 2023) losses by `rl.dpo_loss`, conservative DPO by
`rl.dpo_label_smoothing` and RPO's NLL term on the chosen responses by `rl.rpo_alpha`. No
sampling and no reward model in training: the policy learns from the pairs the reward model
learns from, against the SFT policy as its reference. Its KL and reward on held-out prompts are
measured as every RL algorithm's are (`p3o_jax/preference.py`)."""

from __future__ import annotations

import dataclasses

from p3o_jax import losses
from p3o_jax.rl.algorithms.base import OfflineAlgorithm, register
from p3o_jax.value_checks import non_negative, number, one_of

# The DPO loss options, shared with online DPO (`online_dpo.py`).
DPO_OPTIONS = {
    "dpo_loss": ("sigmoid", one_of(*losses.DPO_LOSSES)),   # sigmoid (DPO) | ipo | hinge (SLiC)
    "dpo_label_smoothing": (0.0, number(ge=0, lt=0.5)),     # conservative DPO's flip probability
}


@register
class DPO(OfflineAlgorithm):
  name = "dpo"
  order = 3
  # rpo_alpha: RPO's weight on the chosen responses' per-token NLL (Pang et al. 2024; TRL's rpo_alpha)
  options = {**DPO_OPTIONS, "rpo_alpha": (0.0, non_negative)}

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    dpo_beta: float
    dpo_label_smoothing: float
    rpo_alpha: float
    dpo_loss: str

  def loss(self, params, batch, normaliser=None, hp=None):
    hp = hp or self.hp
    logp, ref = self.sequence_logprobs(params, batch), batch["ref_logp"]  # [B, 2]: chosen, rejected
    loss, metrics = losses.dpo(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=hp.dpo_beta, loss_type=hp.dpo_loss,
                               label_smoothing=hp.dpo_label_smoothing, normaliser=normaliser)
    nll = losses.chosen_nll(logp[:, 0], batch["response_mask"][:, 0].sum(-1), normaliser=normaliser)
    return loss + hp.rpo_alpha * nll, {**metrics, "loss/nll": nll}
