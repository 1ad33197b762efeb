"""What every RL algorithm is to the loop: one registered object, created from `config.rl`.

An algorithm declares what it needs from the rollout (a critic, how many responses per
prompt), holds its hyperparameters in a frozen dataclass read once from `config.rl`, and
supplies

    prepare(exp, rewards, kl_coef) -> batch     host side: arrays grouped [G, K, ...], the query [G, P]
    loss(params, batch, normaliser, hp) -> (loss, metrics)   pure; traced inside the update
    count(batch) -> normaliser                  the minibatch's loss count (exact micro-batching)

`hp` is the algorithm's `Hyper` as the update receives it: its float fields are inputs of the
update program, not constants compiled into it, so runs that differ only in them (a sweep over
rl.beta or rl.eps) share one compiled update; its other fields (strings, flags, counts) choose
the program.

A group is the K responses to one prompt, kept together so that pairs and group baselines
never straddle minibatches. The loop (`p3o_jax/rl/loop.py`) and the pipeline name no
algorithm: they look one up by `config.rl.algo` in `REGISTRY`. Adding an algorithm is one
module in this package (found and imported by `__init__.py`) and its tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax.rl import sequences
from p3o_jax.rl.rollout import Experience

REGISTRY: dict[str, type["Algorithm"]] = {}

ROLLOUT_IS_MODES = ("none", "tis")


class KLController:
  """The KL coefficient the loop logs and passes to `prepare`. Fixed unless a target is given:
  then Ziegler et al.'s adaptive rule (trlx defaults: init 0.05, target 6, horizon 10000)."""

  def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
    self.value, self.target, self.horizon = float(value), target, horizon

  def update(self, current_kl: float, n_steps: int):
    if self.target:  # a Python float, as a resumed run reads it back: NumPy scalars would promote
      error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))  # float32 arrays to float64
      self.value *= 1.0 + error * n_steps / self.horizon


def rollout_is_weights(exp: Experience, level: str, cap: float) -> tuple[np.ndarray, dict]:
  """Truncated importance weights min(pi_old_trainer / pi_sampler, cap) of the rollout's samples.

  The sampler may run the policy in another precision (or engine) than the trainer, so the
  samples come from pi_sampler while every loss assumes pi_old. `level='token'`: one weight per
  response token [n, R]; `'sequence'`: the product over the response's tokens [n].
  Returns the weights and their metrics (mean, max before truncation, fraction truncated),
  over every process's rows.
  """
  mask = exp.response_mask.astype(bool)
  log_w = np.where(mask, exp.logp_old - exp.logp_sampler, 0.0)
  if level == "sequence":
    log_w, valid = log_w.sum(-1), mask.any(-1)
  else:
    valid = mask
  raw = np.exp(np.minimum(log_w, 80.0))  # exp(80) is finite in float32 and far above any cap
  weights = np.where(valid, np.minimum(raw, cap), 0.0).astype(np.float32)
  every_w, every_raw, every_valid = (exp.all_rows(x) for x in (weights, raw, valid))
  metrics = {"rollout_is/weight_mean": float(every_w[every_valid].mean()) if every_valid.any() else 1.0,
             "rollout_is/weight_max": float(every_raw[every_valid].max()) if every_valid.any() else 1.0,
             "rollout_is/truncated_frac": float((every_raw[every_valid] > cap).mean()) if every_valid.any() else 0.0}
  return weights, metrics


QUERY_KEYS = ("query", "query_mask")  # once per group in a batch: [G, P]


def group(exp: Experience, **extra) -> dict:
  """Rollout arrays regrouped [n, ...] -> [n / K, K, ...] plus any extra per-row arrays; the
  query once per group, [n / K, P]: a group's K rows answer one prompt (checked), which the
  update then computes once (`group_rows`)."""
  query, query_mask = (np.asarray(x).reshape(-1, exp.k, np.shape(x)[-1]) for x in (exp.query, exp.query_mask))
  differs = ((query != query[:, :1]) | (query_mask != query_mask[:, :1])).any((1, 2))
  if differs.any():
    raise ValueError(f"groups {np.flatnonzero(differs)[:10].tolist()} of the rollout hold rows with different "
                     f"queries; each group's {exp.k} rows must be responses to one prompt (row b * K + k)")
  arrays = dict(response=exp.response, response_mask=exp.response_mask, logp_old=exp.logp_old,
                logp_ref=exp.logp_ref, **extra)
  grouped = {k: np.asarray(v).reshape(-1, exp.k, *np.shape(v)[1:]) for k, v in arrays.items() if v is not None}
  return {"query": query[:, 0], "query_mask": query_mask[:, 0], **grouped}


def rows(batch: dict) -> dict:
  """The per-row arrays [M, K, ...] -> [M * K, ...] for the model forward (not the per-group query)."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items() if k not in QUERY_KEYS}


def group_rows(batch: dict) -> tuple:
  """(query [M, P], query_mask, response [M * K, R], response_mask) of a grouped batch: each
  query once for its K rows, the prompt-once forward of `sequences`."""
  flat = rows({k: batch[k] for k in ("response", "response_mask")})
  return batch["query"], batch["query_mask"], flat["response"], flat["response_mask"]


def _is_float(field: dataclasses.Field) -> bool:
  return field.type in ("float", float)


def hyperparameters(cls: type, rl) -> Any:
  """The frozen dataclass `cls` filled from the config.rl fields of the same names (floats as
  floats: `--config.rl.beta=0` and `=0.0` are one program)."""
  missing = [f.name for f in dataclasses.fields(cls) if f.name not in rl]
  if missing:
    raise ValueError(f"config.rl lacks {missing}, which {cls.__qualname__} needs")
  return cls(**{f.name: float(rl[f.name]) if _is_float(f) else rl[f.name] for f in dataclasses.fields(cls)})


def traced_hyperparameters(cls: type) -> type:
  """Registers the frozen dataclass `cls` as a pytree whose leaves are its float fields: passed
  to a jitted function they are traced, and its other fields are part of the program's key."""
  floats = [f.name for f in dataclasses.fields(cls) if _is_float(f)]
  others = [f.name for f in dataclasses.fields(cls) if not _is_float(f)]
  jax.tree_util.register_dataclass(cls, data_fields=floats, meta_fields=others)
  return cls


@dataclasses.dataclass(frozen=True)
class RolloutIS:
  """Rollout importance-sampling correction, shared by every policy-gradient algorithm."""
  rollout_is: str
  rollout_is_cap: float


class Algorithm:
  """Base class: a policy-only algorithm whose params are the policy's and whose KL
  coefficient is fixed at `rl.beta`. Subclasses set the class attributes and override
  `prepare`, `loss` and `count` (and, with a critic, `init_params` / `value_fn`)."""

  name: ClassVar[str]
  Hyper: ClassVar[type]                        # frozen dataclass of the config.rl fields it reads
  # config.rl fields this algorithm adds: name -> (default, check(value) -> problem or None; p3o_jax/value_checks.py)
  options: ClassVar[dict[str, tuple[Any, Callable]]] = {}
  weight_level: ClassVar[str | None] = "token"  # rollout IS weights per 'token', 'sequence', or None
  uses_critic: ClassVar[bool] = False
  exact_k: ClassVar[int | None] = None         # responses per prompt it requires (None: any K >= 2)
  reads_old_in_prepare: ClassVar[bool] = False  # its host `prepare` reads exp.logp_old (per-token KL rewards)
  order: ClassVar[int] = 10                    # where it is listed: the paper's algorithms first
  offline: ClassVar[bool] = False              # trains on a preference dataset, not on rollouts (OfflineAlgorithm)

  def __init__(self, rl, graph, temperature: float, critic_graph=None):
    self.hp = hyperparameters(self.Hyper, rl)
    self.correction = hyperparameters(RolloutIS, rl)
    self.graph, self.temperature, self.critic_graph = graph, temperature, critic_graph

  @classmethod
  def k_problem(cls, k: int) -> str | None:
    if cls.exact_k is not None and k != cls.exact_k:
      return f"rl.algo={cls.name!r} needs rl.k={cls.exact_k} responses per prompt, got {k}"
    return None

  # -- parameters and the rollout's needs
  def init_params(self, policy, critic=None) -> tuple[Any, Any]:
    """(trainable params, their logical axes) from the policy (and the reward model as
    `critic`, for algorithms that initialise a critic from it; both `models.policy.Policy`)."""
    return policy.params, policy.logical_axes()

  def policy_params(self, params):
    return params

  def value_fn(self) -> Callable | None:
    """Rollout-time values(params, query, query_mask, response, response_mask) -> [N, R], or None."""
    return None

  def kl_controller(self) -> KLController:
    return KLController(getattr(self.hp, "beta", 0.0))

  def skips_old_pass(self, rl) -> bool:
    """Whether the rollout may leave out the old policy's teacher-forced pass: with one epoch of
    one minibatch the update's own forward runs at pi_old's parameters, so the losses take its
    detached log-probs as pi_old's (`old_logprobs`; the ratio is exactly 1, as TRL does with
    num_iterations=1). Not when the host reads pi_old's log-probs before the update: per-token
    KL rewards (`reads_old_in_prepare`) or the rollout IS weights."""
    rollout_is = rl.rollout_is != "none" and self.weight_level is not None
    return rl.inner_epochs == 1 and rl.num_minibatches == 1 and not self.reads_old_in_prepare and not rollout_is

  # -- the update
  def prepare(self, exp: Experience, rewards: np.ndarray, kl_coef: float) -> tuple[dict, dict]:
    """(batch grouped [G, K, ...], host metrics). Adds the rollout IS weights when on."""
    batch = self.make_batch(exp, rewards, kl_coef)
    if self.correction.rollout_is == "none" or self.weight_level is None:
      return batch, {}
    weights, metrics = rollout_is_weights(exp, self.weight_level, self.correction.rollout_is_cap)
    batch["sample_weight"] = weights.reshape(-1, exp.k, *weights.shape[1:])
    return batch, metrics

  def make_batch(self, exp: Experience, rewards: np.ndarray, kl_coef: float) -> dict:
    return group(exp, rewards=rewards)

  def loss(self, params, batch: dict, normaliser=None, hp=None):
    """(loss, metrics) of a minibatch; `hp` as the update passes it (default `self.hp`)."""
    raise NotImplementedError

  def count(self, batch: dict):
    """Valid responses of the whole minibatch (sequence-mean losses)."""
    return jnp.sum(jnp.any(batch["response_mask"] > 0, axis=-1)).astype(jnp.float32)

  # -- helpers for subclasses
  @staticmethod
  def old_logprobs(batch: dict, logp):
    """pi_old's per-token log-probs: the rollout's, or, where it skipped that pass
    (`skips_old_pass`), the update's own `logp` detached."""
    return batch["logp_old"] if "logp_old" in batch else jax.lax.stop_gradient(logp)

  def sequence_logprobs(self, params, batch: dict):
    """Each response's log-prob [M, K]: its tokens' log-probs under `params` summed over its mask."""
    logp, _, _ = self.token_logprobs(params, batch)
    return (logp * batch["response_mask"]).sum(-1)

  def token_logprobs(self, params, batch: dict):
    """Per-token log-probs [M, K, R] of the batch's responses under `params`, the model and
    the hidden states [M * K, R, D]. Each group's prompt is computed once for its K responses."""
    logp, model, hidden = sequences.response_logprobs_and_hidden(
        self.graph, params, *group_rows(batch), self.temperature)
    return logp.reshape(batch["response_mask"].shape), model, hidden


class OfflineAlgorithm(Algorithm):
  """An algorithm trained on a fixed preference dataset instead of rollouts (the DPO family;
  `p3o_jax/preference.py` trains it, and the rl stage evaluates it on the frontier as any other).

  Its batches hold B pairs laid out as the reward model's (`batching.preference_batch`): query /
  query_mask [B, P], response / response_mask [B, 2, N] with the chosen response at [:, 0] and the
  rejected one at [:, 1], and, when it `uses_reference`, `ref_logp` [B, 2]: the reference's
  sequence log-probs, computed once before training. Log-probs are at temperature 1 (the
  policy's own distribution over the dataset's responses), whatever the sampler's.
  """

  offline = True
  weight_level = None
  uses_reference: ClassVar[bool] = True
  # True: trains on single labelled responses (KTO). Its batches then hold B responses to their
  # prompts at [:, 0], each one's `label` [B] (1 desirable, 0 undesirable), and at [:, 1] a
  # response to another prompt (`preference.unpair`); `ref_logp` covers both.
  unpaired: ClassVar[bool] = False

  def count(self, batch: dict):
    """One term per pair (per response when unpaired)."""
    return jnp.float32(batch["response"].shape[0])


def register(cls: type[Algorithm]) -> type[Algorithm]:
  """Class decorator: adds `cls` to REGISTRY under `cls.name`; its `Hyper` becomes a pytree of
  its floats (`traced_hyperparameters`)."""
  if cls.name in REGISTRY:
    raise ValueError(f"two algorithms are named {cls.name!r}")
  for option, (default, _) in cls.options.items():
    for other in REGISTRY.values():
      if option in other.options and other.options[option][0] != default:
        raise ValueError(f"rl.{option}: {cls.name} and {other.name} declare different defaults")
  traced_hyperparameters(cls.Hyper)
  REGISTRY[cls.name] = cls
  return cls
