"""The jitted sampler against independent references.

- log-probs: a teacher-forced forward (`decoder.token_logprobs`) on prompt + response;
- greedy tokens: transformers `generate` on the same tiny HF weights;
- top-k / top-p: the allowed set recomputed in NumPy from teacher-forced logits at every step;
- the sampling distribution: first-token frequencies against softmax(logits / T) in NumPy;
- EOS, min_new_tokens, early stop and prompt bucketing from their definitions.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_fixtures as fx  # noqa: E402
from p3o_jax import sampling, sharding  # noqa: E402
from p3o_jax.models import decoder, hf  # noqa: E402

PROMPTS = [[5, 9, 14, 3, 7, 22], [17, 4], [8, 30, 2, 11], [40]]  # ragged, left padded to BUCKET
BUCKET = 8
N = 10  # new tokens
K = 3   # samples per prompt; one value everywhere so most tests share one compiled sampler


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
  """(torch model, graph, params) of one tiny random GPT-NeoX, loaded with hf.load."""
  directory = tmp_path_factory.mktemp("neox")
  model = fx.build("gpt_neox", directory)
  _, graph, params = hf.load(str(directory))
  return model, graph, params


@pytest.fixture(scope="module")
def logits_fn(neox):
  """Teacher-forced next-token logits [R, T-1, V] (fp32) of a plain forward on prompt + response."""
  _, graph, _ = neox

  @jax.jit
  def fn(params, tokens, mask):
    model, hidden = decoder.forward(graph, params, tokens, mask)
    return model.logits(hidden[:, :-1])

  return lambda params, tokens, mask: np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def prompts():
  return sampling.pad_prompts(PROMPTS, BUCKET, pad_id=fx.PAD_ID)


def concat(out):
  tokens = np.concatenate([np.asarray(out.prompt_tokens), np.asarray(out.tokens)], 1)
  mask = np.concatenate([np.asarray(out.prompt_mask), np.asarray(out.mask)], 1)
  return tokens, mask


def sample(graph, params, prompt_tokens, prompt_mask, seed=0, **kw):
  kw = dict(max_new_tokens=N, num_samples=K, eos_id=fx.EOS_ID, pad_id=fx.PAD_ID) | kw
  return sampling.generate(graph, params, prompt_tokens, prompt_mask, jax.random.key(seed), **kw)


def check_structure(out, eos_id, pad_id, min_new_tokens=0):
  """Definitions of mask, lengths, padding and finished, row by row."""
  tokens, logprobs, mask = np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.mask)
  n = tokens.shape[1]
  for row, length in enumerate(np.asarray(out.lengths)):
    np.testing.assert_array_equal(mask[row], np.arange(n) < length)
    eos_at = np.flatnonzero(tokens[row, :length] == eos_id)
    if out.finished[row]:
      assert eos_at.tolist() == [length - 1], (row, tokens[row])  # exactly one EOS, the last token
    else:
      assert length == n and eos_at.size == 0, (row, tokens[row])
    assert length >= min(min_new_tokens + 1, n)
    assert (tokens[row, length:] == pad_id).all()
    assert (logprobs[row, length:] == 0).all()
    assert (logprobs[row, :length] <= 0).all() and np.isfinite(logprobs[row]).all()


# ----------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced(neox, prompts, temperature):
  _, graph, params = neox
  out = sample(graph, params, *prompts, temperature=temperature)
  # Prompt-major rows: row b*K + k holds prompt b.
  np.testing.assert_array_equal(out.prompt_tokens, np.repeat(prompts[0], K, axis=0))
  np.testing.assert_array_equal(out.prompt_mask, np.repeat(prompts[1], K, axis=0))
  tokens, mask = concat(out)
  ref = decoder.token_logprobs(graph, params, jnp.asarray(tokens), jnp.asarray(mask), temperature)
  ref = np.asarray(ref)[:, BUCKET - 1:]  # the log-prob of response token t sits at column P - 1 + t
  resp_mask = np.asarray(out.mask).astype(bool)
  np.testing.assert_allclose(np.asarray(out.logprobs)[resp_mask], ref[resp_mask], atol=1e-5, rtol=0)
  check_structure(out, fx.EOS_ID, fx.PAD_ID)
  # K samples of one prompt differ (a fresh key per row), and prompts are not all the same.
  assert len({tuple(r) for r in np.asarray(out.tokens)}) > len(PROMPTS)


# ----------------------------------------------------------------------------- greedy vs HF

@pytest.mark.parametrize("kind", ["gpt_neox", "gptj", "llama", "llama_rope_scaled", "qwen2", "qwen3", "olmo2"])
def test_greedy_matches_transformers(kind, prompts, tmp_path):
  """On a CPU the loop reads each layer's projections stacked (`Decoder.stack_projections`): q, k
  and v in one weight where they have as many heads (NeoX with biases, GPT-J, Llama with Llama
  3.1's RoPE scaling), k and v alone under grouped-query attention (Llama; Qwen2 and Qwen3 with
  biases, Qwen3's q and k normalised after the stacked projection, OLMo 2's across all heads)."""
  model = fx.build(kind, tmp_path)
  _, graph, params = hf.load(str(tmp_path))
  merged = decoder.merge(graph, params)
  merged.stack_projections()
  stacked_kernel, stacked_bias = merged.layers[0].attn._stacked
  assert stacked_kernel.shape[1] == (3 if kind in ("gpt_neox", "gptj", "llama_rope_scaled") else 2)
  assert (stacked_bias is not None) == (kind in ("gpt_neox", "qwen2", "qwen3"))
  out = sample(graph, params, *prompts, greedy=True)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.as_tensor(prompts[0], dtype=torch.long),
                         attention_mask=torch.as_tensor(prompts[1], dtype=torch.long),
                         do_sample=False, max_new_tokens=N, pad_token_id=fx.PAD_ID,
                         eos_token_id=fx.EOS_ID)
  ref = ref[:, BUCKET:].numpy()
  ref = np.pad(ref, ((0, 0), (0, N - ref.shape[1])), constant_values=fx.PAD_ID)  # HF stops early
  for k in range(K):  # greedy: every sample of a prompt is the same
    np.testing.assert_array_equal(np.asarray(out.tokens)[k::K], ref)
  check_structure(out, fx.EOS_ID, fx.PAD_ID)


def test_scan_layers_samples_the_same_tokens(neox, prompts):
  """The sampler on the scan_layers twin (stacked params and cache) draws the same tokens."""
  _, graph, params = neox
  cfg = decoder.merge(graph, params).cfg.replace(scan_layers=True)
  scanned, _ = decoder.abstract(cfg)
  want = sample(graph, params, *prompts, seed=3)
  got = sample(scanned, decoder.stack_layers(params), *prompts, seed=3)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
  assert len(set(np.asarray(want.tokens).ravel().tolist())) > 5  # sampled, not one repeated token


# The CPU-dependent choice of how a decode loop reads the LM head (Decoder.decoding_logits), each
# forced through its constants: (REPEATED_HEAD_ROWS_MIN_WIDTH, VOCAB_FIRST_MIN_WIDTH, VOCAB_FIRST_MIN_VOCAB).
HEAD_LAYOUTS = {"stored": (None, None, 1), "rows": (0, None, 1), "vocab_first": (None, 0, 1)}


def use_head_layout(monkeypatch, layout):
  for name, value in zip(("REPEATED_HEAD_ROWS_MIN_WIDTH", "VOCAB_FIRST_MIN_WIDTH", "VOCAB_FIRST_MIN_VOCAB"),
                         HEAD_LAYOUTS[layout]):
    monkeypatch.setattr(decoder, name, value)
  jax.clear_caches()  # generate's compiled loop does not depend on the constants: trace it anew


@pytest.mark.parametrize("kind,layout", [("gpt_neox", "rows"), ("gptj", "vocab_first"), ("gpt2", "vocab_first")])
def test_head_layouts_for_decoding_sample_the_same_tokens(kind, layout, prompts, tmp_path, monkeypatch):
  """A CPU fp32 decode loop may read a wide head as [V, D] giving [R, V] logits (a CPU with AMX)
  or as the left operand giving [V, R] logits, which plain sampling then reads in that layout
  (`sampling.sample_vocab_first`; other CPUs). Forced on tiny models (an untied head; one with a
  bias; a tied one), each draws the tokens of the stored layout, with and without top-k / top-p
  (which read [R, V] logits)."""
  fx.build(kind, tmp_path)
  _, graph, params = hf.load(str(tmp_path))
  model = decoder.merge(graph, params)
  hidden = jax.random.normal(jax.random.key(0), (5, 1, model.cfg.hidden_size))
  settings = ({}, dict(top_k=6, top_p=0.8))
  use_head_layout(monkeypatch, "stored")
  want = [sample(graph, params, *prompts, seed=5, **kw) for kw in settings]
  use_head_layout(monkeypatch, layout)
  logits_fn, vocab_first = model.decoding_logits(allow_vocab_first=True)
  assert vocab_first == (layout == "vocab_first")
  assert not model.decoding_logits()[1]  # not where the caller cannot read it (top-k, top-p, greedy)
  logits = np.asarray(logits_fn(hidden))
  np.testing.assert_allclose(logits.T if vocab_first else logits, np.asarray(model.logits(hidden))[:, 0],
                             rtol=1e-5, atol=1e-5)
  got = [sample(graph, params, *prompts, seed=5, **kw) for kw in settings]
  jax.clear_caches()
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g.tokens), np.asarray(w.tokens))
    np.testing.assert_allclose(np.asarray(g.logprobs), np.asarray(w.logprobs), atol=1e-5)
    assert len(set(np.asarray(w.tokens).ravel().tolist())) > 5  # sampled, not one repeated token


# ----------------------------------------------------------------------------- top-k / top-p

def allowed_tokens(logits, top_k, top_p, slack=1e-4):
  """Boolean [V]: tokens that top-k then top-p may keep, from one row of scaled logits (NumPy).

  `slack` widens the set by a hair so that float differences between the sampler's logits and
  the teacher-forced ones cannot flip a token that sits exactly on the boundary.
  """
  keep = np.isfinite(logits)
  if top_k:
    kth = np.sort(logits)[-top_k]
    keep &= logits >= kth - slack
  if top_p < 1:
    order = np.argsort(-np.where(keep, logits, -np.inf))
    order = order[keep[order]]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    nucleus = np.zeros_like(keep)
    nucleus[order[mass_before < top_p + slack]] = True
    keep &= nucleus
  return keep


def emitted_outside(out, logits_fn, params, temperature, top_k, top_p, min_new_tokens):
  """How many emitted tokens fall outside the allowed set, and how many steps were checked."""
  tokens, mask = concat(out)
  logits = logits_fn(params, tokens, mask)[:, BUCKET - 1:] / temperature
  outside = checked = 0
  for row in range(tokens.shape[0]):
    for t in range(int(out.lengths[row])):
      step_logits = logits[row, t].copy()
      if t < min_new_tokens:
        step_logits[fx.EOS_ID] = -np.inf
      outside += not allowed_tokens(step_logits, top_k, top_p)[out.tokens[row, t]]
      checked += 1
  return outside, checked


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.5), (8, 0.6)])
def test_truncation_never_emits_an_excluded_token(neox, logits_fn, prompts, top_k, top_p):
  _, graph, params = neox
  temperature, min_new = 0.8, 3
  out = sample(graph, params, *prompts, temperature=temperature, top_k=top_k, top_p=top_p,
               min_new_tokens=min_new)
  outside, checked = emitted_outside(out, logits_fn, params, temperature, top_k, top_p, min_new)
  assert outside == 0 and checked >= K * len(PROMPTS) * (min_new + 1)
  check_structure(out, fx.EOS_ID, fx.PAD_ID, min_new)
  # The check has teeth: without truncation, the same model emits tokens outside the set.
  free = sample(graph, params, *prompts, temperature=temperature, min_new_tokens=min_new)
  assert emitted_outside(free, logits_fn, params, temperature, top_k, top_p, min_new)[0] > 0


# ----------------------------------------------------------------------------- distribution

@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 0.7)])
def test_first_token_frequencies_match_the_policy(neox, logits_fn, top_k, top_p):
  _, graph, params = neox
  prompt_tokens, prompt_mask = sampling.pad_prompts([[7, 3, 12]], 4, pad_id=fx.PAD_ID)
  temperature, n = 1.3, 20000
  out = sample(graph, params, prompt_tokens, prompt_mask, max_new_tokens=1, num_samples=n,
               temperature=temperature, top_k=top_k, top_p=top_p)
  logits = logits_fn(params, np.append(prompt_tokens, [[0]], 1),
                     np.append(prompt_mask, [[1]], 1))[0, -1] / temperature
  probs = np.where(allowed_tokens(logits, top_k, top_p, slack=0), np.exp(logits - logits.max()), 0)
  probs /= probs.sum()
  freq = np.bincount(np.asarray(out.tokens)[:, 0], minlength=probs.size) / n
  assert (freq[probs == 0] == 0).all()
  np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / n) + 1e-3)


def assert_inverse_cdf(weights, u, idx):
  """idx [R] is, row by row, the first index whose running sum of weights [R, C] (normalised, in
  float64) exceeds u [R] (NumPy's searchsorted), and never an index of zero weight."""
  R = len(u)
  cdf = np.cumsum(weights.astype(np.float64), -1)
  cdf /= cdf[:, -1:]
  ref = np.array([np.searchsorted(cdf[r], u[r], side="right") for r in range(R)])
  assert (weights[np.arange(R), idx] > 0).all()
  gap = np.abs(cdf[np.arange(R), np.maximum(ref - 1, 0)] - u)  # fp ties at a boundary may differ
  assert ((idx == ref) | (gap < 1e-5)).all() and (idx == ref).mean() > 0.99


def test_inverse_cdf_against_searchsorted():
  rng = np.random.default_rng(0)
  R = 400
  weights = rng.random((R, 1000)).astype(np.float32) * (rng.random((R, 1000)) < 0.7)  # zeros too
  weights[:, -3:] = 0  # trailing zeros: the largest u must not run past the last positive weight
  u = rng.random(R).astype(np.float32)
  u[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]
  for block in (None, 64, 300):  # one block; blocks of 64 (a divisor); 300 forces padding
    assert_inverse_cdf(weights, u, np.asarray(jax.jit(sampling.inverse_cdf, static_argnums=2)(weights, u, block)))


@pytest.mark.parametrize("eos_forbidden", [False, True])
def test_sample_vocab_first_against_numpy(eos_forbidden):
  """[V, R] logits: the token is the inverse CDF of softmax(logits / T) (EOS left out while
  forbidden) at u, and its log-prob the full log-softmax's, EOS included (NumPy, float64)."""
  rng = np.random.default_rng(1)
  V, R, T, eos = 1009, 300, 0.7, 3  # V prime: the last block is padded
  logits = (rng.standard_normal((V, R)) * 3).astype(np.float32)
  logits[eos] += 4.0  # EOS likely: leaving it out matters
  u = rng.random(R).astype(np.float32)
  u[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]
  fn = jax.jit(sampling.sample_vocab_first, static_argnums=3)
  token, logprob = map(np.asarray, fn(logits, u, jnp.float32(T), eos, jnp.bool_(eos_forbidden)))
  scaled = logits.astype(np.float64).T / T                              # [R, V]
  log_softmax = scaled - scaled.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  weights = np.exp(log_softmax)
  if eos_forbidden:
    weights[:, eos] = 0
  assert_inverse_cdf(weights, u, token)
  np.testing.assert_allclose(logprob, log_softmax[np.arange(R), token], rtol=1e-5, atol=1e-5)
  assert (token == eos).any() != eos_forbidden


# ----------------------------------------------------------------------------- EOS, early stop

def with_eos_bias(params, bias):
  """Params whose EOS logit is raised by exactly `bias` at every position.

  The final LayerNorm gives h = g * xhat + b with sum(xhat) = 0, so adding w = a / g to the EOS
  column adds a * sum(b / g) to its logit whatever xhat is; b is shifted so that sum is large.
  """
  params = jax.tree.map(lambda a: a, params)
  g = np.asarray(params["final_norm"]["scale"], np.float64)
  b = np.asarray(params["final_norm"]["bias"], np.float64) + 1.0
  params["final_norm"]["bias"] = jnp.asarray(b, jnp.float32)
  head = np.asarray(params["lm_head"], np.float64)
  head[:, fx.EOS_ID] += bias / np.sum(b / g) / g
  params["lm_head"] = jnp.asarray(head, jnp.float32)
  return params


@pytest.mark.parametrize("pad_id", [fx.PAD_ID, fx.EOS_ID])  # pad may equal EOS: masks still right
def test_nothing_after_eos_and_min_new_tokens(neox, prompts, pad_id):
  _, graph, params = neox
  params = with_eos_bias(params, 3.0)
  min_new = 2
  out = sample(graph, params, *prompts, min_new_tokens=min_new, pad_id=pad_id)
  check_structure(out, fx.EOS_ID, pad_id, min_new)
  lengths, finished = np.asarray(out.lengths), np.asarray(out.finished)
  assert (finished & (lengths < N)).any() and (lengths > min_new + 1).any()  # EOS mid-sequence


def test_early_stop_when_every_row_is_done(neox, prompts):
  _, graph, params = neox
  min_new = 3
  out = sample(graph, with_eos_bias(params, 60.0), *prompts, min_new_tokens=min_new)
  np.testing.assert_array_equal(out.lengths, min_new + 1)  # EOS as soon as it is allowed
  assert out.finished.all()
  assert int(out.num_steps) == min_new + 1 < N
  check_structure(out, fx.EOS_ID, fx.PAD_ID, min_new)


def test_a_stop_sequence_ends_a_row_where_it_first_appears(neox, prompts):
  """Rows sampled with stop sequences are the rows sampled without them, cut after the first
  place a sequence ends (found here in NumPy), and count as finished; the rest are unchanged."""
  _, graph, params = neox
  free = sample(graph, params, *prompts)
  tokens, lengths = np.asarray(free.tokens), np.asarray(free.lengths)
  stop = [tuple(tokens[0, 2:4]), tuple(tokens[4, 5:6])]  # a pair and a single token that occur
  stopped = sample(graph, params, *prompts, stop=stop + [tuple(range(N + 1))])  # too long to occur: ignored

  def first_end(row):
    ends = [at + len(seq) for seq in stop for at in range(lengths[row] - len(seq) + 1)
            if tuple(tokens[row, at:at + len(seq)]) == seq]
    return min(ends, default=None)

  cut = 0
  for row in range(tokens.shape[0]):
    end = first_end(row)
    if end is None:
      expected, finished = tokens[row], bool(free.finished[row])
    else:
      expected, finished = np.where(np.arange(N) < end, tokens[row], fx.PAD_ID), True
      cut += end < lengths[row]
    np.testing.assert_array_equal(np.asarray(stopped.tokens[row]), expected, err_msg=f"row {row}")
    assert int(stopped.lengths[row]) == (lengths[row] if end is None else end) and bool(stopped.finished[row]) == finished
  assert cut >= 2


def test_stop_strings_become_the_token_sequences_a_tokenizer_writes():
  """A byte-level BPE writes a stop string the same alone and after text; a SentencePiece-style
  one (a word-initial piece marked '▁') differently, and both are kept."""
  tokenizers = pytest.importorskip("tokenizers")
  from transformers import PreTrainedTokenizerFast
  words = ["Question", ":", "\n", ".", "▁Question", "▁", "a"]
  core = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, "[UNK]"))
  core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\n|:|\.|▁?Question|▁"), "isolated")
  byte_like = PreTrainedTokenizerFast(tokenizer_object=core)
  assert sampling.stop_sequences(byte_like, ["\nQuestion:", ":"]) == ((2, 0, 1), (1,))
  core.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("▁")])
  sentencepiece_like = PreTrainedTokenizerFast(tokenizer_object=core)
  assert sampling.stop_sequences(sentencepiece_like, ["Question:"]) == ((4, 1), (0, 1))
  with pytest.raises(ValueError, match="each stop must be a non-empty string"):
    sampling.stop_sequences(byte_like, [""])
  with pytest.raises(TypeError, match="a list of strings"):
    sampling.stop_sequences(byte_like, "Question:")


# ----------------------------------------------------------------------------- several devices

@pytest.mark.parametrize("mesh_shape,split_params", [((4, 1, 1), True), ((2, 2, 1), True), ((2, 2, 1), False)])
def test_per_shard_decoding_matches_one_device(neox, prompts, mesh_shape, split_params):
  """With a mesh, the samples are those of the one-device call and the rows stay split over the
  batch shards (data x fsdp): each shard in its own loop where the parameters are replicated, one
  partitioned program where fsdp splits them."""
  _, graph, params = neox
  params = with_eos_bias(params, 3.0)  # some rows end early, at different steps
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  if split_params:
    placed, _ = sharding.shard_params(params, decoder.logical_axes(graph), mesh)
  else:
    placed = jax.device_put(params, sharding.replicated(mesh))
  assert sampling._loop_axes(mesh, sampling._split_axes(placed)) == (("data", "fsdp") if mesh_shape == (2, 2, 1) and not split_params
                                               else ("data",) if mesh_shape == (4, 1, 1) else ())
  prompts = jax.device_put(prompts, sharding.batch_sharding(mesh))
  ref = sample(graph, params, *prompts)
  out = sample(graph, placed, *prompts, mesh=mesh)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.mask, ref.mask)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
  assert int(out.num_steps) == int(ref.num_steps)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  assert {s.data.shape[0] for s in out.tokens.addressable_shards} == {len(PROMPTS) * K // shards}
  early = sample(graph, with_eos_bias(params, 60.0), *prompts, min_new_tokens=2, mesh=mesh)
  assert int(early.num_steps) == 3 and early.finished.all()  # every shard stopped early


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fsdp_sampler_never_holds_the_whole_model(scan_layers):
  """Parameters split by fsdp stay split while decoding: the compiled program's arguments are a
  quarter of the model on each of 4 devices and its temporaries a small part of it (a program that
  gathered the weights before the loop, as a per-shard shard_map must, needs > the whole model)."""
  cfg = decoder.DecoderConfig(vocab_size=4096, hidden_size=128, num_layers=2, num_heads=4, scan_layers=scan_layers)
  graph, params = decoder.create(cfg)
  model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  mesh = sharding.make_mesh(1, 4, 1, devices=jax.devices()[:4])
  placed, _ = sharding.shard_params(params, decoder.logical_axes(graph), mesh)
  tokens, mask = sampling.pad_prompts([[3, 4, 5], [6, 7], [8], [9, 10]] * 2, 4, pad_id=0)
  rows = jax.device_put((tokens, mask), sharding.batch_sharding(mesh))
  settings = dict(max_new_tokens=6, num_samples=2, top_k=0, use_top_p=False, greedy=False, eos_id=1, pad_id=0)
  args = (*rows, jax.random.key(0), np.arange(8, dtype=np.int32), np.float32(1), np.float32(1), np.int32(0))
  axes = sampling._loop_axes(mesh, sampling._split_axes(placed))
  assert axes == ()
  run = sampling._compiled(graph, mesh, axes, total_prompts=8, **settings)
  memory = run.lower(placed, *args).compile().memory_analysis()
  assert memory.argument_size_in_bytes < 0.3 * model_bytes
  assert memory.temp_size_in_bytes < 0.25 * model_bytes
  gathered = sampling._compiled(graph, mesh, ("fsdp",), total_prompts=8, **settings)  # the per-shard loop
  assert gathered.lower(placed, *args).compile().memory_analysis().temp_size_in_bytes > model_bytes
  out = run(placed, *args)
  ref = sampling._compiled(graph, None, (), total_prompts=8, **settings)(params, tokens, mask, *args[2:])
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_decoding_holds_each_prompt_once():
  """K samples of a long prompt share its keys and values (decoder.continue_prefix): the
  compiled sampler's temporaries are below the K-times repeated cache alone and above the
  cache it keeps (each prompt once, N slots per row)."""
  cfg = decoder.DecoderConfig(vocab_size=64, hidden_size=256, num_layers=4, num_heads=2, attention_block=32)
  graph, params = decoder.create(cfg)
  B, P, K, new = 1, 256, 8, 8
  tokens, mask = np.full((B, P), 3, np.int32), np.ones((B, P), np.int32)
  slot_bytes = 2 * cfg.num_layers * cfg.hidden_size * 4  # keys and values of one slot, all layers
  settings = dict(max_new_tokens=new, num_samples=K, top_k=0, use_top_p=False, greedy=False, eos_id=1, pad_id=0)
  args = (tokens, mask, jax.random.key(0), np.arange(B, dtype=np.int32), np.float32(1), np.float32(1), np.int32(0))
  run = sampling._compiled(graph, None, (), total_prompts=B, **settings)
  temp = run.lower(params, *args).compile().memory_analysis().temp_size_in_bytes
  assert (B * P + B * K * new) * slot_bytes < temp < B * K * (P + new) * slot_bytes, temp


def test_indivisible_batch_decodes_as_one(neox, prompts, caplog):
  _, graph, params = neox
  mesh = sharding.make_mesh(8, 1, 1)
  with caplog.at_level(logging.WARNING, logger="p3o_jax.sampling"):
    out = sample(graph, params, *prompts, mesh=mesh)
  assert "4 prompts do not split over 8 batch shards" in caplog.text
  np.testing.assert_array_equal(out.tokens, sample(graph, params, *prompts).tokens)


# ----------------------------------------------------------------------------- prompts

def test_pad_prompts_buckets_and_errors(caplog):
  tokens, mask = sampling.pad_prompts([[3, 4, 5], [6]], 4, pad_id=0)
  np.testing.assert_array_equal(tokens, [[0, 3, 4, 5], [0, 0, 0, 6]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert sampling.pad_prompts([[1] * 5], None)[0].shape == (1, 8)      # next power of two
  assert sampling.pad_prompts([[1] * 5], (4, 6, 16))[0].shape == (1, 6)  # smallest bucket that fits
  with pytest.raises(ValueError, match=r"prompt 1 has 6 tokens, longer than the bucket length 4"):
    sampling.pad_prompts([[1, 2], [1, 2, 3, 4, 5, 6]], 4)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    sampling.pad_prompts([[]], 4)
  with caplog.at_level(logging.WARNING, logger="p3o_jax.sampling"):
    tokens, mask = sampling.pad_prompts([[1, 2], [1, 2, 3, 4, 5, 6]], 4, pad_id=0, truncate=True)
  np.testing.assert_array_equal(tokens[1], [3, 4, 5, 6])  # the oldest tokens go
  assert mask[1].all()
  assert "prompt 1 truncated from the left: 6 -> 4 tokens" in caplog.text


def test_generate_rejects_bad_input(neox):
  _, graph, params = neox
  right_padded = np.array([[3, 4, 0]]), np.array([[1, 1, 0]])
  with pytest.raises(ValueError, match=r"LEFT-padded: rows \[0\]"):
    sample(graph, params, *right_padded)
  left = np.array([[0, 3, 4]]), np.array([[0, 1, 1]])
  with pytest.raises(ValueError, match="temperature"):
    sample(graph, params, *left, temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    sample(graph, params, *left, top_p=0.0)
  with pytest.raises(ValueError, match="min_new_tokens"):
    sample(graph, params, *left, min_new_tokens=N + 1)
  cfg = decoder.DecoderConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                              position="learned", max_position_embeddings=16)
  with pytest.raises(ValueError, match="exceeds the model's 16 learned positions"):
    sample(*decoder.abstract(cfg), np.ones((1, 8)), np.ones((1, 8)), max_new_tokens=9)
