"""Plain NumPy (float64) references for p3o_jax.losses, written from the formulas with loops.

Each function follows the equation as written in docs/algorithms.md (or the cited paper), one
pair / one token at a time, so that it shares no vectorisation trick with the JAX code.
"""

from __future__ import annotations

import math

import numpy as np


def _clip(x, lo, hi):
  return min(max(x, lo), hi)


def _sigmoid_log(z):
  # log sigma(z), stable for both signs
  return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def p3o(logp, old_logp, ref_logp, rewards, *, beta, variant, eps, c, kl_source="theta",
        whiten_delta=False, mask=None, token_mask=None, clip_per_token=False, normalise="pair"):
  """Returns dict: loss, grad (d loss / d logp, same shape as logp), and metric values.

  logp etc. are [B, K] sequence log-probs, or [B, K, T] token log-probs with token_mask.
  """
  logp, old_logp, ref_logp, rewards = (np.asarray(a, np.float64) for a in (logp, old_logp, ref_logp, rewards))
  b_size, k_size = rewards.shape
  mask = np.ones((b_size, k_size), bool) if mask is None else np.asarray(mask, bool)
  tokens = token_mask is not None
  if tokens:
    token_mask = np.asarray(token_mask, bool)
    t_size = token_mask.shape[-1]

  def seq(x, b, k):
    if not tokens:
      return x[b, k]
    return sum(x[b, k, t] for t in range(t_size) if token_mask[b, k, t])

  def ntok(b, k):
    return sum(1 for t in range(t_size) if token_mask[b, k, t])

  # The pairs of valid responses, and Delta for each.
  pairs = []
  for b in range(b_size):
    for i in range(k_size):
      for j in range(i + 1, k_size):
        if mask[b, i] and mask[b, j]:
          pairs.append((b, i, j))

  def kl(b, k):
    src = logp if kl_source == "theta" else old_logp
    return seq(src, b, k) - seq(ref_logp, b, k)

  deltas = {}
  for (b, i, j) in pairs:
    deltas[(b, i, j)] = (rewards[b, i] - rewards[b, j]) - beta * (kl(b, i) - kl(b, j))
  if whiten_delta and pairs:
    vals = np.array(list(deltas.values()))
    std = math.sqrt(np.mean((vals - vals.mean()) ** 2))
    if std > 1e-8:
      deltas = {key: d / std for key, d in deltas.items()}

  grad = np.zeros_like(logp)
  total, clipped, clip_terms, w_clipped, w_terms = 0.0, 0, 0, 0, 0
  for (b, i, j) in pairs:
    d = deltas[(b, i, j)]
    rho_i = math.exp(seq(logp, b, i) - seq(old_logp, b, i))
    rho_j = math.exp(seq(logp, b, j) - seq(old_logp, b, j))
    if variant == "v1":
      w_i, w_j = _clip(rho_i, 1 / c, c), _clip(rho_j, 1 / c, c)
      w_clipped += int(rho_i < 1 / c or rho_i > c) + int(rho_j < 1 / c or rho_j > c)
      w_terms += 2
      # J1 = w_j min(rho_i d, clip(rho_i) d); J2 = w_i min(rho_j (-d), clip(rho_j) (-d))
      a1, a1c = rho_i * d, _clip(rho_i, 1 - eps, 1 + eps) * d
      a2, a2c = rho_j * -d, _clip(rho_j, 1 - eps, 1 + eps) * -d
      total += -(w_j * min(a1, a1c) + w_i * min(a2, a2c)) / 2
      clipped += int(a1c < a1) + int(a2c < a2)
      clip_terms += 2
      # d/dlogp_i of rho_i is rho_i; the clipped branch is flat.
      g_i = -w_j * rho_i * d / 2 if a1 <= a1c else 0.0
      g_j = -w_i * rho_j * -d / 2 if a2 <= a2c else 0.0
      if not tokens:
        grad[b, i] += g_i
        grad[b, j] += g_j
      else:
        grad[b, i] += g_i * token_mask[b, i]
        grad[b, j] += g_j * token_mask[b, j]
    else:
      w_raw = rho_i * rho_j
      w = _clip(w_raw, 1 / c, c)
      w_clipped += int(w_raw < 1 / c or w_raw > c)
      w_terms += 1
      if not clip_per_token:
        u = seq(logp, b, i) - seq(logp, b, j)
        u_old = seq(old_logp, b, i) - seq(old_logp, b, j)
        plain = -d * w * u / 2
        clip = -d * w * _clip(u, u_old - eps, u_old + eps) / 2
        total += max(plain, clip)
        clipped += int(clip > plain)
        clip_terms += 1
        g = -d * w / 2 if plain >= clip else 0.0
        if not tokens:
          grad[b, i] += g
          grad[b, j] -= g
        else:
          grad[b, i] += g * token_mask[b, i]
          grad[b, j] -= g * token_mask[b, j]
      else:
        a = -d * w / 2
        for k, sign in ((i, 1.0), (j, -1.0)):
          for t in range(t_size):
            if not token_mask[b, k, t]:
              continue
            lp, old = logp[b, k, t], old_logp[b, k, t]
            plain = sign * a * lp
            clip = sign * a * _clip(lp, old - eps, old + eps)
            total += max(plain, clip)
            clipped += int(clip > plain)
            clip_terms += 1
            if plain >= clip:
              grad[b, k, t] += sign * a

  if normalise == "pair":
    count = float(len(pairs))
  else:
    count = sum((ntok(b, i) + ntok(b, j)) / 2 for (b, i, j) in pairs)
  grad = grad / count

  valid = [(b, k) for b in range(b_size) for k in range(k_size) if mask[b, k]]
  log_rhos = np.array([seq(logp, b, k) - seq(old_logp, b, k) for (b, k) in valid])
  rhos = np.exp(log_rhos)
  kls = np.array([kl(b, k) for (b, k) in valid])
  d_all = np.array([deltas[p] for p in pairs])
  return {
      "loss": total / count,
      "grad": grad,
      "count": count,
      "deltas": d_all,
      "loss/policy_avg": total / count,
      "policy/clipfrac_avg": clipped / clip_terms,
      "policy/approxkl_avg": 0.5 * np.mean(log_rhos ** 2),
      "val/ratio": rhos.mean(),
      "val/ratio_var": rhos.var(),
      "p3o/delta_mean": d_all.mean(),
      "p3o/delta_abs": np.abs(d_all).mean(),
      "p3o/weight_clipfrac": w_clipped / w_terms,
      "p3o/kl": kls.mean(),
  }


def gae(rewards, values, mask, gamma, lam):
  """Per row: keep the real tokens, run textbook GAE on them (episode ends after the last)."""
  rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
  mask = np.asarray(mask, bool)
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
    n = len(idx)
    for pos in range(n):
      # A_t = sum_l (gamma lam)^l delta_{t+l}, with V after the last real token = 0
      a = 0.0
      for l_ in range(n - pos):
        t = idx[pos + l_]
        v_next = values[b, idx[pos + l_ + 1]] if pos + l_ + 1 < n else 0.0
        delta = rewards[b, t] + gamma * v_next - values[b, t]
        a += (gamma * lam) ** l_ * delta
      adv[b, idx[pos]] = a
  returns = np.where(mask, adv + values, 0.0)
  return adv, returns


def whiten(x, mask, shift_mean=True):
  x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
  vals = x[mask]
  mean, var = vals.mean(), vals.var()
  out = (x - mean) / math.sqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return np.where(mask, out, 0.0)


def ppo(logp, old_logp, adv, mask, *, eps, values=None, old_values=None, returns=None,
        eps_value=0.2, vf_coef=0.1, normalise="token"):
  logp, old_logp, adv, mask = (np.asarray(a, np.float64) for a in (logp, old_logp, adv, mask))
  mask = mask.astype(bool)
  b_size, t_size = logp.shape
  pg_terms, vf_terms = np.zeros_like(logp), np.zeros_like(logp)
  clipped, vclipped, n, ratios, kls = 0, 0, 0, [], []
  for b in range(b_size):
    for t in range(t_size):
      if not mask[b, t]:
        continue
      n += 1
      ratio = math.exp(logp[b, t] - old_logp[b, t])
      ratios.append(ratio)
      kls.append(0.5 * (logp[b, t] - old_logp[b, t]) ** 2)
      plain = -adv[b, t] * ratio
      clip = -adv[b, t] * _clip(ratio, 1 - eps, 1 + eps)
      pg_terms[b, t] = max(plain, clip)
      clipped += int(clip > plain)
      if values is not None:
        v, v_old, ret = values[b, t], old_values[b, t], returns[b, t]
        e1 = (v - ret) ** 2
        e2 = (_clip(v, v_old - eps_value, v_old + eps_value) - ret) ** 2
        vf_terms[b, t] = max(e1, e2)
        vclipped += int(e2 > e1)

  def reduce(terms):
    if normalise == "token":
      return terms[mask].sum() / mask.sum()
    per_seq = [terms[b][mask[b]].mean() for b in range(b_size) if mask[b].any()]
    return sum(per_seq) / len(per_seq)

  pg = reduce(pg_terms)
  out = {"loss/policy_avg": pg, "policy/clipfrac_avg": clipped / n,
         "policy/approxkl_avg": np.mean(kls), "val/ratio": np.mean(ratios), "loss": pg}
  if values is not None:
    vf = 0.5 * reduce(vf_terms)
    out.update({"loss/value_avg": vf, "val/clipfrac_avg": vclipped / n, "loss": pg + vf_coef * vf})
  return out


def dpo(pc, pr, rc, rr, *, beta, label_smoothing=0.0, loss_type="sigmoid"):
  """DPO (Rafailov et al. 2023, eq. 7, with conservative label smoothing), IPO (Azar et al. 2023,
  eq. 17) and SLiC-HF's hinge (Zhao et al. 2023) on h = log-ratio margin, one pair at a time."""
  losses, cr, rj = [], [], []
  for a, b_, c_, d in zip(pc, pr, rc, rr):
    h = (a - c_) - (b_ - d)
    if loss_type == "sigmoid":
      losses.append(-(1 - label_smoothing) * _sigmoid_log(beta * h) - label_smoothing * _sigmoid_log(-beta * h))
    elif loss_type == "ipo":
      losses.append((h - 1 / (2 * beta)) ** 2)
    else:
      losses.append(max(0.0, 1 - beta * h))
    cr.append(beta * (a - c_))
    rj.append(beta * (b_ - d))
  return _preference_out(losses, cr, rj, pc, pr)


def simpo(pc, pr, len_c, len_r, *, beta, gamma, label_smoothing=0.0):
  """SimPO (Meng et al. 2024, eq. 6): sigmoid loss on beta * average log-prob difference minus gamma."""
  losses, cr, rj = [], [], []
  for a, b_, n_c, n_r in zip(pc, pr, len_c, len_r):
    chosen, rejected = beta * a / n_c, beta * b_ / n_r
    z = chosen - rejected - gamma
    losses.append(-(1 - label_smoothing) * _sigmoid_log(z) - label_smoothing * _sigmoid_log(-z))
    cr.append(chosen)
    rj.append(rejected)
  return _preference_out(losses, cr, rj, pc, pr)


def chosen_nll(pc, len_c):
  """RPO's NLL term (Pang et al. 2024): mean over pairs of -logp_w / |y_w|."""
  return float(np.mean([-a / n for a, n in zip(pc, len_c)]))


def orpo(pc, pr, len_c, len_r, *, lam):
  """ORPO (Hong et al. 2024, eqs. 6-7): NLL of the chosen response per token plus lam times
  -log sigmoid of the log odds ratio, odds = P / (1 - P) with P the length-averaged probability."""
  losses, cr, rj, ratios = [], [], [], []
  for a, b_, n_c, n_r in zip(pc, pr, len_c, len_r):
    p_w, p_l = np.exp(a / n_c), np.exp(b_ / n_r)
    ratio = np.log(p_w / (1 - p_w)) - np.log(p_l / (1 - p_l))
    losses.append(-a / n_c - lam * _sigmoid_log(ratio))
    cr.append(lam * a / n_c)
    rj.append(lam * b_ / n_r)
    ratios.append(ratio)
  out = _preference_out(losses, cr, rj, pc, pr)
  out.update({"orpo/log_odds_ratio": np.mean(ratios), "loss/nll": chosen_nll(pc, len_c)})
  return out


def kto(logp, ref_logp, desirable, kl_logp, ref_kl_logp, *, beta, desirable_weight=1.0, undesirable_weight=1.0):
  """KTO (Ethayarajh et al. 2024, eq. 8): E[lambda_y - v(x, y)] with v = lambda_D sigma(beta (r - z0))
  for a desirable y and lambda_U sigma(beta (z0 - r)) for an undesirable one, r the log-ratio to the
  reference and z0 = max(0, mean KL log-ratio over the mismatched responses)."""
  sigmoid = lambda z: 1 / (1 + math.exp(-z))
  z0 = max(0.0, float(np.mean([a - b for a, b in zip(kl_logp, ref_kl_logp)])))
  losses, chosen, rejected, logp_chosen, logp_rejected = [], [], [], [], []
  for a, b_, good in zip(logp, ref_logp, desirable):
    r = a - b_
    if good:
      losses.append(desirable_weight - desirable_weight * sigmoid(beta * (r - z0)))
      chosen.append(beta * r)
      logp_chosen.append(a)
    else:
      losses.append(undesirable_weight - undesirable_weight * sigmoid(beta * (z0 - r)))
      rejected.append(beta * r)
      logp_rejected.append(a)
  return {"loss": np.mean(losses), "kl": z0, "rewards/chosen": np.mean(chosen), "rewards/rejected": np.mean(rejected),
          "rewards/margins": np.mean(chosen) - np.mean(rejected), "logps/chosen": np.mean(logp_chosen),
          "logps/rejected": np.mean(logp_rejected)}


def _preference_out(losses, cr, rj, pc, pr):
  cr, rj = np.array(cr), np.array(rj)
  return {"loss": np.mean(losses), "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
          "rewards/accuracies": np.mean(cr > rj), "rewards/margins": np.mean(cr - rj),
          "logps/chosen": np.mean(pc), "logps/rejected": np.mean(pr)}


def bradley_terry(chosen, rejected):
  diffs = [float(a) - float(b) for a, b in zip(chosen, rejected)]
  return {"loss": -np.mean([_sigmoid_log(d) for d in diffs]),
          "rm/accuracy": np.mean([d > 0 for d in diffs]), "rm/margin": np.mean(diffs)}


def sft(token_logp, mask):
  vals = [float(token_logp[b, t]) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
  nll = -sum(vals) / len(vals)
  return {"loss": nll, "sft/nll": nll, "sft/ppl": math.exp(nll)}


# ---------------------------------------------------------------------------- the baselines
# Inputs as the algorithm modules take them: [B, K, T] token log-probs and masks, [B, K] rewards.


def numeric_grad(fn, x, h=1e-6):
  """Central differences of a scalar float64 function, one entry at a time."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    grad[idx] = (fn(up) - fn(down)) / (2 * h)
  return grad


def _group_stats(values):
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
  return mean, std


def rloo(logp, old_logp, ref_logp, scores, mask, *, beta, eps):
  """TRL RLOOTrainer: R_k = score_k - beta * sum_t (old - ref); A_k = R_k - mean of the others;
  rho_k = exp(sum_t logp - old); mean over responses of max(-A rho, -A clip(rho))."""
  b_size, k_size, _ = logp.shape
  terms = []
  for b in range(b_size):
    reward = []
    for k in range(k_size):
      m = mask[b, k].astype(bool)
      reward.append(scores[b, k] - beta * float(np.sum(old_logp[b, k][m] - ref_logp[b, k][m])))
    for k in range(k_size):
      m = mask[b, k].astype(bool)
      adv = reward[k] - (sum(reward) - reward[k]) / (k_size - 1)
      rho = math.exp(float(np.sum(logp[b, k][m] - old_logp[b, k][m])))
      terms.append(max(-adv * rho, -adv * _clip(rho, 1 - eps, 1 + eps)))
  return sum(terms) / len(terms)


def grpo(logp, old_logp, ref_logp, rewards, mask, *, loss_type, beta, eps, eps_low, eps_high):
  """TRL GRPOTrainer's loss types: per-sequence token mean ('grpo'), sum over max_new_tokens x
  sequences ('dr_grpo', no std), token mean over the batch with clip-higher ('dapo')."""
  b_size, k_size, t_size = logp.shape
  lo, hi = (eps_low, eps_high) if loss_type == "dapo" else (eps, eps)
  total, tokens, seq_means = 0.0, 0, []
  for b in range(b_size):
    mean, std = _group_stats(list(rewards[b]))
    for k in range(k_size):
      adv = rewards[b, k] - mean if loss_type == "dr_grpo" else (rewards[b, k] - mean) / (std + 1e-4)
      seq = []
      for t in range(t_size):
        if not mask[b, k, t]:
          continue
        ratio = math.exp(logp[b, k, t] - old_logp[b, k, t])
        x = ref_logp[b, k, t] - logp[b, k, t]
        term = max(-adv * ratio, -adv * _clip(ratio, 1 - lo, 1 + hi)) + beta * (math.exp(x) - x - 1)
        seq.append(term)
      total += sum(seq)
      tokens += len(seq)
      seq_means.append(sum(seq) / max(len(seq), 1))
  if loss_type == "grpo":
    return sum(seq_means) / (b_size * k_size)
  if loss_type == "dr_grpo":
    return total / (t_size * b_size * k_size)
  return total / tokens


def gspo(logp, old_logp, ref_logp, rewards, mask, *, beta, eps_low, eps_high):
  """GSPO (Zheng et al. 2025): s_k = exp(mean_t (logp - old)), group-normalised advantages,
  the sequence surrogate clipped to [1 - eps_low, 1 + eps_high], plus beta * mean_t k3."""
  b_size, k_size, _ = logp.shape
  terms = []
  for b in range(b_size):
    mean, std = _group_stats(list(rewards[b]))
    for k in range(k_size):
      m = mask[b, k].astype(bool)
      adv = (rewards[b, k] - mean) / (std + 1e-4)
      s = math.exp(float(np.mean(logp[b, k][m] - old_logp[b, k][m])))
      x = ref_logp[b, k][m] - logp[b, k][m]
      kl = float(np.mean(np.exp(x) - x - 1))
      terms.append(max(-adv * s, -adv * _clip(s, 1 - eps_low, 1 + eps_high)) + beta * kl)
  return sum(terms) / len(terms)


def reinforce_pp_advantages(scores, logp_old, logp_ref, mask, *, kl_coef):
  """OpenRLHF's REINFORCE++: r_t = -kl_coef (old - ref) (+ score at the last real token),
  G_t = sum_{s >= t} r_s, then (G - mean) / sqrt(var + 1e-8) over every real token."""
  rows, t_size = logp_old.shape
  returns = np.zeros((rows, t_size))
  for i in range(rows):
    n = int(mask[i].sum())
    r = [-kl_coef * (logp_old[i, t] - logp_ref[i, t]) for t in range(n)]
    r[n - 1] += scores[i]
    running = 0.0
    for t in reversed(range(n)):
      running += r[t]
      returns[i, t] = running
  real = mask.astype(bool)
  mean, var = returns[real].mean(), returns[real].var()
  return np.where(real, (returns - mean) / np.sqrt(var + 1e-8), 0.0)
