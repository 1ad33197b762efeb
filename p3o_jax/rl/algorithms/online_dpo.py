"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; the
P3O paper's baseline): two samples per prompt from the current policy, the reward picks the
winner, and the DPO loss (`losses.dpo`, in any of its `rl.dpo_loss` forms) against the
reference. Not a policy gradient: no rollout importance correction applies."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from p3o_jax import losses
from p3o_jax.rl.algorithms.base import Algorithm, group, register
from p3o_jax.rl.algorithms.dpo import DPO_OPTIONS


@register
class OnlineDPO(Algorithm):
  name = "online_dpo"
  order = 2
  exact_k = 2
  weight_level = None
  options = DPO_OPTIONS  # rl.dpo_loss, rl.dpo_label_smoothing: as offline DPO's

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    dpo_beta: float
    beta: float  # the KL coefficient logged beside the rollout (DPO's own is dpo_beta)
    dpo_label_smoothing: float
    dpo_loss: str

  def make_batch(self, exp, rewards, kl_coef):
    """The raw scores pick the winner of each pair (clipping and scaling cannot reorder them)."""
    if exp.k != 2:
      raise ValueError(f"online DPO compares two samples per prompt; rl.k={exp.k}")
    batch = group(exp)
    batch["chosen"] = np.argmax(np.asarray(exp.scores).reshape(-1, 2), axis=1).astype(np.int32)
    return batch

  def loss(self, params, batch, normaliser=None, hp=None):
    hp = hp or self.hp
    logp = self.sequence_logprobs(params, batch)                 # [M, 2]
    ref = (batch["logp_ref"] * batch["response_mask"]).sum(-1)
    pick = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
    c, r = batch["chosen"], 1 - batch["chosen"]
    return losses.dpo(pick(logp, c), pick(logp, r), pick(ref, c), pick(ref, r), beta=hp.dpo_beta,
                      loss_type=hp.dpo_loss, label_smoothing=hp.dpo_label_smoothing, normaliser=normaliser)

  def count(self, batch):
    """One term per prompt (pair)."""
    return jnp.float32(batch["chosen"].shape[0])
