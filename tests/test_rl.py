"""The RL plumbing (p3o_jax.rl: sequences, rollout, algorithms) against independent references.

References: a forward on each row's UNPADDED tokens (`decoder.token_logprobs`, positions
0..L-1), NumPy loops for the PPO rewards, GAE and running moments, the Ziegler KL formula,
and the demo vocabulary written out word by word. The docs/pitfalls.md item each test guards is
named in its docstring. Models are tiny random decoders with a large init scale, so that a
position or masking mistake moves the log-probs far beyond the tolerances.
"""

import copy
import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from p3o_jax import config_base, losses, sampling, train_state
from p3o_jax.data import synthetic
from p3o_jax.models import decoder
from p3o_jax.rl import algorithms, rollout, sequences
from p3o_jax.rl.update import for_run, make_update

VOCAB = len(synthetic.VOCAB)  # the demo tokenizer's ids, so TextReward can decode samples
PAD, EOS = 0, 1
ROTARY = decoder.DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=32,
                               max_position_embeddings=64, norm="rmsnorm", mlp="swiglu",
                               activation="silu", init_std=0.2)
LEARNED = decoder.DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=32,
                                max_position_embeddings=64, position="learned", qkv_bias=True, out_bias=True,
                                mlp_bias=True, tie_embeddings=True, init_std=0.2)
REWARD = ROTARY.replace(lm_head=False, scalar_head=True, scalar_head_bias=True)

PROMPTS = [[13, 5, 1, 7, 16], [14, 3, 16], [15, 9, 1, 2, 4, 8], [13, 16]]  # EOS (1) inside two prompts
P, K, N = 8, 4, 8  # prompt bucket, samples per prompt, max new tokens
TEMPERATURE = 0.7
SAMPLER = ml_collections.ConfigDict(dict(max_new_tokens=N, min_new_tokens=0, temperature=TEMPERATURE,
                                         top_k=0, top_p=1.0))


def rl_config(**overrides) -> ml_collections.ConfigDict:
  """config_base's rl defaults, but K and one epoch of one minibatch."""
  c = config_base.base_config().rl
  c.update({"k": K, "inner_epochs": 1, "num_minibatches": 1, **overrides})
  return c


def make_algo(name, graph=None, **overrides) -> algorithms.Algorithm:
  return algorithms.create(rl_config(algo=name, **overrides), graph, TEMPERATURE)


def optim_config(lr: float, **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**dict(lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-6, grad_clip=1.0,
                                           warmup_steps=0, schedule="constant"), **overrides})


def optimizer(lr: float):
  return train_state.make_optimizer(optim_config(lr), total_steps=100)


def fresh_state(params, tx):
  """A new state on copies of params: the update donates its input state."""
  return train_state.create(jax.tree.map(jnp.copy, params), tx)


# ----------------------------------------------------------------------------- references

def padded_rows(seed, n=4 * K, p=P, r=N):
  """Left-padded queries [n, p] and right-padded responses [n, r] whose PADDING holds random ids
  (EOS among them), so only the masks can tell real tokens from padding. Lengths include the
  extremes (a full query, a one-token query, a full response, a one-token response)."""
  rng = np.random.default_rng(seed)
  q_len = np.concatenate([[p, 1], rng.integers(1, p + 1, n - 2)])
  r_len = np.concatenate([[1, r], rng.integers(1, r + 1, n - 2)])
  query = rng.integers(0, VOCAB, (n, p)).astype(np.int32)
  response = rng.integers(0, VOCAB, (n, r)).astype(np.int32)
  query_mask = (np.arange(p)[None] >= p - q_len[:, None]).astype(np.int32)
  response_mask = (np.arange(r)[None] < r_len[:, None]).astype(np.int32)
  return query, query_mask, response, response_mask


def real(tokens, mask):
  return np.asarray(tokens)[np.asarray(mask) > 0]


def left_aligned(query, query_mask, response, response_mask):
  """Each row's real tokens (query then response) moved to the START of a row of filler
  [N, P + R], with their lengths. Causal attention keeps the filler invisible to them, so
  no padding mask and no position ids are needed: positions are simply 0..L-1."""
  n, width = len(query), query.shape[1] + response.shape[1]
  tokens = np.full((n, width), VOCAB - 1, np.int32)
  q_len, r_len = np.zeros(n, int), np.zeros(n, int)
  for i in range(n):
    row = np.concatenate([real(query[i], query_mask[i]), real(response[i], response_mask[i])])
    tokens[i, :len(row)] = row
    q_len[i], r_len[i] = int(np.sum(query_mask[i])), int(np.sum(response_mask[i]))
  return tokens, q_len, r_len


_JITTED = {}


def jitted(fn, graph):
  """One jit of fn(graph, ...) per graph (a Graph is not hashable, so not a static argument)."""
  key = (fn, id(graph))
  if key not in _JITTED:
    _JITTED[key] = (graph, jax.jit(functools.partial(fn, graph)))
  return _JITTED[key][1]


def _all_token_logprobs(graph, params, tokens, temperature):
  return decoder.token_logprobs(graph, params, tokens, jnp.ones_like(tokens), temperature)


def _all_scalars(graph, params, tokens):
  model, hidden = decoder.forward(graph, params, tokens, jnp.ones_like(tokens))
  return model.scalar(hidden)


def unpadded_logprobs(graph, params, query, query_mask, response, response_mask, temperature=1.0):
  """Row by row on the real tokens only: log p(response_t | real query, response_<t) [N, R]."""
  tokens, q_len, r_len = left_aligned(query, query_mask, response, response_mask)
  lp = np.asarray(jitted(_all_token_logprobs, graph)(params, tokens, temperature))  # t predicts t + 1
  out = np.zeros(np.shape(response), np.float32)
  for i in range(len(tokens)):
    out[i, :r_len[i]] = lp[i, q_len[i] - 1:q_len[i] - 1 + r_len[i]]
  return out


def unpadded_scores(graph, params, query, query_mask, response, response_mask):
  """Scalar head at the last real token of each row, real tokens only: [N]."""
  tokens, q_len, r_len = left_aligned(query, query_mask, response, response_mask)
  scalars = np.asarray(jitted(_all_scalars, graph)(params, tokens))
  return scalars[np.arange(len(tokens)), q_len + r_len - 1]


def first_eos_mask(response, eos_id):
  """Mask recomputed from the sampled tokens: 1 up to and including the first EOS, else all."""
  out = np.zeros(response.shape, np.int32)
  for i, row in enumerate(np.asarray(response)):
    hits = np.flatnonzero(row == eos_id)
    out[i, :hits[0] + 1 if len(hits) else len(row)] = 1
  return out


def word_text(ids):
  return " ".join(synthetic.VOCAB[i] for i in ids)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def trees_differ(a, b) -> bool:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


# ----------------------------------------------------------------------------- fixtures

@functools.lru_cache(maxsize=None)
def tiny(cfg, seed):
  """(graph, params) of a tiny random decoder, created once per (config, seed)."""
  return decoder.create(cfg, seed=seed)


@pytest.fixture(scope="module")
def policy():
  return tiny(ROTARY, 0)


@pytest.fixture(scope="module")
def ref_params():
  return tiny(ROTARY, 1)[1]


@pytest.fixture(scope="module")
def reward_model():
  return tiny(REWARD, 2)


@pytest.fixture(scope="module")
def prompts():
  tokens, mask = sampling.pad_prompts(PROMPTS, P, pad_id=PAD)
  tokens[mask == 0] = EOS  # junk in the padding: the masks, not the ids, say what is real
  return tokens, mask


@pytest.fixture(scope="module")
def rollout_key():
  return jax.random.key(3)


@pytest.fixture(scope="module")
def roller(policy, ref_params, reward_model):
  """pad_id == eos_id on purpose (docs/pitfalls.md, 2): after EOS a response holds more EOS ids, which
  only the mask marks as padding."""
  return rollout.Roller(policy[0], ref_params, rollout.ModelReward(*reward_model), sampler_cfg=SAMPLER,
                        eos_id=EOS, pad_id=EOS)


def variant(roller, **settings):
  """The same Roller (and its compiled functions) with other settings: reward, ref, penalty."""
  other = copy.copy(roller)
  for name, value in settings.items():
    assert hasattr(other, name), name
    setattr(other, name, value)
  return other


@pytest.fixture(scope="module")
def experience(roller, policy, prompts, rollout_key):
  """K=4 samples of 4 prompts at T=0.7, scored by a reward model."""
  return roller(policy[1], *prompts, rollout_key, K)


# ----------------------------------------------------------------------------- sequences

def _logprobs_without_position_ids(graph, params, query, query_mask, response, response_mask):
  """The mistake of docs/pitfalls.md, 3: positions 0..T-1 run over the left padding."""
  tokens = jnp.concatenate([query, response], 1)
  mask = jnp.concatenate([query_mask, response_mask], 1)
  model = decoder.merge(graph, params)
  hidden, _ = model(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), decoder.causal_mask(mask))
  logp = jax.nn.log_softmax(model.logits(hidden[:, query.shape[1] - 1:-1]))
  return jnp.take_along_axis(logp, response[..., None], -1)[..., 0] * response_mask


def test_left_aligned_reference_is_the_unpadded_row():
  """The reference's shortcut (filler after the real tokens, one shape for all rows) gives what
  a forward on the real tokens alone gives."""
  graph, params = tiny(ROTARY, 4)
  rows = padded_rows(seed=5)
  i = 2
  query, response = real(rows[0][i], rows[1][i]), real(rows[2][i], rows[3][i])
  tokens = jnp.asarray(np.concatenate([query, response])[None])
  alone = np.asarray(jitted(_all_token_logprobs, graph)(params, tokens, 0.7))[0, len(query) - 1:]
  reference = unpadded_logprobs(graph, params, *rows, 0.7)[i, :len(response)]
  np.testing.assert_allclose(reference, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [ROTARY, LEARNED], ids=["rotary", "learned"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_equal_unpadded_rows(cfg, temperature):
  """docs/pitfalls.md, 1, 2, 3: left-padded query + right-padded response == each row without padding,
  at logits / T; 0 at padding."""
  graph, params = tiny(cfg, 4)
  rows = padded_rows(seed=5)
  got = np.asarray(jitted(sequences.response_logprobs, graph)(params, *rows, temperature=temperature))
  want = unpadded_logprobs(graph, params, *rows, temperature=temperature)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.all(got[rows[3] == 0] == 0.0)


def prompt_groups(seed):
  """padded_rows whose rows come in groups of K answering one prompt: (query once per group
  [n / K, P], query_mask, response, response_mask) and the same rows with the query repeated."""
  query, query_mask, response, response_mask = padded_rows(seed)
  once = (query[::K], query_mask[::K])
  return (*once, response, response_mask), (*(np.repeat(x, K, 0) for x in once), response, response_mask)


STACKED_GQA = ROTARY.replace(num_layers=2, num_kv_heads=2, scan_layers=True, remat=True)


@pytest.mark.parametrize("cfg", [ROTARY, LEARNED, STACKED_GQA], ids=["rotary", "learned", "scan_gqa_remat"])
def test_prompt_once_equals_unpadded_rows(cfg):
  """A query given once per group (its prompt computed once, decoder.prefixed_forward) gives every
  row's log-probs as a forward on that row's unpadded tokens does, and the same gradient as the
  query repeated on every row (the per-row forward)."""
  graph, params = tiny(cfg, 4)
  once, repeated = prompt_groups(seed=8)
  got = np.asarray(jitted(sequences.response_logprobs, graph)(params, *once, temperature=0.7))
  np.testing.assert_allclose(got, unpadded_logprobs(graph, params, *repeated, temperature=0.7), atol=1e-5, rtol=0)
  assert np.all(got[once[3] == 0] == 0.0)
  loss = lambda p, rows: (sequences.response_logprobs(graph, p, *rows) ** 2).sum()
  grad_once, grad_rows = (jax.jit(jax.grad(loss))(params, rows) for rows in (once, repeated))
  # float32 sums in another order: errors of ~1e-6 of the largest gradient entry (some tensors'
  # true gradient is 0, e.g. a key bias under softmax, and holds only that noise)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grad_rows))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0), grad_once, grad_rows)


def test_prompt_once_scores_and_groups(reward_model):
  """The reward model's score with each prompt computed once is the unpadded row's; a rollout
  batch keeps one query per group, and a group whose rows hold different queries is refused."""
  graph, params = reward_model
  once, repeated = prompt_groups(seed=9)
  got = np.asarray(jitted(sequences.response_scores, graph)(params, *once))
  np.testing.assert_allclose(got, unpadded_scores(graph, params, *repeated), atol=1e-5, rtol=0)
  exp = synthetic_experience(seed=3, rows=8, k=2)
  batch = algorithms.base.group(exp)
  np.testing.assert_array_equal(batch["query"], exp.query[::2])
  assert batch["response"].shape == (4, 2, exp.response.shape[1])
  exp.query[5, 0] += 1  # row 5 of group 2 now answers another prompt
  with pytest.raises(ValueError, match=r"groups \[2\]"):
    algorithms.base.group(exp)


def test_prompt_once_scores_of_empty_responses_are_the_prompts():
  """With each prompt computed once, the reward model reads each response's last real token
  with its last layer run there alone; a response with no real token scores the prompt's last."""
  graph, params = tiny(REWARD.replace(num_layers=2), 5)
  once, repeated = prompt_groups(seed=10)
  response_mask = once[3].copy()
  response_mask[[1, 6]] = 0  # two empty responses, in different groups
  once, repeated = (*once[:3], response_mask), (*repeated[:3], response_mask)
  got = np.asarray(jitted(sequences.response_scores, graph)(params, *once))
  np.testing.assert_allclose(got, unpadded_scores(graph, params, *repeated), atol=1e-5, rtol=0)
  prompt_only = unpadded_scores(graph, params, *repeated[:3], np.zeros_like(response_mask))
  np.testing.assert_allclose(got[[1, 6]], prompt_only[[1, 6]], atol=1e-5, rtol=0)
  assert np.abs(got[[0, 2, 3, 4, 5, 7]][:, None] - prompt_only[[1, 6]][None]).min() > 1e-4


def test_reference_sees_padding_mistakes():
  """The reference above has the power to fail: without position ids (learned positions; rotary
  is shift-invariant, so it cannot show this one) or with attention to the padding, log-probs
  move by far more than the 1e-5 tolerance."""
  rows = padded_rows(seed=5)
  left_padded = rows[1][:, 0] == 0
  graph, params = tiny(LEARNED, 4)
  no_positions = jitted(_logprobs_without_position_ids, graph)(params, *rows)
  assert np.abs(np.asarray(no_positions) - unpadded_logprobs(graph, params, *rows))[left_padded].max() > 1e-2
  graph, params = tiny(ROTARY, 4)
  query, query_mask, response, response_mask = rows
  sees_padding = jitted(sequences.response_logprobs, graph)(params, query, np.ones_like(query_mask), response,
                                                             response_mask, temperature=1.0)
  assert np.abs(np.asarray(sees_padding) - unpadded_logprobs(graph, params, *rows))[left_padded].max() > 1e-2


def _logp_and_logits(graph, params, query, query_mask, response, response_mask, temperature):
  logp, model, hidden = sequences.response_logprobs_and_hidden(
      graph, params, query, query_mask, response, response_mask, temperature)
  return logp, model.logits(hidden)


def test_temperature_scales_logits():
  """docs/pitfalls.md, 1: log-probs at T are log_softmax(logits / T) (NumPy), not the T=1 ones."""
  graph, params = tiny(ROTARY, 4)
  rows = padded_rows(seed=6)
  logp, logits = jitted(_logp_and_logits, graph)(params, *rows, 0.5)
  logits = np.asarray(logits, np.float64) / 0.5
  peak = logits.max(-1)
  lse = np.log(np.exp(logits - peak[..., None]).sum(-1)) + peak
  want = (np.take_along_axis(logits, rows[2][..., None], -1)[..., 0] - lse) * rows[3]
  np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5, rtol=0)
  at_one = np.asarray(jitted(sequences.response_logprobs, graph)(params, *rows, temperature=1.0))
  assert np.abs(at_one - np.asarray(logp)).max() > 1e-2


def test_response_scores_read_last_real_token(reward_model):
  """docs/pitfalls.md, 2, 3: the reward is the scalar at the last real response token of the unpadded row."""
  graph, params = reward_model
  rows = padded_rows(seed=7)
  got = np.asarray(jitted(sequences.response_scores, graph)(params, *rows))
  want = unpadded_scores(graph, params, *rows)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want[1:] - want[:-1]).min() > 1e-4  # distinct scores: reading the wrong token cannot pass


# ----------------------------------------------------------------------------- reward statistics

def test_running_moments_match_numpy():
  """docs/pitfalls.md, 10: mean / std (ddof=1) of everything seen, over updates of different sizes,
  and a restored RunningMoments continues exactly."""
  rng = np.random.default_rng(8)
  batches = [rng.normal(3.0, 2.0, n) for n in (5, 1, 0, 17, 2)]
  moments, seen = rollout.RunningMoments(), []
  for batch in batches:
    moments.update(batch)
    seen.extend(batch)
    if len(seen) > 1:
      np.testing.assert_allclose(moments.mean, np.mean(seen), rtol=1e-12)
      np.testing.assert_allclose(moments.std, np.std(seen, ddof=1), rtol=1e-12)
  restored = rollout.RunningMoments(**moments.state())
  extra = rng.normal(0.0, 1.0, 9)
  moments.update(extra)
  restored.update(extra)
  assert restored.state() == moments.state()


def test_process_scores_clip_then_scale_without_mean_shift():
  """docs/pitfalls.md, 7: clip to +-clip, then divide by the running std of all clipped scores so far
  (ddof=1); no mean is subtracted."""
  rng = np.random.default_rng(9)
  moments, seen = rollout.RunningMoments(), []
  for n in (6, 3, 11):
    scores = rng.normal(1.5, 3.0, n).astype(np.float32)
    got = rollout.process_scores(scores, clip=2.5, moments=moments)
    clipped = np.clip(scores.astype(np.float64), -2.5, 2.5)
    seen.extend(clipped)
    np.testing.assert_allclose(got, clipped / np.std(seen, ddof=1), rtol=1e-6)
  scores = rng.normal(0.0, 5.0, 8).astype(np.float32)
  np.testing.assert_array_equal(rollout.process_scores(scores, clip=None, moments=None), scores)


@pytest.mark.parametrize("scores", [[3.0, 3.0, 3.0], [4.0]], ids=["equal", "single"])
def test_process_scores_zero_std_is_finite(scores):
  """docs/pitfalls.md, 7: a zero running std leaves the (clipped) scores unscaled, never inf / NaN."""
  got = rollout.process_scores(np.asarray(scores, np.float32), clip=3.5, moments=rollout.RunningMoments())
  np.testing.assert_array_equal(got, np.minimum(np.asarray(scores, np.float32), 3.5))


# ----------------------------------------------------------------------------- rollout

def test_experience_shapes_and_masks(experience, prompts):
  """docs/pitfalls.md, 2: the response mask runs up to and including the first EOS (pad == EOS here),
  has_eos agrees with it, and the prompts are repeated prompt-major."""
  exp = experience
  rows = len(PROMPTS) * K
  assert exp.k == K
  for name, shape in (("query", (rows, P)), ("query_mask", (rows, P)), ("response", (rows, N)),
                      ("response_mask", (rows, N)), ("logp_old", (rows, N)), ("logp_ref", (rows, N)),
                      ("scores", (rows,)), ("has_eos", (rows,))):
    assert np.shape(getattr(exp, name)) == shape, name
  np.testing.assert_array_equal(exp.query, np.repeat(prompts[0], K, 0))
  np.testing.assert_array_equal(exp.query_mask, np.repeat(prompts[1], K, 0))
  np.testing.assert_array_equal(exp.response_mask, first_eos_mask(exp.response, EOS))
  lengths = exp.response_mask.sum(-1)
  ends_in_eos = exp.response[np.arange(rows), lengths - 1] == EOS
  np.testing.assert_array_equal(exp.has_eos, ends_in_eos)
  assert 0 < exp.has_eos.sum() < rows, "the fixture should sample rows with and without EOS"
  assert exp.num_response_tokens == lengths.sum()


def test_logp_old_is_teacher_forced(experience, policy, ref_params, prompts, rollout_key):
  """docs/pitfalls.md, 1: old and reference log-probs are the unpadded teacher-forced ones at logits / T,
  and the sampler's own log-probs agree with them; 0 at padding."""
  graph, params = policy
  exp = experience
  rows = (exp.query, exp.query_mask, exp.response, exp.response_mask)
  np.testing.assert_allclose(exp.logp_old, unpadded_logprobs(graph, params, *rows, TEMPERATURE), atol=1e-5, rtol=0)
  np.testing.assert_allclose(exp.logp_ref, unpadded_logprobs(graph, ref_params, *rows, TEMPERATURE), atol=1e-5,
                             rtol=0)
  out = sampling.generate(graph, params, *prompts, rollout_key, max_new_tokens=N, num_samples=K,
                          temperature=TEMPERATURE, eos_id=EOS, pad_id=EOS)
  np.testing.assert_array_equal(np.asarray(out.tokens), exp.response)
  np.testing.assert_allclose(np.asarray(out.logprobs), exp.logp_old, atol=1e-5, rtol=0)
  padding = exp.response_mask == 0
  assert np.all(exp.logp_old[padding] == 0) and np.all(exp.logp_ref[padding] == 0)


def test_model_reward_scores(experience, reward_model):
  """ModelReward scores each sampled row at its last real token (docs/pitfalls.md, 2)."""
  rows = (experience.query, experience.query_mask, experience.response, experience.response_mask)
  np.testing.assert_allclose(experience.scores, unpadded_scores(*reward_model, *rows), atol=1e-5, rtol=0)


def test_seq_kl(experience, roller, policy, prompts, rollout_key):
  """docs/pitfalls.md, 4: seq_kl = sum over real tokens of logp_old - logp_ref (k1, may be negative);
  exactly 0 when the reference is the policy."""
  exp = experience
  want = [sum(exp.logp_old[i, t] - exp.logp_ref[i, t] for t in range(N) if exp.response_mask[i, t])
          for i in range(len(exp.scores))]
  np.testing.assert_allclose(exp.seq_kl, want, atol=1e-5, rtol=0)
  assert np.abs(exp.seq_kl).max() > 1e-2

  graph, params = policy
  same = variant(roller, ref_params=params)
  np.testing.assert_array_equal(same(params, *prompts, rollout_key, K).seq_kl, 0.0)


def test_text_reward_sees_decoded_rows(roller, policy, prompts, rollout_key):
  """TextReward gets the real prompt words and the response words without the final EOS."""
  seen = {}

  def fn(prompt_texts, response_texts):
    seen.update(prompts=prompt_texts, responses=response_texts)
    return np.arange(len(response_texts), dtype=np.float32)

  text_roller = variant(roller, reward=rollout.TextReward(fn, synthetic.build_tokenizer()))
  exp = text_roller(policy[1], *prompts, rollout_key, K)
  np.testing.assert_array_equal(exp.scores, np.arange(len(exp.scores)))
  for i in range(len(exp.scores)):
    ids = real(exp.response[i], exp.response_mask[i])
    ids = ids[:-1] if exp.has_eos[i] else ids
    assert seen["responses"][i] == word_text(ids)
    special = set(synthetic.SPECIAL_TOKENS)
    assert seen["prompts"][i] == " ".join(
        w for w in word_text(real(exp.query[i], exp.query_mask[i])).split() if w not in special)


def test_text_reward_gets_each_rows_dataset_columns(roller, policy, prompts, rollout_key):
  """A reward function gets the prompts' other dataset columns as keyword arguments, each of a
  prompt's K rows its prompt's value, chunked rollouts and reference rewards included; a function
  of the texts alone is called without them, one naming a column gets only that one."""
  answers = [f"answer {b}" for b in range(4)]
  columns = {"answer": answers, "ids": list(range(4)), "unused": [[b] for b in range(4)]}
  seen = []

  def verifier(prompt_texts, response_texts, answer, **others):
    seen.append(others)
    return [float(answers.index(a)) for a in answer]

  text = rollout.TextReward(verifier, synthetic.build_tokenizer())
  want = np.repeat(np.arange(4, dtype=np.float32), K)  # rows are prompt-major
  for chunk in (None, 2):
    exp = variant(roller, reward=text)(policy[1], *prompts, rollout_key, K, columns=columns, chunk=chunk)
    np.testing.assert_array_equal(exp.scores, want)
  assert seen[0]["ids"] == list(np.repeat(np.arange(4), K)) and seen[0]["unused"][:K + 1] == [[0]] * K + [[1]]
  rows = (exp.query, exp.query_mask, exp.response, exp.response_mask)
  row_columns = {name: [v for v in values for _ in range(K)] for name, values in columns.items()}
  np.testing.assert_array_equal(rollout.reference_rewards(text, *rows, chunk=3, columns=row_columns), want)
  texts_alone = rollout.TextReward(lambda p, r: [1.0] * len(r), synthetic.build_tokenizer())
  np.testing.assert_array_equal(variant(roller, reward=texts_alone)(
      policy[1], *prompts, rollout_key, K, columns=columns).scores, 1.0)
  named = rollout.TextReward(lambda p, r, ids: [float(i) for i in ids], synthetic.build_tokenizer())
  np.testing.assert_array_equal(variant(roller, reward=named)(
      policy[1], *prompts, rollout_key, K, columns=columns).scores, want)
  assert text.reads_columns and named.reads_columns and not texts_alone.reads_columns  # the pipeline gathers none for it
  with pytest.raises(ValueError, match="column 'answer' has 3 values for 8 rows"):
    text(*(r[:8] for r in rows), columns={"answer": answers[:3]})


def test_missing_eos_penalty_checks_completion_only(experience, roller, policy, prompts, rollout_key):
  """docs/pitfalls.md, 6: the penalty is subtracted from responses without EOS only, whatever the
  prompt holds (two prompts contain EOS as a real token)."""
  assert any(EOS in p for p in PROMPTS)
  exp = variant(roller, missing_eos_penalty=2.5)(policy[1], *prompts, rollout_key, K)
  np.testing.assert_array_equal(exp.response, experience.response)
  no_eos = np.array([EOS not in real(r, m) for r, m in zip(exp.response, exp.response_mask)])
  prompt_has_eos = np.array([EOS in real(q, m) for q, m in zip(exp.query, exp.query_mask)])
  assert (no_eos & prompt_has_eos).any() and not no_eos.all(), "the fixture should cover these cases"
  np.testing.assert_allclose(exp.scores, experience.scores - 2.5 * no_eos, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(exp.scores[~no_eos], experience.scores[~no_eos])


def test_a_response_ended_by_a_stop_sequence_is_finished(experience, roller, policy, prompts, rollout_key):
  """sampler.stop: a row stops after a stop sequence as after EOS, and counts as finished, so the
  missing-EOS penalty spares it; rows that reach neither are penalised as before."""
  lengths = experience.response_mask.sum(-1)
  row = int(np.argmax(lengths))
  stop = (tuple(int(t) for t in experience.response[row, 1:3]),)
  stopped = variant(roller, stop=stop)(policy[1], *prompts, rollout_key, K)
  assert stopped.response_mask.sum() < experience.response_mask.sum()
  ends_with_stop = np.array([len(real(r, m)) >= 2 and tuple(real(r, m)[-2:]) == stop[0]
                             for r, m in zip(stopped.response, stopped.response_mask)])
  ends_in_eos = np.array([EOS in real(r, m) for r, m in zip(stopped.response, stopped.response_mask)])
  assert ends_with_stop[row] and (ends_with_stop & ~ends_in_eos).any()
  np.testing.assert_array_equal(stopped.has_eos, ends_in_eos | ends_with_stop)
  penalised = variant(roller, stop=stop, missing_eos_penalty=2.5)(policy[1], *prompts, rollout_key, K)
  np.testing.assert_allclose(penalised.scores, stopped.scores - 2.5 * ~(ends_in_eos | ends_with_stop), atol=1e-6, rtol=0)


def test_greedy_rollouts_are_the_argmax_responses_whatever_the_key(roller, policy, prompts, rollout_key):
  """eval.greedy: the held-out evaluation's greedy rows are the sampler's argmax decoding (the
  same for any key), scored by the same reward."""
  exp = roller(policy[1], *prompts, rollout_key, 1, greedy=True, old_pass=False)
  again = roller(policy[1], *prompts, jax.random.key(99), 1, greedy=True, old_pass=False)
  np.testing.assert_array_equal(exp.response, again.response)
  np.testing.assert_array_equal(exp.scores, again.scores)
  argmax = sampling.generate(policy[0], policy[1], *prompts, jax.random.key(5), max_new_tokens=N, greedy=True,
                             eos_id=EOS, pad_id=EOS)
  np.testing.assert_array_equal(exp.response * exp.response_mask, np.asarray(argmax.tokens) * np.asarray(argmax.mask))
  sampled = roller(policy[1], *prompts, rollout_key, 1)
  assert not np.array_equal(sampled.response, exp.response)


def test_per_prompt_baseline_is_subtracted_from_each_of_its_rows(experience, roller, policy, prompts,
                                                                rollout_key):
  """rl.reward_baseline: prompt b's baseline comes off all K of its rows (prompt-major), and
  the reference rewards are the reward source's own scores of the given rows."""
  baseline = np.array([0.5, -2.0, 3.25, 7.0], np.float32)
  exp = roller(policy[1], *prompts, rollout_key, K, baseline=baseline)
  np.testing.assert_array_equal(exp.response, experience.response)
  np.testing.assert_allclose(exp.scores, experience.scores - np.repeat(baseline, K), atol=1e-6, rtol=0)
  rows = (experience.query, experience.query_mask, experience.response, experience.response_mask)
  chunked = rollout.reference_rewards(roller.reward, *rows, chunk=3)  # uneven chunks
  np.testing.assert_allclose(chunked, experience.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_reward_names_rows(roller, policy, prompts, rollout_key, bad):
  """docs/pitfalls.md, 7: a NaN / inf score is an error naming the rows, not a silent NaN update."""
  def fn(prompt_texts, response_texts):
    scores = np.zeros(len(response_texts), np.float32)
    scores[[2, 9]] = bad
    return scores

  bad_roller = variant(roller, reward=rollout.TextReward(fn, synthetic.build_tokenizer()))
  with pytest.raises(FloatingPointError, match=r"rows \[2, 9\]"):
    bad_roller(policy[1], *prompts, rollout_key, K)


@pytest.mark.parametrize("shape", [(), (4 * K, 1), (4,)], ids=["scalar", "column", "per-prompt"])
def test_reward_of_wrong_shape_is_an_error(roller, policy, prompts, rollout_key, shape):
  """One score per response row: a scalar or [N, 1] would otherwise broadcast against the
  missing-EOS penalty into constant or [N, N] rewards without a word."""
  bad_roller = variant(roller, reward=lambda *rows: np.zeros(shape, np.float32), missing_eos_penalty=1.0)
  with pytest.raises(ValueError, match=rf"shape {re.escape(str(shape))}; expected \({4 * K},\)"):
    bad_roller(policy[1], *prompts, rollout_key, K)


def test_decode_rows():
  """docs/pitfalls.md, 2: only masked-in tokens are decoded; the response's final EOS is dropped, a
  stray special token mid-response is kept, a truncated response keeps its last token."""
  tok = synthetic.build_tokenizer()
  ids = {w: i for i, w in enumerate(synthetic.VOCAB)}
  d = lambda *words: [ids[w] for w in words]
  query = np.array([d("3", "3", "sort", "3", "1", "="), d("<eos>", "reverse", "4", "<pad>", "2", "=")])
  query_mask = np.array([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
  response = np.array([d("1", "3", "<eos>", "7", "7"), d("2", "<pad>", "4", "9", "9")])
  response_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  prompts, responses = rollout.decode_rows(tok, query, query_mask, response, response_mask)
  assert prompts == ["sort 3 1 =", "reverse 4 2 ="]  # special tokens in a prompt are dropped
  assert responses == ["1 3", "2 <pad> 4 9"]


# ----------------------------------------------------------------------------- algorithms: host side

def synthetic_experience(seed, rows=6, k=2, r=5, values=True):
  """An Experience with random log-probs and values, junk in their padding."""
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([[1, r], rng.integers(1, r + 1, rows - 2)])
  mask = (np.arange(r)[None] < lengths[:, None]).astype(np.int32)
  return rollout.Experience(
      query=np.repeat(rng.integers(0, VOCAB, (rows // k, 3)), k, 0).astype(np.int32),
      query_mask=np.ones((rows, 3), np.int32),
      response=rng.integers(0, VOCAB, (rows, r)).astype(np.int32), response_mask=mask,
      logp_old=rng.normal(-2.0, 1.0, (rows, r)).astype(np.float32),
      logp_ref=rng.normal(-2.0, 1.0, (rows, r)).astype(np.float32),
      scores=rng.normal(0.0, 1.0, rows).astype(np.float32), has_eos=np.ones(rows, bool), k=k,
      values=rng.normal(0.0, 1.0, (rows, r)).astype(np.float32) if values else None)


def numpy_ppo_targets(exp, scores, kl_coef, gamma, lam):
  """Per-row loops: rewards, GAE advantages and returns over the real tokens; 0 at padding."""
  rewards, adv, ret = (np.zeros(exp.logp_old.shape) for _ in range(3))
  for i in range(len(scores)):
    n = int(exp.response_mask[i].sum())
    for t in range(n):
      rewards[i, t] = -kl_coef * (float(exp.logp_old[i, t]) - float(exp.logp_ref[i, t]))
    rewards[i, n - 1] += scores[i]
    running = 0.0
    for t in reversed(range(n)):
      next_value = float(exp.values[i, t + 1]) if t + 1 < n else 0.0
      delta = rewards[i, t] + gamma * next_value - float(exp.values[i, t])
      running = delta + gamma * lam * running
      adv[i, t] = running
      ret[i, t] = running + float(exp.values[i, t])
  return rewards, adv, ret


@pytest.mark.parametrize("whiten", [False, True])
def test_ppo_prepare_matches_numpy(whiten):
  """docs/pitfalls.md, 2, 4: per-token reward -kl_coef * (logp_old - logp_ref) on real tokens plus the
  score at the LAST real token; GAE over real tokens only; padding gets nothing."""
  exp = synthetic_experience(seed=10)
  kl_coef, gamma, lam = 0.3, 0.9, 0.8
  algo = make_algo("ppo", gamma=gamma, lam=lam, whiten_advantages=whiten)
  batch, _ = algo.prepare(exp, exp.scores, kl_coef)
  rows, r = exp.response.shape
  flat = {name: np.asarray(v) for name, v in algorithms.base.rows(batch).items()}
  rewards, raw_adv, ret = numpy_ppo_targets(exp, exp.scores, kl_coef, gamma, lam)
  mask = exp.response_mask > 0
  adv = raw_adv
  if whiten:
    mean, var = adv[mask].mean(), adv[mask].var()
    adv = np.where(mask, (adv - mean) / np.sqrt(var + 1e-8), 0.0)
  np.testing.assert_allclose(flat["advantages"], adv, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(flat["returns"], ret, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(flat["values"], np.where(mask, exp.values, 0.0), atol=0, rtol=0)
  for name in ("advantages", "returns", "values"):
    assert np.all(flat[name][~mask] == 0), name
  # The same rewards through losses.gae (the trainer's estimator) give the same targets.
  gae_adv, gae_ret = losses.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(exp.values), jnp.asarray(mask),
                                gamma, lam)
  np.testing.assert_allclose(gae_adv, raw_adv, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gae_ret, ret, atol=1e-5, rtol=1e-5)
  assert batch["advantages"].shape == (rows // exp.k, exp.k, r)
  np.testing.assert_array_equal(np.asarray(batch["response"]).reshape(rows, r), exp.response)


def test_adaptive_kl_follows_ziegler():
  """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon); no target: fixed."""
  kl = make_algo("ppo", kl_init=0.05, kl_target=6.0, kl_horizon=10000, adaptive_kl=True).kl_controller()
  value = 0.05
  for current, n in ((6.0, 256), (9.0, 128), (100.0, 512), (0.0, 64), (4.5, 1000)):
    kl.update(current, n)
    value *= 1.0 + min(max(current / 6.0 - 1.0, -0.2), 0.2) * n / 10000
    np.testing.assert_allclose(kl.value, value, rtol=1e-12)
  fixed = make_algo("ppo", kl_init=0.05, adaptive_kl=False).kl_controller()
  for current in (0.0, 50.0):
    fixed.update(current, 512)
  assert fixed.value == 0.05


def test_online_dpo_prepare():
  """The higher score is chosen; K != 2 is an error."""
  exp = synthetic_experience(seed=11, rows=8, values=False)
  batch, _ = make_algo("online_dpo").prepare(exp, exp.scores, 0.05)
  pairs = exp.scores.reshape(-1, 2)
  np.testing.assert_array_equal(batch["chosen"], [1 if b > a else 0 for a, b in pairs])
  assert set(np.asarray(batch["chosen"]).tolist()) == {0, 1}, "the seed should give both outcomes"
  np.testing.assert_array_equal(np.asarray(batch["logp_ref"]).reshape(exp.logp_ref.shape), exp.logp_ref)
  with pytest.raises(ValueError, match="k=3"):
    make_algo("online_dpo").prepare(synthetic_experience(seed=12, rows=9, k=3), np.zeros(9), 0.05)


# ----------------------------------------------------------------------------- algorithms: the update

@pytest.fixture(scope="module")
def p3o_update(policy):
  """make_update for P3O, compiled once per (epochs, minibatches, lr)."""
  cache = {}

  def get(epochs, minibatches, lr):
    if (epochs, minibatches, lr) not in cache:
      tx = optimizer(lr)
      update = make_update(make_algo("p3o", policy[0]).loss, tx, epochs=epochs, num_minibatches=minibatches)
      cache[epochs, minibatches, lr] = update, tx
    return cache[epochs, minibatches, lr]

  return get


def test_first_p3o_step_ratio_is_one(experience, policy, p3o_update):
  """docs/pitfalls.md, 1: on the first step of an update the importance ratio is 1 (the rollout and the
  loss use the same logits / T), and the step moves the parameters."""
  update, tx = p3o_update(1, 1, 1e-2)
  batch = make_algo("p3o").prepare(experience, experience.scores, 0.05)[0]
  state, metrics = update(fresh_state(policy[1], tx), batch, jax.random.key(0))
  assert metrics["val/ratio"].shape == (1, 1)
  assert abs(float(metrics["val/ratio"][0, 0]) - 1.0) <= 1e-6
  assert float(metrics["policy/approxkl_avg"][0, 0]) <= 1e-10  # every response's ratio, not only the mean
  assert int(state.step) == 1
  assert trees_differ(state.params, policy[1])


def test_skipping_the_old_pass_gives_the_same_update(experience, roller, policy, prompts, rollout_key, p3o_update):
  """One epoch of one minibatch (`skips_old_pass`): the rollout leaves out the old policy's pass
  and the loss takes the update's own log-probs, detached, as pi_old's. The update is the one
  with the pass (same samples, same key), its first ratio exactly 1; the statistics read the
  sampler's log-probs, which agree with the trainer's old ones."""
  algo = make_algo("p3o")
  assert algo.skips_old_pass(rl_config()) and not algo.skips_old_pass(rl_config(inner_epochs=2))
  assert not algo.skips_old_pass(rl_config(num_minibatches=2)) and not algo.skips_old_pass(rl_config(rollout_is="tis"))
  assert not make_algo("ppo").skips_old_pass(rl_config()) and not make_algo("reinforce_pp").skips_old_pass(rl_config())
  assert make_algo("grpo").skips_old_pass(rl_config()) and make_algo("online_dpo").skips_old_pass(rl_config())
  skipped = roller(policy[1], *prompts, rollout_key, K, old_pass=False)
  assert skipped.logp_old is None
  np.testing.assert_array_equal(skipped.response, experience.response)
  np.testing.assert_allclose(skipped.seq_kl, experience.seq_kl, atol=1e-4)
  update, tx = p3o_update(1, 1, 1e-2)
  with_pass, _ = algo.prepare(experience, experience.scores, 0.05)
  without, _ = algo.prepare(skipped, skipped.scores, 0.05)
  assert "logp_old" in with_pass and "logp_old" not in without
  state_with, metrics_with = update(fresh_state(policy[1], tx), with_pass, jax.random.key(0))
  state_without, metrics_without = update(fresh_state(policy[1], tx), without, jax.random.key(0))
  assert float(metrics_without["val/ratio"][0, 0]) == 1.0
  # Float32 rounding of two programs, through Adam at lr 1e-2: 5e-6 is 5e-4 of one step.
  chex.assert_trees_all_close(state_without.params, state_with.params, atol=5e-6, rtol=1e-5)
  np.testing.assert_allclose(metrics_without["loss/total"], metrics_with["loss/total"], rtol=1e-5, atol=1e-7)
  assert trees_differ(state_without.params, policy[1])
  bf16_sampler = rollout.Roller(policy[0], roller.ref_params, roller.reward, sampler_cfg=SAMPLER, eos_id=EOS,
                                pad_id=EOS, sampler_dtype="bfloat16")
  assert bf16_sampler(policy[1], *prompts, rollout_key, K, old_pass=False).logp_old is not None  # kept


def test_a_sweep_over_numeric_hyperparameters_compiles_the_update_once(experience, policy):
  """rl.beta, rl.eps, rl.c and optim.lr are inputs of the update (`hyper`), not constants compiled
  into it: runs that differ only in them share one program, and each value gives bitwise what an
  update compiled with it as a constant gives (P3O's here; XLA may fuse another algorithm's
  program differently, docs/speed.md). A string (rl.variant) still chooses the program."""
  optim = optim_config(1e-2, warmup_steps=1, schedule="cosine")
  make_tx = lambda lr: train_state.make_optimizer(optim, 6, lr)
  batch = make_algo("p3o").prepare(experience, experience.scores, 0.05)[0]
  swept, _ = for_run(make_algo("p3o", policy[0]), optim, 6, epochs=2, num_minibatches=2)  # as rl/loop.py builds it
  results = []
  for lr, overrides in ((1e-2, {}), (3e-3, dict(beta=0.3, eps=0.05, c=2.0))):
    algo = make_algo("p3o", policy[0], **overrides)
    state, metrics = swept(fresh_state(policy[1], make_tx(lr)), batch, jax.random.key(0), {"loss": algo.hp, "lr": lr})
    constant = make_update(algo.loss, make_tx(lr), epochs=2, num_minibatches=2)
    expected, expected_metrics = constant(fresh_state(policy[1], make_tx(lr)), batch, jax.random.key(0))
    chex.assert_trees_all_equal(state.params, expected.params)
    chex.assert_trees_all_equal(metrics, expected_metrics)
    results.append(state.params)
  assert swept._cache_size() == 1
  assert trees_differ(*results)
  v1 = make_algo("p3o", policy[0], variant="v1")
  swept(fresh_state(policy[1], make_tx(1e-2)), batch, jax.random.key(0), {"loss": v1.hp, "lr": 1e-2})
  assert swept._cache_size() == 2


def test_zero_lr_changes_nothing_and_metric_shapes(experience, policy, p3o_update):
  """lr = 0 leaves the params bitwise unchanged over 2 epochs x 2 minibatches; every metric
  comes back [epochs, minibatches], with ratio 1 at every step (the policy never moves)."""
  update, tx = p3o_update(2, 2, 0.0)
  batch = make_algo("p3o").prepare(experience, experience.scores, 0.05)[0]
  state, metrics = update(fresh_state(policy[1], tx), batch, jax.random.key(0))
  assert_trees_equal(state.params, policy[1])
  assert int(state.step) == 4
  assert {"val/ratio", "loss/total", "optim/grad_norm", "p3o/delta_abs"} <= set(metrics)
  for name, value in metrics.items():
    assert value.shape == (2, 2), name
  np.testing.assert_allclose(metrics["val/ratio"], 1.0, atol=1e-6)
  assert np.all(np.asarray(metrics["optim/grad_norm"]) > 0)


def test_p3o_update_is_invariant_to_per_prompt_reward_shifts(experience, policy, p3o_update):
  """docs/pitfalls.md, 7 / P3O: a constant added to the K rewards of each prompt leaves two successive
  updates (the second off-policy, so ratios and clipping are live; Adam; grad clipping)
  bitwise unchanged; a rescale of the rewards does not.

  Rewards are multiples of 1/4 and the shifts small dyadic numbers, so r + shift is exact in
  float32 and the pairwise differences the loss sees are bitwise the same.
  """
  update, tx = p3o_update(1, 1, 1e-2)
  rng = np.random.default_rng(13)
  rewards = (rng.integers(-8, 9, len(experience.scores)) / 4).astype(np.float32)
  shift = np.repeat(np.array([3.0, -5.0, 0.5, 64.0], np.float32), K)
  assert np.array_equal((rewards + shift) - shift, rewards)

  def two_updates(r):
    batch, _ = make_algo("p3o").prepare(experience, r, 0.05)
    state, first = update(fresh_state(policy[1], tx), batch, jax.random.key(1))
    state, second = update(state, batch, jax.random.key(2))
    return state, first, second

  base, _, base_second = two_updates(rewards)
  shifted, _, shifted_second = two_updates(rewards + shift)
  assert abs(float(base_second["val/ratio"][0, 0]) - 1.0) > 1e-4  # the second update is off-policy
  assert_trees_equal(shifted.params, base.params)
  assert_trees_equal(shifted.opt_state, base.opt_state)
  np.testing.assert_array_equal(shifted_second["loss/total"], base_second["loss/total"])
  scaled, _, _ = two_updates(3.0 * rewards)
  assert trees_differ(scaled.params, base.params)


def test_ppo_loss_at_rollout_params(experience, policy):
  """docs/pitfalls.md, 1 for PPO: at the rollout params the loss sees ratio 1, and its critic head
  reproduces the rollout values (so the value clip starts centred)."""
  graph, params = policy
  rng = np.random.default_rng(14)
  critic = {"kernel": jnp.asarray(rng.normal(0, 0.5, (ROTARY.hidden_size, 1)), jnp.float32),
            "bias": jnp.asarray([0.3], jnp.float32)}
  both = {"policy": params, "critic": critic}
  exp = experience
  algo = make_algo("ppo", graph)
  values = np.asarray(jax.jit(algo.value_fn())(both, exp.query, exp.query_mask, exp.response, exp.response_mask))
  assert np.abs(values * exp.response_mask).max() > 1e-2
  batch, _ = algo.prepare(dataclasses.replace(exp, values=values), exp.scores, 0.05)
  _, metrics = jax.jit(algo.loss)(both, batch)
  assert abs(float(metrics["val/ratio"]) - 1.0) <= 1e-6
  mask = exp.response_mask > 0
  returns = np.asarray(batch["returns"]).reshape(mask.shape)
  want_value_loss = 0.5 * np.mean((values[mask] - returns[mask]) ** 2)
  np.testing.assert_allclose(float(metrics["loss/value_avg"]), want_value_loss, rtol=1e-5)
  assert float(metrics["val/clipfrac_avg"]) == 0.0


def test_bf16_sampler_weights_give_importance_weights_away_from_one(roller, policy, prompts, rollout_key):
  """sampler.param_dtype='bfloat16' samples with the weights rounded to bf16 while the trainer's
  old log-probs use them as stored: the sampler's own log-probs are kept, they differ from the
  trainer's, and 'tis' puts the truncated ratio into the batch (docs/algorithms.md, Rollout
  importance correction)."""
  bf16 = rollout.Roller(policy[0], roller.ref_params, roller.reward, sampler_cfg=SAMPLER, eos_id=EOS, pad_id=EOS,
                        sampler_dtype="bfloat16")
  exp = bf16(policy[1], *prompts, rollout_key, K)
  mask = exp.response_mask > 0
  gap = np.abs(exp.logp_sampler - exp.logp_old)[mask]
  assert gap.max() > 1e-3, "bf16 weights should move the sampler's log-probs"
  assert gap.max() < 0.5
  fp32 = roller(policy[1], *prompts, rollout_key, K)
  np.testing.assert_allclose(fp32.logp_sampler[fp32.response_mask > 0], fp32.logp_old[fp32.response_mask > 0],
                             atol=1e-4)
  batch, metrics = make_algo("p3o", rollout_is="tis", rollout_is_cap=2.0).prepare(exp, exp.scores, 0.05)
  seq_ratio = np.exp(((exp.logp_old - exp.logp_sampler) * mask).sum(-1))
  np.testing.assert_allclose(np.asarray(batch["sample_weight"]).reshape(-1), np.minimum(seq_ratio, 2.0), rtol=1e-5)
  assert abs(metrics["rollout_is/weight_mean"] - 1.0) > 1e-4


def test_chunked_rollout_equals_the_whole_rollout(roller, policy, prompts, rollout_key):
  """rl.rollout_chunk: prompts sampled, teacher-forced and scored two at a time give the same
  tokens with the same key (each row draws the randomness it has in the whole rollout), the
  same masks, and the same log-probs and scores up to float rounding."""
  whole = roller(policy[1], *prompts, rollout_key, K)
  chunked = roller(policy[1], *prompts, rollout_key, K, chunk=2)
  np.testing.assert_array_equal(chunked.response, whole.response)
  np.testing.assert_array_equal(chunked.response_mask, whole.response_mask)
  np.testing.assert_array_equal(chunked.query, whole.query)
  for name in ("logp_old", "logp_ref", "logp_sampler", "scores"):
    np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="rl.rollout_chunk=3 must divide the 4 prompts"):
    roller(policy[1], *prompts, rollout_key, K, chunk=3)


def test_sampling_on_devices_of_its_own_changes_nothing(roller, policy, prompts, rollout_key):
  """sampler.cpu_devices: the sampler decodes on a 2-device data mesh of its own while the passes
  stay on the trainer's one device; the rollout is the one-device rollout (tokens exactly, float
  outputs up to rounding), and its arrays come back as the trainer's rows."""
  apart = rollout.Roller(policy[0], roller.ref_params, roller.reward, sampler_cfg=SAMPLER, eos_id=EOS, pad_id=EOS,
                         sample_devices=jax.devices()[:2])
  assert apart.sample_mesh.size == 2 and apart.mesh.size == 1
  whole, split = roller(policy[1], *prompts, rollout_key, K), apart(policy[1], *prompts, rollout_key, K)
  np.testing.assert_array_equal(split.response, whole.response)
  np.testing.assert_array_equal(split.response_mask, whole.response_mask)
  for name in ("logp_old", "logp_ref", "logp_sampler", "scores"):
    np.testing.assert_allclose(getattr(split, name), getattr(whole, name), rtol=1e-5, atol=1e-5, err_msg=name)


def test_bf16_frozen_reference_log_probs_stay_within_tolerance(roller, policy, prompts, rollout_key):
  """model.frozen_dtype='bfloat16' stores the reference's weights in bf16 (activations stay
  fp32): its per-token log-probs stay within 0.05 nats of the fp32 reference's, and the
  sequence KL within 0.1 nats (the tolerance README states)."""
  from p3o_jax.models.policy import frozen_copy
  exp32 = variant(roller, ref_params=policy[1])(policy[1], *prompts, rollout_key, K)
  exp16 = variant(roller, ref_params=frozen_copy(policy[1], "bfloat16"))(policy[1], *prompts, rollout_key, K)
  mask = exp32.response_mask > 0
  np.testing.assert_array_equal(exp16.response, exp32.response)
  gap = np.abs(exp16.logp_ref - exp32.logp_ref)[mask]
  assert 1e-5 < gap.max() < 0.05, gap.max()
  assert np.abs(exp16.seq_kl - exp32.seq_kl).max() < 0.1
  np.testing.assert_allclose(exp32.seq_kl, 0.0, atol=1e-5)  # fp32 reference = policy: KL 0


def test_bf16_first_moment_trains_like_fp32():
  """optim.mu_dtype='bfloat16' stores Adam's first moment in bf16: on a small regression both
  remove over 99.8% of the initial loss in 60 steps and end within 0.1% of the initial loss of
  each other; the moment really is bf16."""
  import ml_collections
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=(16, 1)), jnp.float32)
  loss = lambda w: jnp.mean((x @ w - y) ** 2)
  finals = {}
  for dtype in ("float32", "bfloat16"):
    optim = ml_collections.ConfigDict(dict(lr=0.05, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=0.0,
                                           warmup_steps=0, schedule="constant", mu_dtype=dtype))
    tx = train_state.make_optimizer(optim, 60)
    w = jnp.zeros((16, 1), jnp.float32)
    state = tx.init(w)
    assert any(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(state) if leaf.ndim == 2)
    for _ in range(60):
      updates, state = tx.update(jax.grad(loss)(w), state, w)
      w = w + updates
    finals[dtype] = float(loss(w))
  initial = float(loss(jnp.zeros((16, 1))))
  assert max(finals.values()) < 0.002 * initial, (finals, initial)
  assert abs(finals["bfloat16"] - finals["float32"]) < 0.001 * initial, (finals, initial)


def test_bf16_matmul_sampler_and_reference(roller, policy, prompts, rollout_key):
  """sampler.matmul_dtype / model.frozen_matmul_dtype='bfloat16': the sampler's own log-probs (and
  the reference's) come from bf16-input matmuls and stay within bf16 tolerance of the fp32 ones,
  while the trainer's old log-probs keep the policy's fp32 matmuls."""
  fast = rollout.Roller(policy[0], policy[1], roller.reward, sampler_cfg=SAMPLER, eos_id=EOS, pad_id=EOS,
                        sampler_matmul_dtype="bfloat16", ref_matmul_dtype="bfloat16")
  exp = fast(policy[1], *prompts, rollout_key, K)
  exp32 = variant(roller, ref_params=policy[1])(policy[1], *prompts, rollout_key, K)
  mask = exp.response_mask > 0
  gap = np.abs(exp.logp_sampler - exp.logp_old)[mask]
  assert 1e-4 < gap.max() < 0.05, gap.max()
  ref_gap = np.abs(exp.logp_ref - exp.logp_old)[mask]  # reference = policy here: only the matmuls differ
  assert 1e-4 < ref_gap.max() < 0.05, ref_gap.max()
  np.testing.assert_allclose(exp32.logp_ref, exp32.logp_old, atol=1e-6)
