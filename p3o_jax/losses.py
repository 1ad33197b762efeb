"""Loss functions for RLHF: P3O (V1, V2, K >= 2), PPO (+ GAE, whitening), the DPO family (DPO,
IPO, SLiC's hinge, RPO's NLL term), SimPO, ORPO, KTO, Bradley-Terry, SFT, and the pieces the other
policy-gradient baselines share (clipped surrogate, k3 KL, group advantages; their losses live
with each algorithm in `p3o_jax/rl/algorithms/`).

Every loss is a pure function of arrays that returns `(loss, metrics)`; none knows about
models, meshes or optimizers. Equations are those of docs/algorithms.md (P3O: Wu et al. 2023,
"Pairwise Proximal Policy Optimization"); docstrings name the section they implement.

Shape letters: B prompts (or sequences), K responses per prompt, P = K(K-1)/2 pairs,
T response tokens.

Normalisers. Each loss is `sum(terms) / normaliser`, where the unit of the normaliser is
explicit (pair, sequence or token) and the default is the count in the arrays given.
Pass `normaliser=` the count of the WHOLE batch to make micro-batching exact: the sum of
the micro-batch losses then equals the full-batch loss, whatever the split. The count of a
batch is what the `*_normaliser` helpers return. (Batch-statistic options, such as
`whiten_delta`, are the exception: they see only the arrays they are given.)

Masks are boolean and explicit. Masked entries never reach the loss or its gradient, even
when they hold NaN or inf (inputs are zeroed where masked before any arithmetic).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_TINY = 1e-8  # guard for std / counts that can be zero


# ---------------------------------------------------------------------------- helpers


def masked_sum(x: Array, mask: Array | None, axis=None) -> Array:
  """Sum of `x` where `mask` is true (NaN/inf in masked entries do not leak)."""
  if mask is None:
    return jnp.sum(x, axis=axis)
  return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x: Array, mask: Array | None, axis=None) -> Array:
  """Mean of `x` over entries where `mask` is true; 0 where there are none."""
  if mask is None:
    return jnp.mean(x, axis=axis)
  count = jnp.sum(mask, axis=axis)
  return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def masked_var(x: Array, mask: Array | None) -> Array:
  """Population variance of `x` over entries where `mask` is true."""
  mean = masked_mean(x, mask)
  return masked_mean(jnp.square(x - mean), mask)


def sequence_logprob(token_logp: Array, mask: Array) -> Array:
  """log pi(y|x) = sum_t mask_t * log pi(y_t | x, y_<t).

  Args:
    token_logp: [..., T] per-token log-probabilities of the sampled tokens.
    mask: [..., T] bool, true on response tokens (up to and including EOS).
  Returns:
    [...] sequence log-probabilities.
  """
  return masked_sum(token_logp, mask, axis=-1)


def sequence_kl(logp: Array, ref_logp: Array, mask: Array) -> Array:
  """l(y) = sum_t mask_t * [log pi(y_t|.) - log pi_ref(y_t|.)]   (docs/algorithms.md, Notation: l_theta).

  The one-sample (k1) estimate of KL(pi || pi_ref) for a sampled y; it can be negative for
  one sample, which is correct (docs/pitfalls.md, 4).

  Args:
    logp, ref_logp: [..., T] per-token log-probabilities under the policy and the reference.
    mask: [..., T] bool response mask.
  Returns:
    [...] sequence-level log-ratios.
  """
  return masked_sum(logp - ref_logp, mask, axis=-1)


def whiten(x: Array, mask: Array | None = None, shift_mean: bool = True) -> Array:
  """(x - mean) / sqrt(var + 1e-8) over the entries where `mask` is true.

  Population variance; the 1e-8 guards a zero std (one entry, or all equal). With
  `shift_mean=False` the mean is added back (scale only). Masked entries come out as 0.

  Args:
    x: any shape. mask: same shape, bool (None: all entries).
  """
  mean = masked_mean(x, mask)
  var = masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + _TINY)
  if not shift_mean:
    out = out + mean
  return out if mask is None else jnp.where(mask, out, 0.0)


def clipped_surrogate(log_ratio: Array, advantages: Array, eps_low: float, eps_high: float) -> tuple[Array, Array]:
  """PPO's pessimistic surrogate, elementwise (to minimise), and where the clipped branch is active:

    ratio = exp(log_ratio)
    L     = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))

  Works per token ([B, T]) or per sequence ([B]); eps_low < eps_high is DAPO's clip-higher.
  """
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  return jnp.maximum(unclipped, clipped), clipped > unclipped


def k3_kl(logp: Array, ref_logp: Array) -> Array:
  """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased
  on samples of pi, with gradient through `logp` (the GRPO loss term; docs/pitfalls.md, 4)."""
  log_ratio = ref_logp - logp
  return jnp.exp(log_ratio) - log_ratio - 1.0


def group_advantages(rewards: Array, mask: Array | None = None, *, scale: bool = True,
                     eps: float = 1e-4) -> Array:
  """GRPO's group-relative advantages over each prompt's K responses, [B, K] -> [B, K]:

    A_k = (r_k - mean_j r_j) / (std_j r_j + eps)      (scale=True; std with ddof=1, as TRL)
    A_k =  r_k - mean_j r_j                            (scale=False: Dr. GRPO)

  Masked responses are left out of the statistics and get 0. A group whose rewards are all
  equal gets A = 0 (no NaN).
  """
  mask = jnp.ones(rewards.shape, bool) if mask is None else mask.astype(bool)
  n = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)
  mean = masked_sum(rewards, mask, axis=-1)[:, None] / jnp.maximum(n, 1.0)
  centred = jnp.where(mask, rewards - mean, 0.0)
  if not scale:
    return centred
  std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0))
  return centred / (std + eps)


def leave_one_out_advantages(rewards: Array) -> Array:
  """RLOO's advantages over each prompt's K responses, [B, K] -> [B, K]: r_k - mean_{j != k} r_j."""
  k = rewards.shape[-1]
  _check(k >= 2, f"a leave-one-out baseline needs at least 2 responses per prompt; got K={k}")
  total = jnp.sum(rewards, axis=-1, keepdims=True)
  return rewards - (total - rewards) / (k - 1)


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def _check_number(value, ok, msg: str) -> None:
  """A hyperparameter's range where it is a number. Inside the RL update it is traced (an input
  of the program, `rl.update.make_update`), and config_checks has checked the config's value."""
  if not isinstance(value, jax.core.Tracer):
    _check(ok(value), msg)


def _choice(name: str, value, options) -> None:
  _check(value in options, f"{name}={value!r}; expected one of {tuple(options)}")


def _shape(name: str, x: Array, shape: tuple) -> None:
  _check(tuple(x.shape) == tuple(shape), f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)}")


def _divide(total: Array, count: Array, normaliser) -> Array:
  denom = count if normaliser is None else normaliser
  return total / jnp.maximum(denom, _TINY)


# ---------------------------------------------------------------------------- P3O


def pair_indices(k: int) -> tuple[np.ndarray, np.ndarray]:
  """Static indices (i, j), i < j, of the K(K-1)/2 pairs of K responses, row-major."""
  _check(k >= 2, f"P3O needs at least 2 responses per prompt; got K={k}")
  return np.triu_indices(k, 1)


def p3o_normaliser(mask: Array, token_mask: Array | None = None, normalise: str = "pair") -> Array:
  """The count a P3O loss divides by; pass it, summed over a whole batch, as `normaliser=`.

  Args:
    mask: [B, K] bool, valid responses. A pair counts when both of its responses are valid.
    token_mask: [B, K, T] bool response tokens; needed for normalise='token'.
    normalise: 'pair': number of valid pairs. 'token': sum over valid pairs (i, j) of
      (n_i + n_j) / 2, the mean token count of the pair, where n_i = sum_t token_mask[i, t].
      At K=2 that is half the tokens of both responses, which reproduces the authors'
      `sum(2 * pair_loss) / n_tokens`.
  Returns:
    scalar float32.
  """
  _choice("normalise", normalise, ("pair", "token"))
  i, j = pair_indices(mask.shape[-1])
  valid = mask[:, i] & mask[:, j]
  if normalise == "pair":
    return jnp.sum(valid).astype(jnp.float32)
  _check(token_mask is not None, "normalise='token' needs token_mask [B, K, T]")
  n = jnp.sum(token_mask, axis=-1).astype(jnp.float32)  # [B, K]
  return masked_sum(0.5 * (n[:, i] + n[:, j]), valid)


def p3o(
    logp: Array,
    old_logp: Array,
    ref_logp: Array,
    rewards: Array,
    *,
    beta: float,
    variant: str = "v2",
    eps: float = 0.2,
    c: float = 10.0,
    kl_source: str = "theta",
    whiten_delta: bool = False,
    mask: Array | None = None,
    token_mask: Array | None = None,
    clip_per_token: bool = False,
    normalise: str = "pair",
    normaliser: Array | float | None = None,
    sample_weight: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Pairwise Proximal Policy Optimization loss (to minimise), averaged over all pairs.

  For each prompt b and each pair of its responses (i, j), i < j (y1 = y_i, y2 = y_j):

    l(y)     = logp(y) - ref_logp(y)                                    (docs/algorithms.md, Notation)
    rho_i    = exp(logp_i - old_logp_i)                                 (docs/algorithms.md, Notation)
    Delta_ij = sg[(r_i - r_j) - beta * (l_i - l_j)]                     (docs/algorithms.md, Notation)

  variant='v1' (docs/algorithms.md, P3O-V1: separate clipping):
    w_i  = clip(sg(rho_i), 1/c, c)
    J1   = w_j * min(rho_i * Delta,  clip(rho_i, 1-eps, 1+eps) * Delta)
    J2   = w_i * min(rho_j * -Delta, clip(rho_j, 1-eps, 1+eps) * -Delta)
    L_ij = -(J1 + J2) / 2
  variant='v2' (docs/algorithms.md, P3O-V2: joint clipping; the authors' code):
    u    = logp_i - logp_j,   u_old = old_logp_i - old_logp_j
    W    = clip(sg(rho_i * rho_j), 1/c, c)
    L_ij = max(-Delta * W * u / 2,  -Delta * W * clip(u, u_old - eps, u_old + eps) / 2)

  loss = sum over valid pairs of L_ij / normaliser.

  Unclipped (eps, c -> inf) both variants have the gradient of Theorem 1, at any rho:
    d loss / d logp_i = -rho_i rho_j Delta / 2,   d loss / d logp_j = +rho_i rho_j Delta / 2
  (per pair, before the normaliser): the negated importance-sampled pairwise policy
  gradient. (The unclipped V1 loss VALUE is identically 0, since w_j rho_i = rho_i rho_j =
  w_i rho_j; only its gradient carries the update.) Only reward differences enter, so
  adding any delta(x) to all K rewards of a prompt changes neither loss nor gradient.

  K > 2 is the natural generalisation the paper names as future work: the mean of L_ij over all K(K-1)/2
  pairs. At rho = 1 (and beta = 0) its negated gradient is
    (1/K) sum_i (r_i - mean_{j != i} r_j) grad log pi(y_i),
  REINFORCE with the leave-one-out baseline, whose expectation is the policy gradient.

  Args:
    logp: [B, K] sequence log-probabilities sum_t log pi_theta(y_t|x, y_<t) (carry gradient),
      or [B, K, T] token log-probabilities when `token_mask` is given.
    old_logp: like `logp`, under pi_old (the sampling policy); treated as constant.
    ref_logp: like `logp`, under pi_ref; treated as constant.
    rewards: [B, K] scalar rewards r(y_k | x) (already clipped / scaled as configured).
    beta: KL coefficient inside Delta.
    variant: 'v2' (default, joint clipping) or 'v1' (separate clipping).
    eps: clip range (paper: 0.2). For 'v2' it bounds the log of the relative ratio.
    c: importance-weight clip, weights are clipped to [1/c, c] (paper: 10). Needs c >= 1.
    kl_source: which log-probabilities make l inside Delta. 'theta' (default, the authors'
      code): sg(logp) - ref_logp, the current parameters, detached; it equals 'old' at the
      first inner step. 'old': old_logp - ref_logp, fixed for the whole rollout.
    whiten_delta: divide Delta by its std over the valid pairs in these arrays (no mean
      shift: Delta_ij = -Delta_ji, so a mean has no meaning); a zero std divides by 1.
      Off by default, as in the authors' code. A batch statistic: not micro-batch exact.
    mask: [B, K] bool valid responses (None: all). Pairs with an invalid member are dropped;
      a row with fewer than two valid responses contributes nothing.
    token_mask: [B, K, T] bool response tokens. When given, logp/old_logp/ref_logp are token
      log-probabilities and are summed under this mask to sequences.
    clip_per_token: 'v2' only, needs token_mask. The ratio is clipped per token instead of
      per sequence. With a = -Delta_ij * W_ij / 2 (a constant per pair),
        L_ij = sum_{t in y_i} max( a * logp_i,t,  a * clip(logp_i,t, old_i,t - eps, old_i,t + eps))
             + sum_{t in y_j} max(-a * logp_j,t, -a * clip(logp_j,t, old_j,t - eps, old_j,t + eps))
      i.e. each token's log-ratio to pi_old is clipped to [-eps, eps] (the authors' later
      variant). Unclipped it equals the 'v2' loss, value and gradient.
    normalise: 'pair' (default, the paper) or 'token' (the authors' later option: divide by
      the number of response tokens; see `p3o_normaliser`).
    normaliser: overrides the count divided by (see the module docstring).
    sample_weight: [B, K] constant per-response weights (rollout importance correction, see
      docs/algorithms.md, Rollout importance correction); pair (i, j) is weighted by
      w_i * w_j, the pair having been drawn jointly. None: 1.

  Returns:
    (loss, metrics). Metrics (means over valid entries):
      'loss/policy_avg'     the loss.
      'policy/clipfrac_avg' fraction of clipped terms: pairs (v2), pair sides (v1), or pair
                            tokens (clip_per_token) where the clipped branch is the active one.
      'policy/approxkl_avg' 0.5 * mean over valid responses of (logp - old_logp)^2, the TRL
                            estimator applied to sequence log-ratios.
      'val/ratio', 'val/ratio_var'  mean and variance of rho over valid responses.
      'p3o/delta_mean', 'p3o/delta_abs'  mean of Delta and |Delta| over valid pairs (after
                            whitening, if on).
      'p3o/weight_clipfrac' fraction of W (v2) or of the w's used (v1) at the [1/c, c] clip.
      'p3o/kl'              mean l over valid responses (sequence-level k1 KL estimate).
      'p3o/normaliser'      the count divided by.
  """
  _choice("variant", variant, ("v1", "v2"))
  _choice("kl_source", kl_source, ("theta", "old"))
  _choice("normalise", normalise, ("pair", "token"))
  _check_number(c, lambda c: c >= 1.0, f"c={c}; the weight clip [1/c, c] needs c >= 1")
  _check_number(eps, lambda eps: eps >= 0.0, f"eps={eps}; needs eps >= 0")
  _check(rewards.ndim == 2, f"rewards has shape {rewards.shape}; expected [B, K]")
  b, k = rewards.shape
  i, j = pair_indices(k)
  if mask is None:
    mask = jnp.ones((b, k), bool)
  _shape("mask", mask, (b, k))
  mask = mask.astype(bool)

  if token_mask is None:
    _check(not clip_per_token, "clip_per_token needs token log-probs [B, K, T] and token_mask")
    _check(normalise == "pair", "normalise='token' needs token log-probs [B, K, T] and token_mask")
    for name, x in (("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp)):
      _shape(name, x, (b, k))
  else:
    _check(token_mask.ndim == 3 and token_mask.shape[:2] == (b, k),
           f"token_mask has shape {token_mask.shape}; expected [B, K, T] with B, K = {(b, k)}")
    for name, x in (("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp)):
      _shape(name, x, token_mask.shape)
    _check(not (clip_per_token and variant == "v1"), "clip_per_token is defined for variant='v2' only")
    token_mask = token_mask.astype(bool) & mask[:, :, None]

  # Zero masked entries first, so NaN/inf there cannot reach values or gradients.
  full_mask = mask if token_mask is None else token_mask
  logp_t = jnp.where(full_mask, logp, 0.0)
  old_t = jax.lax.stop_gradient(jnp.where(full_mask, old_logp, 0.0))
  ref_t = jax.lax.stop_gradient(jnp.where(full_mask, ref_logp, 0.0))
  rewards = jax.lax.stop_gradient(jnp.where(mask, rewards, 0.0))
  if token_mask is None:
    seq_logp, seq_old, seq_ref = logp_t, old_t, ref_t
  else:
    seq_logp, seq_old, seq_ref = (jnp.sum(x, axis=-1) for x in (logp_t, old_t, ref_t))

  # Notation: l, rho, Delta.
  if kl_source == "theta":
    l = jax.lax.stop_gradient(seq_logp) - seq_ref
  else:
    l = seq_old - seq_ref
  log_rho = seq_logp - seq_old                             # [B, K]
  rho = jnp.exp(log_rho)
  sg_rho = jax.lax.stop_gradient(rho)
  valid = mask[:, i] & mask[:, j]                          # [B, P]
  delta = jax.lax.stop_gradient((rewards[:, i] - rewards[:, j]) - beta * (l[:, i] - l[:, j]))
  delta = jnp.where(valid, delta, 0.0)
  if whiten_delta:
    std = jnp.sqrt(masked_var(delta, valid))
    delta = delta / jnp.where(std > _TINY, std, 1.0)
  if sample_weight is not None:  # the loss is positively homogeneous in Delta: this weights each pair
    _shape("sample_weight", sample_weight, (b, k))
    sample_weight = jax.lax.stop_gradient(jnp.where(mask, sample_weight, 0.0))
    delta = delta * sample_weight[:, i] * sample_weight[:, j]

  def outside(w):  # weight at the [1/c, c] clip
    return (w < 1.0 / c) | (w > c)

  if variant == "v1":
    # P3O-V1: separate clipping.
    w = jnp.clip(sg_rho, 1.0 / c, c)                                     # [B, K]
    rho_i, rho_j = rho[:, i], rho[:, j]
    surr1 = rho_i * delta
    surr1_clip = jnp.clip(rho_i, 1.0 - eps, 1.0 + eps) * delta
    surr2 = rho_j * -delta
    surr2_clip = jnp.clip(rho_j, 1.0 - eps, 1.0 + eps) * -delta
    j1 = w[:, j] * jnp.minimum(surr1, surr1_clip)
    j2 = w[:, i] * jnp.minimum(surr2, surr2_clip)
    pair_loss = -(j1 + j2) / 2                                           # [B, P]
    clipped = 0.5 * ((surr1_clip < surr1).astype(jnp.float32) + (surr2_clip < surr2).astype(jnp.float32))
    clipfrac = masked_mean(clipped, valid)
    w_clip = 0.5 * (outside(sg_rho[:, i]).astype(jnp.float32) + outside(sg_rho[:, j]).astype(jnp.float32))
    weight_clipfrac = masked_mean(w_clip, valid)
  else:
    # P3O-V2: joint clipping of u = log(pi(y_i)/pi(y_j)) around u_old.
    big_w = jnp.clip(sg_rho[:, i] * sg_rho[:, j], 1.0 / c, c)          # [B, P]
    weight_clipfrac = masked_mean(outside(sg_rho[:, i] * sg_rho[:, j]), valid)
    if not clip_per_token:
      u = seq_logp[:, i] - seq_logp[:, j]
      u_old = seq_old[:, i] - seq_old[:, j]
      loss_unclipped = -delta * big_w * u / 2
      loss_clipped = -delta * big_w * jnp.clip(u, u_old - eps, u_old + eps) / 2
      pair_loss = jnp.maximum(loss_unclipped, loss_clipped)
      clipfrac = masked_mean(loss_clipped > loss_unclipped, valid)
    else:
      a = (-delta * big_w / 2)[:, :, None]                               # [B, P, 1]

      def side(sign, idx):  # sum over one response's tokens of the clipped token surrogate
        lp, old = logp_t[:, idx], old_t[:, idx]                          # [B, P, T]
        tm = token_mask[:, idx] & valid[:, :, None]
        unclipped = sign * a * lp
        clipped_ = sign * a * jnp.clip(lp, old - eps, old + eps)
        return (masked_sum(jnp.maximum(unclipped, clipped_), tm, axis=-1),
                masked_sum(clipped_ > unclipped, tm), jnp.sum(tm))

      loss_i, nclip_i, ntok_i = side(1.0, i)
      loss_j, nclip_j, ntok_j = side(-1.0, j)
      pair_loss = loss_i + loss_j
      clipfrac = (nclip_i + nclip_j) / jnp.maximum(ntok_i + ntok_j, 1)

  count = p3o_normaliser(mask, token_mask, normalise)
  loss = _divide(masked_sum(pair_loss, valid), count, normaliser)

  rho_var = masked_var(sg_rho, mask)
  metrics = {
      "loss/policy_avg": loss,
      "policy/clipfrac_avg": clipfrac,
      "policy/approxkl_avg": 0.5 * masked_mean(jnp.square(jax.lax.stop_gradient(log_rho)), mask),
      "val/ratio": masked_mean(sg_rho, mask),
      "val/ratio_var": rho_var,
      "p3o/delta_mean": masked_mean(delta, valid),
      "p3o/delta_abs": masked_mean(jnp.abs(delta), valid),
      "p3o/weight_clipfrac": weight_clipfrac,
      "p3o/kl": masked_mean(l, mask),
      "p3o/normaliser": count,
  }
  return loss, metrics


# ---------------------------------------------------------------------------- PPO


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> tuple[Array, Array]:
  """Generalised advantage estimation over the real tokens of each row.

    delta_t = r_t + gamma * V_next - V_t
    A_t     = delta_t + gamma * lam * A_next
  where "next" is the next REAL token (mask true) of the row, and V_next = A_next = 0 after
  the last one (the episode ends with the response; no bootstrap). Padded positions are
  skipped by the reverse scan, so they never leak into real ones, wherever they are (left,
  right, or holes), and come out as 0.

  Args:
    rewards: [B, T] per-token rewards (e.g. -beta * KL per token, + score at the last token).
    values: [B, T] value estimates V(s_t).
    mask: [B, T] bool real response tokens.
  Returns:
    (advantages [B, T], returns [B, T] = advantages + values), zero where masked.
  """
  _shape("values", values, rewards.shape)
  _shape("mask", mask, rewards.shape)
  mask = mask.astype(bool)
  rewards = jnp.where(mask, rewards, 0.0)
  values = jnp.where(mask, values, 0.0)

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs                                             # each [B]
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return carry, jnp.where(m, adv, 0.0)

  zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
  _, adv_tb = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  advantages = adv_tb.T
  returns = jnp.where(mask, advantages + values, 0.0)
  return advantages, returns


def ppo_normaliser(mask: Array, normalise: str = "token") -> Array:
  """The count a PPO loss divides by: valid tokens ('token') or valid sequences ('sequence')."""
  _choice("normalise", normalise, ("token", "sequence"))
  if normalise == "token":
    return jnp.sum(mask).astype(jnp.float32)
  return jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)


def _ppo_reduce(x: Array, mask: Array, normalise: str, normaliser) -> Array:
  if normalise == "token":
    total = masked_sum(x, mask)
  else:  # mean over each sequence's tokens, then sum over sequences
    total = jnp.sum(masked_mean(x, mask, axis=-1))
  return _divide(total, ppo_normaliser(mask, normalise), normaliser)


def ppo(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    eps: float = 0.2,
    values: Array | None = None,
    old_values: Array | None = None,
    returns: Array | None = None,
    eps_value: float = 0.2,
    vf_coef: float = 0.1,
    entropy: Array | None = None,
    normalise: str = "token",
    normaliser: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Token-level PPO clipped surrogate plus clipped value loss (as TRL / trlx).

    ratio_t  = exp(logp_t - old_logp_t)
    L_pg     = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1-eps, 1+eps))
    V_clip_t = clip(V_t, V_old_t - eps_value, V_old_t + eps_value)
    L_vf     = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)
    loss     = L_pg + vf_coef * L_vf

  Args:
    logp: [B, T] token log-probabilities under pi_theta (carry gradient).
    old_logp: [B, T] under pi_old (constant). advantages: [B, T] (constant; see `gae`,
      `whiten`).
    mask: [B, T] bool response tokens.
    values, old_values, returns: [B, T] value predictions now / at rollout, and GAE returns.
      All three or none (no value loss).
    vf_coef: value-loss weight (TRL default 0.1).
    entropy: optional [B, T] per-token entropies, logged as 'policy/entropy_avg' only.
    normalise: 'token' (mean over all valid tokens of the batch) or 'sequence' (mean over
      sequences of the per-sequence token mean). normaliser: see the module docstring.
  Returns:
    (loss, metrics) with 'loss/policy_avg', 'loss/value_avg', 'policy/clipfrac_avg',
    'val/clipfrac_avg', 'policy/approxkl_avg' (0.5 * mean (logp - old_logp)^2, TRL),
    'val/ratio', and 'policy/entropy_avg' when entropy is given.
  """
  _choice("normalise", normalise, ("token", "sequence"))
  _check(logp.ndim == 2, f"logp has shape {logp.shape}; expected [B, T]")
  for name, x in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
    _shape(name, x, logp.shape)
  have_value = [x is not None for x in (values, old_values, returns)]
  _check(all(have_value) or not any(have_value), "pass all of values, old_values, returns, or none")
  mask = mask.astype(bool)

  logp = jnp.where(mask, logp, 0.0)
  old_logp = jax.lax.stop_gradient(jnp.where(mask, old_logp, 0.0))
  advantages = jax.lax.stop_gradient(jnp.where(mask, advantages, 0.0))
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  pg_losses, clipped = clipped_surrogate(log_ratio, advantages, eps, eps)
  pg_loss = _ppo_reduce(pg_losses, mask, normalise, normaliser)

  metrics = {
      "loss/policy_avg": pg_loss,
      "policy/clipfrac_avg": masked_mean(clipped, mask),
      "policy/approxkl_avg": 0.5 * masked_mean(jnp.square(jax.lax.stop_gradient(log_ratio)), mask),
      "val/ratio": masked_mean(jax.lax.stop_gradient(ratio), mask),
  }
  loss = pg_loss
  if values is not None:
    for name, x in (("values", values), ("old_values", old_values), ("returns", returns)):
      _shape(name, x, logp.shape)
    values = jnp.where(mask, values, 0.0)
    old_values = jax.lax.stop_gradient(jnp.where(mask, old_values, 0.0))
    returns = jax.lax.stop_gradient(jnp.where(mask, returns, 0.0))
    values_clip = jnp.clip(values, old_values - eps_value, old_values + eps_value)
    vf_losses = jnp.square(values - returns)
    vf_losses_clip = jnp.square(values_clip - returns)
    vf_loss = 0.5 * _ppo_reduce(jnp.maximum(vf_losses, vf_losses_clip), mask, normalise, normaliser)
    loss = loss + vf_coef * vf_loss
    metrics["loss/value_avg"] = vf_loss
    metrics["val/clipfrac_avg"] = masked_mean(vf_losses_clip > vf_losses, mask)
  if entropy is not None:
    _shape("entropy", entropy, logp.shape)
    metrics["policy/entropy_avg"] = masked_mean(jax.lax.stop_gradient(entropy), mask)
  metrics["loss/total"] = loss
  return loss, metrics


# ---------------------------------------------------------------------------- DPO, RM, SFT


DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo(
    policy_chosen_logp: Array,
    policy_rejected_logp: Array,
    ref_chosen_logp: Array,
    ref_rejected_logp: Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    mask: Array | None = None,
    normaliser: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The DPO family on a pair's log-ratio margin   (docs/algorithms.md, Offline preference optimisation).

    h = (logp_w - ref_w) - (logp_l - ref_l)
    sigmoid  loss = -(1 - s) log sigma(beta h) - s log sigma(-beta h)   DPO (Rafailov et al. 2023);
                    s > 0 is conservative DPO, the assumed probability that a label is flipped
    ipo      loss = (h - 1 / (2 beta))^2                                IPO (Azar et al. 2023, eq. 17)
    hinge    loss = max(0, 1 - beta h)                                  SLiC-HF (Zhao et al. 2023)

  Args:
    *_logp: [B] sequence log-probabilities (see `sequence_logprob`); the ref ones constant.
    loss_type: one of DPO_LOSSES. label_smoothing: s (0 <= s < 0.5; sigmoid only).
    mask: [B] bool valid pairs. normaliser: pair count (see the module docstring).
  Returns:
    (loss, metrics) with TRL's 'rewards/chosen', 'rewards/rejected' (beta * log-ratios to the
    reference), 'rewards/accuracies', 'rewards/margins', 'logps/chosen', 'logps/rejected'.
  """
  _choice("loss_type", loss_type, DPO_LOSSES)
  _check_number(label_smoothing, lambda s: 0.0 <= s < 0.5, f"label_smoothing={label_smoothing}; needs 0 <= s < 0.5")
  _check(loss_type == "sigmoid" or isinstance(label_smoothing, jax.core.Tracer) or label_smoothing == 0.0,
         f"label_smoothing={label_smoothing} applies to the sigmoid loss only, not {loss_type!r}")
  shape = policy_chosen_logp.shape
  for name, x in (("policy_rejected_logp", policy_rejected_logp),
                  ("ref_chosen_logp", ref_chosen_logp), ("ref_rejected_logp", ref_rejected_logp)):
    _shape(name, x, shape)
  mask = jnp.ones(shape, bool) if mask is None else mask.astype(bool)
  _shape("mask", mask, shape)
  pc = jnp.where(mask, policy_chosen_logp, 0.0)
  pr = jnp.where(mask, policy_rejected_logp, 0.0)
  rc = jax.lax.stop_gradient(jnp.where(mask, ref_chosen_logp, 0.0))
  rr = jax.lax.stop_gradient(jnp.where(mask, ref_rejected_logp, 0.0))
  chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
  z = chosen_reward - rejected_reward  # beta h
  if loss_type == "sigmoid":
    terms = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  elif loss_type == "ipo":
    terms = jnp.square((pc - rc) - (pr - rr) - 1.0 / (2.0 * beta))
  else:
    terms = jax.nn.relu(1.0 - z)
  loss = _divide(masked_sum(terms, mask), jnp.sum(mask), normaliser)
  return loss, {"loss/dpo": loss, **_preference_metrics(chosen_reward, rejected_reward, pc, pr, mask)}


def chosen_nll(
    policy_chosen_logp: Array,
    chosen_length: Array,
    *,
    mask: Array | None = None,
    normaliser: Array | float | None = None,
) -> Array:
  """RPO's term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the chosen
  responses' negative log-likelihood per token, averaged over pairs, -mean logp_w / |y_w|.

  Args:
    policy_chosen_logp: [B] sequence log-probabilities; chosen_length: [B] response tokens.
    mask: [B] bool valid pairs. normaliser: pair count.
  """
  _shape("chosen_length", chosen_length, policy_chosen_logp.shape)
  mask = jnp.ones(policy_chosen_logp.shape, bool) if mask is None else mask.astype(bool)
  _shape("mask", mask, policy_chosen_logp.shape)
  return _divide(-masked_sum(_per_token(policy_chosen_logp, chosen_length, mask), mask), jnp.sum(mask), normaliser)


def _per_token(logp: Array, length: Array, mask: Array) -> Array:
  """logp / length where the pair is valid, 0 elsewhere (whatever masked entries hold)."""
  return jnp.where(mask, logp, 0.0) / jnp.where(mask, jnp.maximum(length, 1), 1)


def _length_averaged(policy_chosen_logp, policy_rejected_logp, chosen_length, rejected_length, mask):
  """The [B] inputs of a length-normalised pair loss checked; returns (mask, the masked sequence
  log-probs of each side, and their per-token averages)."""
  shape = policy_chosen_logp.shape
  for name, x in (("policy_rejected_logp", policy_rejected_logp), ("chosen_length", chosen_length),
                  ("rejected_length", rejected_length)):
    _shape(name, x, shape)
  mask = jnp.ones(shape, bool) if mask is None else mask.astype(bool)
  _shape("mask", mask, shape)
  return (mask, jnp.where(mask, policy_chosen_logp, 0.0), jnp.where(mask, policy_rejected_logp, 0.0),
          _per_token(policy_chosen_logp, chosen_length, mask), _per_token(policy_rejected_logp, rejected_length, mask))


def simpo(
    policy_chosen_logp: Array,
    policy_rejected_logp: Array,
    chosen_length: Array,
    rejected_length: Array,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
    mask: Array | None = None,
    normaliser: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """SimPO (Meng et al. 2024): reference-free, on length-averaged log-probabilities with a margin
  (docs/algorithms.md, Offline preference optimisation).

    z    = beta (logp_w / |y_w| - logp_l / |y_l|) - gamma
    loss = -(1 - s) log sigma(z) - s log sigma(-z)

  Args:
    *_logp: [B] sequence log-probabilities; *_length: [B] response tokens (>= 1 where valid).
    beta, gamma: the paper's reward scale (about 2) and target margin (about 1).
    label_smoothing: s, as in `dpo`. mask: [B] bool valid pairs. normaliser: pair count.
  Returns:
    (loss, metrics) with the DPO metrics' names, the rewards being beta * logp / |y|.
  """
  _check_number(label_smoothing, lambda s: 0.0 <= s < 0.5, f"label_smoothing={label_smoothing}; needs 0 <= s < 0.5")
  mask, pc, pr, avg_c, avg_r = _length_averaged(policy_chosen_logp, policy_rejected_logp, chosen_length,
                                                rejected_length, mask)
  chosen_reward, rejected_reward = beta * avg_c, beta * avg_r
  z = chosen_reward - rejected_reward - gamma
  terms = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  loss = _divide(masked_sum(terms, mask), jnp.sum(mask), normaliser)
  return loss, {"loss/simpo": loss, **_preference_metrics(chosen_reward, rejected_reward, pc, pr, mask)}


def orpo(
    policy_chosen_logp: Array,
    policy_rejected_logp: Array,
    chosen_length: Array,
    rejected_length: Array,
    *,
    lam: float,
    mask: Array | None = None,
    normaliser: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """ORPO (Hong et al. 2024, "Monolithic Preference Optimization without Reference Model"): the
  chosen responses' NLL plus an odds-ratio term, no reference model.

    a_y  = logp_y / |y|                           (length-averaged log-prob, P_y = exp(a_y))
    l_y  = a_y - log(1 - exp(a_y))                (log odds of y)
    loss = -mean a_w  +  lam * mean[-log sigma(l_w - l_l)]

  Args:
    *_logp: [B] sequence log-probabilities; *_length: [B] response tokens (>= 1 where valid).
    lam: the odds-ratio term's weight (the paper's lambda, 0.1). mask: [B] bool valid pairs.
    normaliser: pair count.
  Returns:
    (loss, metrics) with 'loss/nll', 'orpo/log_odds_ratio' and the DPO metrics' names, the
    rewards being lam * a_y (as TRL logs them).
  """
  mask, pc, pr, avg_c, avg_r = _length_averaged(policy_chosen_logp, policy_rejected_logp, chosen_length,
                                                rejected_length, mask)
  # log(1 - P) from expm1, exact as P -> 0; P -> 1 (an average log-prob of 0) is kept off the pole
  log_odds = lambda a: a - jnp.log(-jnp.expm1(jnp.minimum(a, -1e-6)))
  ratio = log_odds(avg_c) - log_odds(avg_r)
  nll = chosen_nll(policy_chosen_logp, chosen_length, mask=mask, normaliser=normaliser)
  odds_term = _divide(masked_sum(-jax.nn.log_sigmoid(ratio), mask), jnp.sum(mask), normaliser)
  loss = nll + lam * odds_term
  return loss, {"loss/orpo": loss, "loss/nll": nll, "orpo/log_odds_ratio": masked_mean(jax.lax.stop_gradient(ratio), mask),
                **_preference_metrics(lam * avg_c, lam * avg_r, pc, pr, mask)}


def kto(
    policy_logp: Array,
    ref_logp: Array,
    desirable: Array,
    policy_kl_logp: Array,
    ref_kl_logp: Array,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    mask: Array | None = None,
    normaliser: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """KTO (Ethayarajh et al. 2024, "Model Alignment as Prospect Theoretic Optimization", eq. 8) on
  responses labelled desirable or undesirable, one at a time (no pairs).

    r    = logp - ref_logp                                     (the implicit reward over beta)
    z0   = max(0, mean over the batch of kl_logp - ref_kl_logp), no gradient: the KL reference
           point, estimated on responses to OTHER prompts
    loss = lam_D (1 - sigma(beta (r - z0)))   desirable
           lam_U (1 - sigma(beta (z0 - r)))   undesirable
    mean over responses

  Args:
    policy_logp, ref_logp: [B] sequence log-probabilities of the labelled responses.
    desirable: [B] bool labels. policy_kl_logp, ref_kl_logp: [B] of the mismatched responses.
    desirable_weight, undesirable_weight: lam_D, lam_U (the paper keeps
      lam_D n_D / (lam_U n_U) in [1, 4/3]). mask: [B] bool valid rows. normaliser: response count.
  Returns:
    (loss, metrics) with TRL's KTO names: 'kl' (z0), 'rewards/chosen' and 'rewards/rejected'
    (mean beta r of the desirable / undesirable responses), their difference 'rewards/margins',
    and 'logps/chosen', 'logps/rejected'.
  """
  shape = policy_logp.shape
  for name, x in (("ref_logp", ref_logp), ("desirable", desirable), ("policy_kl_logp", policy_kl_logp),
                  ("ref_kl_logp", ref_kl_logp)):
    _shape(name, x, shape)
  mask = jnp.ones(shape, bool) if mask is None else mask.astype(bool)
  _shape("mask", mask, shape)
  desirable = desirable.astype(bool)
  kl_terms = jax.lax.stop_gradient(jnp.where(mask, policy_kl_logp - ref_kl_logp, 0.0))
  z0 = jnp.maximum(masked_mean(kl_terms, mask), 0.0)
  logp = jnp.where(mask, policy_logp, 0.0)
  reward = beta * (logp - jax.lax.stop_gradient(jnp.where(mask, ref_logp, 0.0)))
  terms = jnp.where(desirable, desirable_weight * (1.0 - jax.nn.sigmoid(reward - beta * z0)),
                    undesirable_weight * (1.0 - jax.nn.sigmoid(beta * z0 - reward)))
  loss = _divide(masked_sum(terms, mask), jnp.sum(mask), normaliser)
  good, bad = mask & desirable, mask & ~desirable
  reward, logp = jax.lax.stop_gradient((reward, logp))
  chosen, rejected = masked_mean(reward, good), masked_mean(reward, bad)
  return loss, {"loss/kto": loss, "kl": z0, "rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected, "logps/chosen": masked_mean(logp, good),
                "logps/rejected": masked_mean(logp, bad)}


def _preference_metrics(chosen_reward, rejected_reward, pc, pr, mask) -> dict[str, Array]:
  """TRL's DPO metrics: the implicit rewards of each side, how often the chosen one's is higher,
  their margin, and the policy's log-probabilities."""
  chosen_reward, rejected_reward, pc, pr = jax.lax.stop_gradient((chosen_reward, rejected_reward, pc, pr))
  return {
      "rewards/chosen": masked_mean(chosen_reward, mask),
      "rewards/rejected": masked_mean(rejected_reward, mask),
      "rewards/accuracies": masked_mean(chosen_reward > rejected_reward, mask),
      "rewards/margins": masked_mean(chosen_reward - rejected_reward, mask),
      "logps/chosen": masked_mean(pc, mask),
      "logps/rejected": masked_mean(pr, mask),
  }


def bradley_terry(
    chosen_scores: Array,
    rejected_scores: Array,
    *,
    mask: Array | None = None,
    normaliser: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Reward-model loss L_R = -mean log sigma(r(y_w|x) - r(y_l|x))   (docs/algorithms.md, The pipeline).

  Args:
    chosen_scores, rejected_scores: [B] scalar rewards. mask: [B] bool valid pairs.
  Returns:
    (loss, metrics) with 'rm/accuracy' (fraction with r_w > r_l) and 'rm/margin' (mean r_w - r_l).
  """
  _shape("rejected_scores", rejected_scores, chosen_scores.shape)
  mask = jnp.ones(chosen_scores.shape, bool) if mask is None else mask.astype(bool)
  _shape("mask", mask, chosen_scores.shape)
  diff = jnp.where(mask, chosen_scores - rejected_scores, 0.0)
  loss = _divide(masked_sum(-jax.nn.log_sigmoid(diff), mask), jnp.sum(mask), normaliser)
  diff = jax.lax.stop_gradient(diff)
  metrics = {
      "loss/rm": loss,
      "rm/accuracy": masked_mean(diff > 0, mask),
      "rm/margin": masked_mean(diff, mask),
  }
  return loss, metrics


def sft(
    token_logp: Array,
    mask: Array,
    *,
    normaliser: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Masked token negative log-likelihood, averaged per token   (docs/algorithms.md, The pipeline).

    loss = -sum_{b,t} mask * log pi(y_t | x, y_<t) / sum_{b,t} mask

  Args:
    token_logp: [B, T] log-probabilities of the target tokens. mask: [B, T] bool targets.
    normaliser: token count (see the module docstring).
  Returns:
    (loss, metrics) with 'sft/nll' (the loss) and 'sft/ppl' = exp(nll).
  """
  _shape("mask", mask, token_logp.shape)
  mask = mask.astype(bool)
  loss = _divide(-masked_sum(token_logp, mask), jnp.sum(mask), normaliser)
  nll = jax.lax.stop_gradient(loss)
  return loss, {"sft/nll": nll, "sft/ppl": jnp.exp(nll)}


# ---------------------------------------------------------------------------- registry

LOSSES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {
    "p3o": p3o,
    "ppo": ppo,
    "dpo": dpo,
    "simpo": simpo,
    "orpo": orpo,
    "kto": kto,
    "bradley_terry": bradley_terry,
    "sft": sft,
}


def get_loss(name: str) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """The loss function registered under `name` (one of `LOSSES`)."""
  _choice("loss name", name, LOSSES)
  return LOSSES[name]
