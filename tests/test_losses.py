"""p3o_jax.losses against independent NumPy references and the properties docs/algorithms.md states."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3o_jax import losses
import reference_losses as ref

RTOL, ATOL = 1e-5, 1e-6

P3O_METRICS = ("loss/policy_avg", "policy/clipfrac_avg", "policy/approxkl_avg", "val/ratio",
               "val/ratio_var", "p3o/delta_mean", "p3o/delta_abs", "p3o/weight_clipfrac", "p3o/kl")


def f32(x):
  return jnp.asarray(x, jnp.float32)


def p3o_inputs(seed, b=4, k=3, t=None, spread=0.4):
  """Random sequence (or token, if t) log-probs whose ratios to pi_old sit well outside 1 +- 0.2."""
  rng = np.random.default_rng(seed)
  shape = (b, k) if t is None else (b, k, t)
  scale = 1.0 if t is None else 1.0 / np.sqrt(t)
  logp = rng.normal(-3.0, 1.0, shape)
  old = logp + rng.normal(0.0, spread * scale, shape)
  refp = logp + rng.normal(0.0, 0.5 * scale, shape)
  rewards = rng.normal(0.0, 1.0, (b, k))
  return tuple(f32(x) for x in (logp, old, refp, rewards))


def grad_and_value(fn, logp, *args, **kw):
  (loss, metrics), grad = jax.value_and_grad(lambda lp: fn(lp, *args, **kw), has_aux=True)(logp)
  return loss, metrics, grad


def assert_p3o_matches(want, loss, metrics, grad):
  chex.assert_trees_all_close(loss, f32(want["loss"]), rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(grad, f32(want["grad"]), rtol=RTOL, atol=ATOL)
  for name in P3O_METRICS:
    chex.assert_trees_all_close(metrics[name], f32(want[name]), rtol=RTOL, atol=ATOL, custom_message=name)
  chex.assert_trees_all_close(metrics["p3o/normaliser"], f32(want["count"]))


# ---------------------------------------------------------------------------- P3O vs NumPy


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("kl_source", ["theta", "old"])
@pytest.mark.parametrize("clip", [True, False])
def test_p3o_matches_numpy(variant, kl_source, clip):
  logp, old, refp, rewards = p3o_inputs(seed=2, b=4, k=3, spread=0.6)
  # Invalid responses hold NaN: they must be dropped, not poison the loss or gradient.
  mask = np.ones((4, 3), bool)
  mask[1, 2] = mask[3, 0] = mask[3, 2] = False  # row 3 has a single valid response
  nan_logp = jnp.where(f32(mask) > 0, logp, jnp.nan)
  eps, c = (0.2, 1.5) if clip else (1e6, 1e6)
  kw = dict(beta=0.3, variant=variant, eps=eps, c=c, kl_source=kl_source)
  want = ref.p3o(np.where(mask, logp, 0.0), old, refp, rewards, mask=mask, **kw)
  loss, metrics, grad = grad_and_value(losses.p3o, nan_logp, old, refp, rewards, mask=f32(mask) > 0, **kw)
  assert_p3o_matches(want, loss, metrics, grad)
  assert np.all(np.isfinite(grad))
  assert np.all(grad[~mask] == 0)
  assert (want["deltas"] > 0).any() and (want["deltas"] < 0).any()  # both signs of Delta
  # A batch with no valid pair gives 0, not NaN.
  empty_loss, _, empty_grad = grad_and_value(losses.p3o, nan_logp, old, refp, rewards,
                                             mask=jnp.zeros((4, 3), bool), **kw)
  assert empty_loss == 0 and np.all(empty_grad == 0)
  if clip:
    assert metrics["policy/clipfrac_avg"] > 0 and metrics["p3o/weight_clipfrac"] > 0
    assert metrics["policy/clipfrac_avg"] < 1  # and some terms were not clipped
  else:
    assert metrics["policy/clipfrac_avg"] == 0 and metrics["p3o/weight_clipfrac"] == 0


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_p3o_whitened_delta_matches_numpy(variant):
  logp, old, refp, rewards = p3o_inputs(seed=2, b=4, k=2)
  kw = dict(beta=0.1, variant=variant, eps=0.2, c=10.0, whiten_delta=True)
  want = ref.p3o(logp, old, refp, rewards, **kw)
  loss, metrics, grad = grad_and_value(losses.p3o, logp, old, refp, rewards, **kw)
  assert_p3o_matches(want, loss, metrics, grad)
  np.testing.assert_allclose(np.std(want["deltas"]), 1.0, rtol=1e-6)
  # Zero std (all Delta equal to 0) divides by 1 instead of producing NaN.
  loss0, metrics0 = losses.p3o(logp, logp, logp, jnp.zeros_like(rewards), **kw)
  assert np.isfinite(loss0) and metrics0["p3o/delta_abs"] == 0


def test_p3o_token_inputs_per_token_clip_and_token_normaliser_match_numpy():
  b, k, t = 4, 3, 5
  logp, old, refp, rewards = p3o_inputs(seed=3, b=b, k=k, t=t, spread=0.5)
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, t + 1, (b, k))
  token_mask = np.arange(t) < lengths[..., None]                      # right padding
  mask = np.ones((b, k), bool)
  mask[2, 1] = False
  tm = jnp.asarray(token_mask)
  for variant, per_token, normalise in [("v2", True, "token"), ("v2", True, "pair"),
                                        ("v2", False, "token"), ("v1", False, "token")]:
    kw = dict(beta=0.2, variant=variant, eps=0.2, c=3.0, clip_per_token=per_token, normalise=normalise)
    want = ref.p3o(logp, old, refp, rewards, mask=mask, token_mask=token_mask, **kw)
    loss, metrics, grad = grad_and_value(losses.p3o, logp, old, refp, rewards, mask=jnp.asarray(mask),
                                         token_mask=tm, **kw)
    assert_p3o_matches(want, loss, metrics, grad)
    assert metrics["policy/clipfrac_avg"] > 0
    assert np.all(grad * ~token_mask == 0)  # padding gets no gradient


def test_p3o_token_normaliser_is_authors_formula_at_k2():
  """normalise='token' at K=2: sum over pairs of max(l1, l1_clip) (no 1/2) / tokens of both."""
  b, t = 4, 5
  logp, old, refp, rewards = p3o_inputs(seed=4, b=b, k=2, t=t)
  token_mask = np.arange(t) < np.random.default_rng(4).integers(1, t + 1, (b, 2))[..., None]
  kw = dict(beta=0.05, variant="v2", eps=0.2, c=10.0)
  want_pairs = ref.p3o(logp, old, refp, rewards, token_mask=token_mask, **kw)  # per-pair mean
  loss, _ = losses.p3o(logp, old, refp, rewards, token_mask=jnp.asarray(token_mask), normalise="token", **kw)
  authors = 2 * want_pairs["loss"] * b / token_mask.sum()
  np.testing.assert_allclose(loss, authors, rtol=RTOL, atol=ATOL)


def test_p3o_per_token_unclipped_equals_sequence_v2():
  logp, old, refp, rewards = p3o_inputs(seed=5, b=4, k=3, t=5)
  token_mask = jnp.asarray(np.arange(5) < np.array([[5, 2, 3], [1, 4, 5], [3, 3, 2], [4, 1, 5]])[..., None])
  kw = dict(beta=0.2, variant="v2", eps=1e6, c=1e6, token_mask=token_mask)
  a = grad_and_value(losses.p3o, logp, old, refp, rewards, clip_per_token=True, **kw)
  b = grad_and_value(losses.p3o, logp, old, refp, rewards, clip_per_token=False, **kw)
  chex.assert_trees_all_close(a[0], b[0], rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(a[2], b[2], rtol=RTOL, atol=ATOL)


def test_p3o_jit_matches_eager():
  logp, old, refp, rewards = p3o_inputs(seed=6)
  fn = functools.partial(losses.p3o, beta=0.1, variant="v1", eps=0.2, c=2.0)
  chex.assert_trees_all_close(jax.jit(fn)(logp, old, refp, rewards), fn(logp, old, refp, rewards),
                              rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- Theorem 1


@pytest.mark.parametrize("k", [2, 3])
def test_unclipped_gradient_is_theorem_1(k):
  """Spec: unclipped, V1's gradient is Theorem 1, and V2's (W = rho_i rho_j) is too, at rho != 1:

     d loss / d logp = -(1/P) sum_{pairs (i,j)} rho_i rho_j Delta_ij (e_i - e_j) / 2.
  """
  logp, old, refp, rewards = p3o_inputs(seed=7, b=4, k=k, spread=0.5)
  beta = 0.3
  rho = np.exp(np.float64(logp) - np.float64(old))
  l = np.float64(logp) - np.float64(refp)
  want = np.zeros((4, k))
  pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
  for b in range(4):
    for i, j in pairs:
      delta = (rewards[b, i] - rewards[b, j]) - beta * (l[b, i] - l[b, j])
      g = rho[b, i] * rho[b, j] * delta / 2
      want[b, i] -= g
      want[b, j] += g
  want /= 4 * len(pairs)
  assert np.abs(rho - 1).max() > 0.3  # well away from the on-policy point
  grads = {}
  for variant in ("v1", "v2"):
    grad_fn = jax.grad(lambda lp: losses.p3o(lp, old, refp, rewards, beta=beta, variant=variant,
                                             eps=1e6, c=1e6)[0])
    grads[variant] = grad_fn(logp)
    chex.assert_trees_all_close(grads[variant], f32(want), rtol=RTOL, atol=ATOL)
  # Unclipped V1's value is identically 0 (w_j rho_i = w_i rho_j); its gradient is not.
  v1_loss, _ = losses.p3o(logp, old, refp, rewards, beta=beta, variant="v1", eps=1e6, c=1e6)
  np.testing.assert_allclose(v1_loss, 0.0, atol=1e-6)
  assert np.abs(grads["v1"]).max() > 1e-2
  # With clipping on, the two variants differ (they clip different things).
  clipped = [jax.grad(lambda lp: losses.p3o(lp, old, refp, rewards, beta=beta, variant=v)[0])(logp)
             for v in ("v1", "v2")]
  assert np.abs(clipped[0] - clipped[1]).max() > 1e-3


# ---------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("k", [2, 4])
def test_p3o_invariant_to_per_prompt_reward_shift(variant, k):
  """Same samples, same parameters: r and r + delta(x) give the identical loss and gradient.

  Rewards are multiples of 1/64 and shifts integers, so float32 sums are exact and the
  check is bit-for-bit; a second check uses arbitrary float shifts.
  """
  b = 4
  logp, old, refp, _ = p3o_inputs(seed=8, b=b, k=k)
  rng = np.random.default_rng(8)
  rewards = f32(np.round(rng.normal(0, 2, (b, k)) * 64) / 64)
  shift = f32(rng.integers(-50, 50, (b, 1)))
  kw = dict(beta=0.1, variant=variant, eps=0.2, c=2.0)
  loss_a, metrics_a, grad_a = grad_and_value(losses.p3o, logp, old, refp, rewards, **kw)
  loss_b, _, grad_b = grad_and_value(losses.p3o, logp, old, refp, rewards + shift, **kw)
  assert metrics_a["policy/clipfrac_avg"] > 0  # the clipped regime, too
  np.testing.assert_array_equal(loss_a, loss_b)
  np.testing.assert_array_equal(grad_a, grad_b)
  float_shift = f32(rng.normal(0, 3, (b, 1)))
  loss_c, _, grad_c = grad_and_value(losses.p3o, logp, old, refp, rewards + float_shift, **kw)
  chex.assert_trees_all_close((loss_c, grad_c), (loss_a, grad_a), rtol=1e-5, atol=1e-5)


def test_ppo_with_learned_value_changes_under_reward_shift():
  """PPO's advantages (GAE with a fixed critic) and hence its gradient depend on delta(x)."""
  b, t = 4, 8
  rng = np.random.default_rng(9)
  lengths = np.array([8, 3, 6, 2])
  mask = jnp.asarray(np.arange(t) < lengths[:, None])
  last = jnp.asarray(lengths - 1)
  kl_rewards = f32(rng.normal(0, 0.1, (b, t)))
  score = f32(rng.normal(0, 1, (b,)))
  values = f32(rng.normal(0, 1, (b, t)))
  logp = f32(rng.normal(-2, 1, (b, t)))
  old = logp + f32(rng.normal(0, 0.05, (b, t)))

  def ppo_grad(shift):
    token_rewards = kl_rewards.at[jnp.arange(b), last].add(score + shift)
    adv, _ = losses.gae(token_rewards, values, mask, gamma=1.0, lam=0.95)
    grad = jax.grad(lambda lp: losses.ppo(lp, old, adv, mask)[0])(logp)
    return adv, grad

  shift = f32([3.0, -1.0, 0.5, 2.0])
  adv_a, grad_a = ppo_grad(jnp.zeros(b))
  adv_b, grad_b = ppo_grad(shift)
  assert np.abs(adv_b - adv_a).max() > 0.5
  assert np.abs(grad_b - grad_a).max() > 1e-2
  # Whitening the advantages does not remove a per-prompt shift either.
  wa, wb = losses.whiten(adv_a, mask), losses.whiten(adv_b, mask)
  assert np.abs(wb - wa).max() > 1e-2


# ---------------------------------------------------------------------------- bandit


@pytest.mark.parametrize("k", [2, 4])
def test_pairwise_gradient_is_unbiased_policy_gradient_in_a_bandit(k):
  """Contextual bandit, pi(a|x) = softmax(theta[x]); rho = 1, beta = 0.

  The Monte-Carlo mean of -grad(P3O loss) over sampled groups of K responses matches the
  exact policy gradient grad_theta E_x E_{a~pi} r(x, a) = E_x sum_a pi r grad log pi.
  """
  n_x, n_a, n = 3, 4, 20000
  rng = np.random.default_rng(10)
  theta = f32(rng.normal(0, 1, (n_x, n_a)))
  reward = f32(rng.normal(0, 1, (n_x, n_a)) + 5.0)  # a large common offset: only differences matter
  probs = np.asarray(jax.nn.softmax(theta, -1), np.float64)

  xs = rng.integers(0, n_x, n)
  u = rng.random((n, k, 1))
  actions = (u > np.cumsum(probs[xs], -1)[:, None, :]).sum(-1)          # [n, K] inverse-CDF
  actions = np.minimum(actions, n_a - 1)

  def neg_loss(th, x, a):  # one prompt: [1, K] inputs
    logp = jax.nn.log_softmax(th[x])[a][None]
    r = reward[x][a][None]
    sg = jax.lax.stop_gradient(logp)
    return -losses.p3o(logp, sg, sg, r, beta=0.0, variant="v2")[0]

  per_sample = jax.jit(jax.vmap(jax.grad(neg_loss), in_axes=(None, 0, 0)))(theta, jnp.asarray(xs),
                                                                             jnp.asarray(actions))
  per_sample = np.asarray(per_sample, np.float64)
  mean, se = per_sample.mean(0), per_sample.std(0) / np.sqrt(n)

  r = np.asarray(reward, np.float64)
  exact = probs * (r - (probs * r).sum(-1, keepdims=True)) / n_x   # sum_a pi r grad log pi, p(x) = 1/n_x
  assert se.max() < 0.1 * np.abs(exact).max()                      # the test has power
  np.testing.assert_array_less(np.abs(mean - exact), 4 * se + 1e-6)
  assert (np.abs(2 * mean - exact) > 4 * se).any()                 # a factor 2 error would fail


# ---------------------------------------------------------------------------- K and masks


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_k4_with_two_valid_responses_equals_k2(variant):
  b, t = 4, 5
  logp, old, refp, rewards = p3o_inputs(seed=11, b=b, k=4, t=t)
  token_mask = np.arange(t) < np.random.default_rng(11).integers(1, t + 1, (b, 4))[..., None]
  keep = np.array([[0, 2], [1, 3], [3, 0], [1, 2]])                       # the two valid responses per row
  mask = np.zeros((b, 4), bool)
  mask[np.arange(b)[:, None], keep] = True
  rows = np.arange(b)[:, None]
  options = [dict(), dict(normalise="token")]
  if variant == "v2":
    options.append(dict(clip_per_token=True, normalise="token"))
  for opt in options:
    kw = dict(beta=0.2, variant=variant, eps=0.2, c=3.0, **opt)
    loss4, m4, grad4 = grad_and_value(losses.p3o, logp, old, refp, rewards, mask=jnp.asarray(mask),
                                      token_mask=jnp.asarray(token_mask), **kw)
    slice2 = lambda x: x[rows, keep]
    loss2, m2, grad2 = grad_and_value(losses.p3o, slice2(logp), slice2(old), slice2(refp),
                                      slice2(rewards), token_mask=jnp.asarray(token_mask[rows, keep]), **kw)
    chex.assert_trees_all_close(loss4, loss2, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(grad4[rows, keep], grad2, rtol=RTOL, atol=ATOL)
    # Row 2 keeps (3, 0): the K=4 pair is (0, 3), so Delta flips sign there; the loss is
    # symmetric in the pair order, and so is every metric but the signed Delta mean.
    symmetric = [k_ for k_ in P3O_METRICS if k_ != "p3o/delta_mean"]
    chex.assert_trees_all_close({k_: m4[k_] for k_ in symmetric}, {k_: m2[k_] for k_ in symmetric},
                                rtol=RTOL, atol=ATOL)
    assert np.all(grad4[~mask] == 0)


@pytest.mark.parametrize("normalise", ["pair", "token"])
def test_p3o_micro_batches_with_global_normaliser_sum_to_full_batch(normalise):
  b, k, t = 4, 3, 5
  logp, old, refp, rewards = p3o_inputs(seed=12, b=b, k=k, t=t)
  token_mask = jnp.asarray(np.arange(t) < np.random.default_rng(12).integers(1, t + 1, (b, k))[..., None])
  mask = jnp.asarray(np.random.default_rng(13).random((b, k)) > 0.2)
  kw = dict(beta=0.1, eps=0.2, c=3.0, normalise=normalise)
  full = jax.value_and_grad(lambda lp: losses.p3o(lp, old, refp, rewards, mask=mask, token_mask=token_mask,
                                                   **kw)[0])(logp)
  total = losses.p3o_normaliser(mask, token_mask, normalise)
  parts = [slice(0, 2), slice(2, 4)]

  def micro_loss(lp, s):
    return losses.p3o(lp, old[s], refp[s], rewards[s], mask=mask[s], token_mask=token_mask[s],
                      normaliser=total, **kw)[0]

  micro = [jax.value_and_grad(micro_loss)(logp[s], s) for s in parts]
  np.testing.assert_allclose(sum(m[0] for m in micro), full[0], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.concatenate([m[1] for m in micro]), full[1], rtol=RTOL, atol=ATOL)


def test_p3o_rejects_bad_input():
  logp, old, refp, rewards = p3o_inputs(seed=14, k=2)
  with pytest.raises(ValueError, match="variant"):
    losses.p3o(logp, old, refp, rewards, beta=0.1, variant="v3")
  with pytest.raises(ValueError, match="K=1"):
    losses.p3o(logp[:, :1], old[:, :1], refp[:, :1], rewards[:, :1], beta=0.1)
  with pytest.raises(ValueError, match="old_logp"):
    losses.p3o(logp, old[:1], refp, rewards, beta=0.1)
  with pytest.raises(ValueError, match="token_mask"):
    losses.p3o(logp, old, refp, rewards, beta=0.1, normalise="token")
  with pytest.raises(ValueError, match="v2"):
    tm = jnp.ones((4, 2, 3), bool)
    x = jnp.zeros((4, 2, 3))
    losses.p3o(x, x, x, rewards, beta=0.1, variant="v1", token_mask=tm, clip_per_token=True)
  with pytest.raises(ValueError, match="c="):
    losses.p3o(logp, old, refp, rewards, beta=0.1, c=0.5)
  with pytest.raises(ValueError, match="kl_source"):
    losses.p3o(logp, old, refp, rewards, beta=0.1, kl_source="ref")


# ---------------------------------------------------------------------------- PPO pieces


def test_gae_matches_numpy_loop_and_padding_does_not_leak():
  b, t = 4, 8
  rng = np.random.default_rng(15)
  rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
  mask = np.zeros((b, t), bool)
  mask[0, :] = True                  # full
  mask[1, :4] = True                 # right padding
  mask[2, 3:] = True                 # left padding
  mask[3, [0, 1, 4, 5]] = True       # a hole
  adv, ret = losses.gae(f32(rewards), f32(values), jnp.asarray(mask), gamma=0.99, lam=0.95)
  want_adv, want_ret = ref.gae(rewards, values, mask, 0.99, 0.95)
  chex.assert_trees_all_close((adv, ret), (f32(want_adv), f32(want_ret)), rtol=RTOL, atol=ATOL)
  # Garbage in padded slots changes nothing.
  junk = np.where(mask, 0.0, 1e3)
  adv2, ret2 = losses.gae(f32(rewards + junk), f32(values - junk), jnp.asarray(mask), gamma=0.99, lam=0.95)
  np.testing.assert_array_equal(adv2, adv)
  np.testing.assert_array_equal(ret2, ret)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
  rng = np.random.default_rng(16)
  x = rng.normal(3.0, 2.0, (3, 5))
  mask = rng.random((3, 5)) > 0.3
  got = losses.whiten(f32(x), jnp.asarray(mask), shift_mean=shift_mean)
  chex.assert_trees_all_close(got, f32(ref.whiten(x, mask, shift_mean)), rtol=RTOL, atol=ATOL)
  constant = losses.whiten(jnp.full((2, 3), 4.0), jnp.ones((2, 3), bool), shift_mean=shift_mean)
  assert np.all(np.isfinite(constant))


@pytest.mark.parametrize("normalise", ["token", "sequence"])
def test_ppo_matches_numpy(normalise):
  b, t = 4, 8
  rng = np.random.default_rng(17)
  mask = np.arange(t) < np.array([8, 3, 6, 1])[:, None]
  logp = rng.normal(-2, 1, (b, t))
  old = logp + rng.normal(0, 0.4, (b, t))
  adv = rng.normal(0, 1, (b, t))
  values = rng.normal(0, 1, (b, t))
  old_values = values + rng.normal(0, 0.4, (b, t))
  returns = rng.normal(0, 1, (b, t))
  entropy = rng.random((b, t))
  kw = dict(eps=0.2, eps_value=0.2, vf_coef=0.1, normalise=normalise)
  want = ref.ppo(logp, old, adv, mask, values=values, old_values=old_values, returns=returns, **kw)
  nan_logp = jnp.where(jnp.asarray(mask), f32(logp), jnp.nan)
  loss, metrics = losses.ppo(nan_logp, f32(old), f32(adv), jnp.asarray(mask), values=f32(values),
                             old_values=f32(old_values), returns=f32(returns), entropy=f32(entropy), **kw)
  chex.assert_trees_all_close(loss, f32(want["loss"]), rtol=RTOL, atol=ATOL)
  for name in ("loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/clipfrac_avg",
               "policy/approxkl_avg", "val/ratio"):
    chex.assert_trees_all_close(metrics[name], f32(want[name]), rtol=RTOL, atol=ATOL, custom_message=name)
  np.testing.assert_allclose(metrics["policy/entropy_avg"], entropy[mask].mean(), rtol=RTOL)
  assert metrics["policy/clipfrac_avg"] > 0 and metrics["val/clipfrac_avg"] > 0
  grad = jax.grad(lambda lp: losses.ppo(lp, f32(old), f32(adv), jnp.asarray(mask))[0])(nan_logp)
  assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0)
  # Micro-batching with the global normaliser is exact.
  total = losses.ppo_normaliser(jnp.asarray(mask), normalise)
  parts = [losses.ppo(nan_logp[s], f32(old[s]), f32(adv[s]), jnp.asarray(mask[s]), values=f32(values[s]),
                      old_values=f32(old_values[s]), returns=f32(returns[s]), normaliser=total, **kw)[0]
           for s in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(sum(parts), loss, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- DPO, RM, SFT


PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0),
                                                       ("hinge", 0.0)])
def test_dpo_matches_numpy(loss_type, label_smoothing):
  rng = np.random.default_rng(18)
  pc, pr, rc, rr = (rng.normal(-20, 5, 6) for _ in range(4))
  kw = dict(beta=0.1, label_smoothing=label_smoothing, loss_type=loss_type)
  loss, metrics = losses.dpo(f32(pc), f32(pr), f32(rc), f32(rr), **kw)
  want = ref.dpo(pc, pr, rc, rr, **kw)
  chex.assert_trees_all_close(loss, f32(want["loss"]), rtol=RTOL, atol=ATOL)
  for name in PREFERENCE_METRICS:
    chex.assert_trees_all_close(metrics[name], f32(want[name]), rtol=RTOL, atol=ATOL, custom_message=name)
  assert 0 < metrics["rewards/accuracies"] < 1
  masked, _ = losses.dpo(f32(np.r_[pc, np.nan]), f32(np.r_[pr, 0]), f32(np.r_[rc, 0]), f32(np.r_[rr, 0]),
                         mask=jnp.arange(7) < 6, **kw)
  np.testing.assert_allclose(masked, loss, rtol=RTOL)
  # The gradient in the policy's chosen log-prob, against the formula's derivative in h.
  h = (pc - rc) - (pr - rr)
  want_grad = {"sigmoid": -0.1 * ((1 - label_smoothing) * (1 - 1 / (1 + np.exp(-0.1 * h)))
                                  - label_smoothing / (1 + np.exp(-0.1 * h))),
               "ipo": 2 * (h - 1 / 0.2), "hinge": np.where(1 - 0.1 * h > 0, -0.1, 0.0)}[loss_type] / len(h)
  grad = jax.grad(lambda x: losses.dpo(x, f32(pr), f32(rc), f32(rr), **kw)[0])(f32(pc))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_dpo_refuses_label_smoothing_outside_the_sigmoid_loss():
  with pytest.raises(ValueError, match="label_smoothing=0.1 applies to the sigmoid loss only, not 'ipo'"):
    losses.dpo(f32([0.0]), f32([0.0]), f32([0.0]), f32([0.0]), beta=0.1, loss_type="ipo", label_smoothing=0.1)
  with pytest.raises(ValueError, match="loss_type='kto'"):
    losses.dpo(f32([0.0]), f32([0.0]), f32([0.0]), f32([0.0]), beta=0.1, loss_type="kto")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_matches_numpy(label_smoothing):
  rng = np.random.default_rng(20)
  pc, pr = rng.normal(-20, 5, 6), rng.normal(-20, 5, 6)
  len_c, len_r = rng.integers(1, 30, 6), rng.integers(1, 30, 6)
  kw = dict(beta=2.0, gamma=1.0, label_smoothing=label_smoothing)
  loss, metrics = losses.simpo(f32(pc), f32(pr), jnp.asarray(len_c), jnp.asarray(len_r), **kw)
  want = ref.simpo(pc, pr, len_c, len_r, **kw)
  chex.assert_trees_all_close(loss, f32(want["loss"]), rtol=RTOL, atol=ATOL)
  for name in PREFERENCE_METRICS:
    chex.assert_trees_all_close(metrics[name], f32(want[name]), rtol=RTOL, atol=ATOL, custom_message=name)
  masked, _ = losses.simpo(f32(np.r_[pc, np.nan]), f32(np.r_[pr, 0]), jnp.asarray(np.r_[len_c, 0]),
                           jnp.asarray(np.r_[len_r, 0]), mask=jnp.arange(7) < 6, **kw)
  np.testing.assert_allclose(masked, loss, rtol=RTOL)


def test_orpo_matches_numpy():
  rng = np.random.default_rng(21)
  len_c, len_r = rng.integers(1, 30, 6), rng.integers(1, 30, 6)
  pc, pr = -len_c * rng.uniform(0.05, 3, 6), -len_r * rng.uniform(0.05, 3, 6)  # average log-probs in (-3, -0.05)
  loss, metrics = losses.orpo(f32(pc), f32(pr), jnp.asarray(len_c), jnp.asarray(len_r), lam=0.1)
  want = ref.orpo(pc, pr, len_c, len_r, lam=0.1)
  chex.assert_trees_all_close(loss, f32(want["loss"]), rtol=RTOL, atol=ATOL)
  for name in PREFERENCE_METRICS + ("orpo/log_odds_ratio", "loss/nll"):
    chex.assert_trees_all_close(metrics[name], f32(want[name]), rtol=RTOL, atol=ATOL, custom_message=name)
  masked, _ = losses.orpo(f32(np.r_[pc, np.nan]), f32(np.r_[pr, 0]), jnp.asarray(np.r_[len_c, 0]),
                          jnp.asarray(np.r_[len_r, 0]), lam=0.1, mask=jnp.arange(7) < 6)
  np.testing.assert_allclose(masked, loss, rtol=RTOL)
  # A response the policy is certain of (average log-prob 0) keeps the loss and its gradient finite.
  grad = jax.grad(lambda x: losses.orpo(x, f32(pr[:1]), jnp.asarray(len_c[:1]), jnp.asarray(len_r[:1]), lam=0.1)[0])(
      f32([0.0]))
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("kl_shift,weights", [(0.5, (1.0, 1.0)), (-0.5, (1.0, 1.0)), (0.5, (1.33, 0.7))],
                         ids=["kl", "kl-clamped-at-0", "weighted"])
def test_kto_matches_numpy(kl_shift, weights):
  rng = np.random.default_rng(22)
  logp, ref_logp = rng.normal(-20, 5, 8), rng.normal(-20, 5, 8)
  kl_ref = rng.normal(-30, 5, 8)
  kl_logp = kl_ref + kl_shift * 8 + rng.normal(0, 1, 8)  # a mean log-ratio near 4 (or -4: z0 is then 0)
  desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
  kw = dict(beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1])
  loss, metrics = losses.kto(f32(logp), f32(ref_logp), jnp.asarray(desirable), f32(kl_logp), f32(kl_ref), **kw)
  want = ref.kto(logp, ref_logp, desirable, kl_logp, kl_ref, **kw)
  assert (want["kl"] > 1) == (kl_shift > 0)
  chex.assert_trees_all_close(loss, f32(want["loss"]), rtol=RTOL, atol=ATOL)
  for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
    chex.assert_trees_all_close(metrics[name], f32(want[name]), rtol=RTOL, atol=ATOL, custom_message=name)
  # A masked row (NaN in every input) changes nothing, the KL estimate included.
  pad = lambda x: f32(np.r_[x, np.nan])
  masked, masked_metrics = losses.kto(pad(logp), pad(ref_logp), jnp.asarray(np.r_[desirable, True]), pad(kl_logp),
                                      pad(kl_ref), mask=jnp.arange(9) < 8, **kw)
  np.testing.assert_allclose(masked, loss, rtol=RTOL)
  np.testing.assert_allclose(masked_metrics["kl"], metrics["kl"], rtol=RTOL)
  # The gradient: d loss / d logp_i = -lam_D (desirable) or +lam_U times beta sigma'(beta (r - z0)) / B, and
  # none through the reference point.
  grad_logp, grad_kl = jax.grad(lambda x, k: losses.kto(x, f32(ref_logp), jnp.asarray(desirable), k, f32(kl_ref),
                                                        **kw)[0], argnums=(0, 1))(f32(logp), f32(kl_logp))
  z = 0.1 * (logp - ref_logp - want["kl"])
  s = 1 / (1 + np.exp(-z))
  want_grad = np.where(desirable, -weights[0], weights[1]) * 0.1 * s * (1 - s) / 8
  np.testing.assert_allclose(grad_logp, want_grad, rtol=1e-4, atol=1e-9)
  np.testing.assert_array_equal(grad_kl, 0.0)


def test_bradley_terry_matches_numpy():
  rng = np.random.default_rng(19)
  chosen, rejected = rng.normal(0, 2, 8), rng.normal(0, 2, 8)
  loss, metrics = losses.bradley_terry(f32(chosen), f32(rejected))
  want = ref.bradley_terry(chosen, rejected)
  chex.assert_trees_all_close((loss, metrics["rm/accuracy"], metrics["rm/margin"]),
                              (f32(want["loss"]), f32(want["rm/accuracy"]), f32(want["rm/margin"])),
                              rtol=RTOL, atol=ATOL)


def test_sft_and_sequence_helpers_match_numpy():
  rng = np.random.default_rng(20)
  token_logp = -rng.random((3, 5)) * 4
  ref_logp = -rng.random((3, 5)) * 4
  mask = np.arange(5) < np.array([5, 2, 3])[:, None]
  nan_logp = jnp.where(jnp.asarray(mask), f32(token_logp), jnp.nan)
  loss, metrics = losses.sft(nan_logp, jnp.asarray(mask))
  want = ref.sft(token_logp, mask)
  chex.assert_trees_all_close((loss, metrics["sft/nll"], metrics["sft/ppl"]),
                              (f32(want["loss"]), f32(want["sft/nll"]), f32(want["sft/ppl"])),
                              rtol=RTOL, atol=ATOL)
  seq = [sum(token_logp[b, t] for t in range(5) if mask[b, t]) for b in range(3)]
  kl = [sum(token_logp[b, t] - ref_logp[b, t] for t in range(5) if mask[b, t]) for b in range(3)]
  chex.assert_trees_all_close(losses.sequence_logprob(nan_logp, jnp.asarray(mask)), f32(seq),
                              rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(losses.sequence_kl(f32(token_logp), f32(ref_logp), jnp.asarray(mask)), f32(kl),
                              rtol=RTOL, atol=ATOL)


def test_registry_selects_by_name():
  assert losses.get_loss("p3o") is losses.p3o
  assert set(losses.LOSSES) >= {"p3o", "ppo", "dpo", "simpo", "orpo", "kto", "bradley_terry", "sft"}
  with pytest.raises(ValueError, match="grpo"):
    losses.get_loss("grpo")
