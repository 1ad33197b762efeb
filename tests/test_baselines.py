"""The baselines beside P3O (RLOO, GRPO and its Dr. GRPO / DAPO losses, GSPO, REINFORCE++) and the
rollout importance correction, against float64 NumPy implementations of the published formulas
(tests/reference_losses.py), on ragged masks with NaN in the padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3o_jax import config_base, losses
from p3o_jax.rl import algorithms
from p3o_jax.rl.algorithms.base import rollout_is_weights
from p3o_jax.rl.algorithms.grpo import grpo_loss
from p3o_jax.rl.algorithms.gspo import gspo_loss
from p3o_jax.rl.algorithms.reinforce_pp import reinforce_pp_advantages
from p3o_jax.rl.algorithms.rloo import rloo_loss
from p3o_jax.rl.rollout import Experience
import reference_losses as ref

B, K, T = 3, 3, 5


def inputs(seed, b=B, k=K, t=T, spread=0.15):
  """float64 log-probs (old ratios spread so that some clip, some not), rewards, ragged masks."""
  rng = np.random.default_rng(seed)
  logp = rng.normal(-2.0, 0.7, (b, k, t))
  old = logp + rng.normal(0.0, spread, (b, k, t))
  refp = logp + rng.normal(0.0, 0.3, (b, k, t))
  rewards = rng.normal(0.0, 1.0, (b, k))
  lengths = rng.integers(1, t + 1, (b, k))
  lengths[0, 0], lengths[-1, -1] = 1, t
  mask = np.arange(t)[None, None] < lengths[..., None]
  return logp, old, refp, rewards, mask


def with_nan(x, mask):
  return jnp.asarray(np.where(mask, x, np.nan), jnp.float32)


CASES = {
    "rloo": (lambda lp, o, r, rw, m: rloo_loss(lp, o, r, rw, m, beta=0.1, eps=0.05),
             lambda lp, o, r, rw, m: ref.rloo(lp, o, r, rw, m, beta=0.1, eps=0.05)),
    **{lt: (lambda lp, o, r, rw, m, lt=lt: grpo_loss(lp, o, r, rw, m, loss_type=lt, beta=0.1, eps=0.2,
                                                     eps_low=0.1, eps_high=0.3),
            lambda lp, o, r, rw, m, lt=lt: ref.grpo(lp, o, r, rw, m, loss_type=lt, beta=0.1, eps=0.2,
                                                    eps_low=0.1, eps_high=0.3))
       for lt in ("grpo", "dr_grpo", "dapo")},
    "gspo": (lambda lp, o, r, rw, m: gspo_loss(lp, o, r, rw, m, beta=0.1, eps_low=0.02, eps_high=0.03),
             lambda lp, o, r, rw, m: ref.gspo(lp, o, r, rw, m, beta=0.1, eps_low=0.02, eps_high=0.03)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradient_match_numpy(name):
  ours, theirs = CASES[name]
  logp, old, refp, rewards, mask = inputs(seed=1)
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: ours(lp, with_nan(old, mask), with_nan(refp, mask), jnp.asarray(rewards, jnp.float32),
                      jnp.asarray(mask)), has_aux=True)(with_nan(logp, mask))
  want = theirs(logp, old, refp, rewards, mask)
  want_grad = ref.numeric_grad(lambda lp: theirs(lp, old, refp, rewards, mask), logp)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-4, atol=2e-6)
  assert np.all(np.asarray(grad)[~mask] == 0)
  assert 0 < float(metrics["policy/clipfrac_avg"]) < 1, "the inputs should clip some terms and not others"
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_rloo_k2_is_unclipped_p3o_v1_on_policy_but_not_off_policy():
  """With the same sequence KL in the reward, RLOO at K=2 and unclipped P3O-V1 (Theorem 1) have
  the same gradient where the current policy is the rollout policy; off-policy P3O weights each
  side by the other response's ratio and the two part."""
  logp, old, refp, rewards, mask = inputs(seed=2, k=2)
  beta, big = 0.1, 1e6
  m = jnp.asarray(mask)

  def grads(current):
    args = (with_nan(old, mask), with_nan(refp, mask), jnp.asarray(rewards, jnp.float32))
    g_rloo = jax.grad(lambda lp: rloo_loss(lp, *args, m, beta=beta, eps=big)[0])(current)
    g_p3o = jax.grad(lambda lp: losses.p3o(lp, *args, beta=beta, variant="v1", eps=big, c=big, kl_source="old",
                                           token_mask=m)[0])(current)
    return np.asarray(g_rloo), np.asarray(g_p3o)

  on_rloo, on_p3o = grads(with_nan(old, mask))
  np.testing.assert_allclose(on_rloo, on_p3o, rtol=1e-5, atol=1e-7)
  assert np.abs(on_rloo).max() > 1e-3
  off_rloo, off_p3o = grads(with_nan(logp, mask))
  assert not np.allclose(off_rloo, off_p3o, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_a_group_of_equal_rewards_gives_no_policy_gradient_and_no_nan(name):
  logp, old, refp, rewards, mask = inputs(seed=3)
  rewards[1] = 0.7  # every response to prompt 1 scored the same
  fn = {"gspo": lambda lp, o, r, rw, m: gspo_loss(lp, o, r, rw, m, beta=0.0, eps_low=0.05, eps_high=0.08)}.get(
      name, lambda lp, o, r, rw, m: grpo_loss(lp, o, r, rw, m, loss_type=name, beta=0.0, eps=0.2,
                                              eps_low=0.2, eps_high=0.28))
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: fn(lp, with_nan(old, mask), with_nan(refp, mask), jnp.asarray(rewards, jnp.float32),
                    jnp.asarray(mask)), has_aux=True)(with_nan(logp, mask))
  grad = np.asarray(grad)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
  assert np.abs(grad[1]).max() <= 1e-7
  assert np.abs(grad[0]).max() > 1e-3 and np.abs(grad[2]).max() > 1e-3


def test_dr_grpo_token_weight_does_not_depend_on_response_length():
  """On policy and unclipped, d loss / d logp_t = -A_k / (T_max B K) for every real token of
  response k, short or long; GRPO's per-sequence mean gives -A_k / (|y_k| B K) instead."""
  logp, _, refp, rewards, mask = inputs(seed=4)
  args = (with_nan(logp, mask), with_nan(refp, mask), jnp.asarray(rewards, jnp.float32), jnp.asarray(mask))
  adv = rewards - rewards.mean(-1, keepdims=True)
  lengths = mask.sum(-1)
  assert len(set(lengths.ravel().tolist())) > 1
  for loss_type, want in (("dr_grpo", -adv / (T * B * K)),
                          ("grpo", -(adv / (rewards.std(-1, ddof=1, keepdims=True) + 1e-4)) / (lengths * B * K))):
    grad = jax.grad(lambda lp: grpo_loss(lp, *args, loss_type=loss_type, beta=0.0, eps=0.2, eps_low=0.2,
                                         eps_high=0.28)[0])(args[0])
    np.testing.assert_allclose(np.asarray(grad), np.where(mask, want[..., None], 0.0), rtol=1e-5, atol=1e-7)


def experience(seed, rows=6, k=2, r=5, sampler_shift=0.0):
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([[1, r], rng.integers(1, r + 1, rows - 2)])
  mask = (np.arange(r)[None] < lengths[:, None]).astype(np.int32)
  old = rng.normal(-2.0, 1.0, (rows, r)).astype(np.float32)
  return Experience(
      query=np.repeat(rng.integers(0, 20, (rows // k, 3)), k, 0).astype(np.int32), query_mask=np.ones((rows, 3), np.int32),
      response=rng.integers(0, 20, (rows, r)).astype(np.int32), response_mask=mask, logp_old=old,
      logp_ref=rng.normal(-2.0, 1.0, (rows, r)).astype(np.float32),
      scores=rng.normal(0.0, 1.0, rows).astype(np.float32), has_eos=np.ones(rows, bool), k=k,
      logp_sampler=(old + sampler_shift * rng.normal(0.0, 1.0, (rows, r))).astype(np.float32))


def make_algo(name, **overrides):
  rl = config_base.base_config().rl
  rl.update(algo=name, **overrides)
  return algorithms.create(rl, None, 1.0)


def test_reinforce_pp_advantages_match_numpy():
  """Token rewards (k1 KL, score at the last real token), returns to the end of the response,
  normalised over every real token of the rollout; padding gets 0."""
  exp = experience(seed=5)
  batch, _ = make_algo("reinforce_pp").prepare(exp, exp.scores, 0.3)
  want = ref.reinforce_pp_advantages(exp.scores.astype(np.float64), exp.logp_old.astype(np.float64),
                                     exp.logp_ref.astype(np.float64), exp.response_mask, kl_coef=0.3)
  np.testing.assert_allclose(np.asarray(batch["advantages"]).reshape(want.shape), want, rtol=1e-5, atol=1e-5)
  raw = reinforce_pp_advantages(exp.scores, exp.logp_old, exp.logp_ref, exp.response_mask, kl_coef=0.3)
  assert np.all(raw[exp.response_mask == 0] == 0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_is_weights_match_numpy(level):
  exp = experience(seed=6, sampler_shift=0.5)
  cap = 1.5
  weights, metrics = rollout_is_weights(exp, level, cap)
  mask = exp.response_mask > 0
  log_ratio = np.where(mask, exp.logp_old.astype(np.float64) - exp.logp_sampler, 0.0)
  raw = np.exp(log_ratio.sum(-1)) if level == "sequence" else np.exp(log_ratio)
  valid = mask.any(-1) if level == "sequence" else mask
  np.testing.assert_allclose(weights, np.where(valid, np.minimum(raw, cap), 0.0), rtol=1e-5)
  np.testing.assert_allclose(metrics["rollout_is/weight_max"], raw[valid].max(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rollout_is/truncated_frac"], (raw[valid] > cap).mean())
  assert 0 < metrics["rollout_is/truncated_frac"] < 1


def test_rollout_is_multiplies_token_advantages_and_p3o_pairs():
  """'tis' adds the weights to the batch and every policy-gradient loss applies them: for a
  token-level loss (REINFORCE++) as advantages x weights; for P3O each pair's term x w_i w_j."""
  graph_free_exp = experience(seed=7, sampler_shift=0.4)
  algo = make_algo("reinforce_pp", rollout_is="tis", rollout_is_cap=2.0)
  batch, metrics = algo.prepare(graph_free_exp, graph_free_exp.scores, 0.05)
  w = batch["sample_weight"]
  assert w.shape == batch["advantages"].shape and not np.allclose(w[batch["response_mask"] > 0], 1.0)
  assert {"rollout_is/weight_mean", "rollout_is/weight_max", "rollout_is/truncated_frac"} <= set(metrics)
  off = make_algo("reinforce_pp").prepare(graph_free_exp, graph_free_exp.scores, 0.05)[0]
  assert "sample_weight" not in off

  rng = np.random.default_rng(8)
  mask = jnp.asarray(batch["response_mask"] > 0).reshape(-1, batch["response_mask"].shape[-1])
  logp = jnp.asarray(np.asarray(batch["logp_old"]).reshape(mask.shape) + 0.3 * rng.normal(size=mask.shape),
                     jnp.float32)
  flat = lambda x: jnp.asarray(x).reshape(mask.shape)
  weighted = losses.ppo(logp, flat(batch["logp_old"]), flat(batch["advantages"]) * flat(w), mask)[0]
  plain = losses.ppo(logp, flat(batch["logp_old"]), flat(batch["advantages"]), mask)[0]
  assert abs(float(weighted) - float(plain)) > 1e-4

  # P3O, K=2: one pair per prompt; the weighted loss is sum_b w_b1 w_b2 L_b / B.
  p3o = make_algo("p3o", rollout_is="tis", rollout_is_cap=2.0)
  pb, _ = p3o.prepare(graph_free_exp, graph_free_exp.scores, 0.05)
  sw = pb["sample_weight"]
  assert sw.shape == (3, 2)
  tok = dict(token_mask=jnp.asarray(pb["response_mask"]), beta=0.05)
  lp = jnp.asarray(np.asarray(pb["logp_old"]) + 0.2 * rng.normal(size=pb["logp_old"].shape), jnp.float32)
  args = (lp, jnp.asarray(pb["logp_old"]), jnp.asarray(pb["logp_ref"]), jnp.asarray(pb["rewards"]))
  total = float(losses.p3o(*args, sample_weight=jnp.asarray(sw), **tok)[0])
  per_pair = [float(losses.p3o(*(a[b:b + 1] for a in args), token_mask=tok["token_mask"][b:b + 1], beta=0.05)[0])
              for b in range(3)]
  np.testing.assert_allclose(total, sum(sw[b, 0] * sw[b, 1] * per_pair[b] for b in range(3)) / 3, rtol=1e-5)


def test_online_dpo_has_no_rollout_correction():
  exp = experience(seed=9, sampler_shift=0.4)
  batch, metrics = make_algo("online_dpo", rollout_is="tis").prepare(exp, exp.scores, 0.05)
  assert "sample_weight" not in batch and metrics == {}


def test_hyperparameters_are_a_frozen_dataclass_of_the_fields_read():
  algo = make_algo("grpo", loss_type="dapo", eps_high=0.3)
  assert dataclasses.is_dataclass(algo.hp) and algo.hp.loss_type == "dapo" and algo.hp.eps_high == 0.3
  with pytest.raises(dataclasses.FrozenInstanceError):
    algo.hp.eps = 1.0
