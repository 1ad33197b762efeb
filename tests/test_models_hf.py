"""Hugging Face import/export parity: our decoder against transformers on the same tiny weights.

Reference: the transformers model itself (torch, CPU, fp32, eager attention), called the way HF
generate calls it on a left-padded batch (attention_mask and position_ids = cumsum(mask) - 1).
Logits are compared at real-token positions only.
"""

import json
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_fixtures as fx  # noqa: E402
from p3o_jax import supervised  # noqa: E402
from p3o_jax.data import batching  # noqa: E402
from p3o_jax.models import decoder, hf  # noqa: E402
from p3o_jax.rl import sequences  # noqa: E402

ATOL = 1e-5  # fp32 logits and rewards against transformers
LENGTHS = (8, 6, 4)  # ragged, left padded to T
T = 8
PROMPT = 5           # the cache test prefills 5 columns and decodes the last 3 one by one


def _batch(left: bool = True, seed: int = 0):
  mask = np.array([[0] * (T - n) + [1] * n if left else [1] * n + [0] * (T - n) for n in LENGTHS],
                  np.int32)
  rng = np.random.default_rng(seed)
  tokens = np.where(mask == 1, rng.integers(2, fx.VOCAB, mask.shape), fx.PAD_ID)
  return tokens, mask


def _max_err(ours, ref, mask):
  return float(np.abs(np.asarray(ours) - np.asarray(ref))[mask.astype(bool)].max())


def _hf_logits(model, tokens, mask):
  with torch.no_grad():
    return model(**fx.hf_inputs(tokens, mask)).logits.numpy()


def _jitted_logits(graph):
  def logits(params, tokens, mask):
    model, hidden = decoder.forward(graph, params, tokens, mask)
    return model.logits(hidden)
  return jax.jit(logits)


def _jitted_scores(graph):
  def scores(params, tokens, mask):
    model, hidden = decoder.forward(graph, params, tokens, mask)
    return decoder.last_token_scalar(model.scalar(hidden), mask)
  return jax.jit(scores)


@pytest.fixture(scope="module", params=sorted(fx.CONFIGS))
def causal(request, tmp_path_factory):
  """One tiny *ForCausalLM per family, its HF logits, and our load of it."""
  directory = tmp_path_factory.mktemp(request.param)
  model = fx.build(request.param, directory)
  tokens, mask = _batch()
  cfg, graph, params = hf.load(str(directory))
  return SimpleNamespace(kind=request.param, dir=directory, model=model, tokens=tokens, mask=mask,
                         ref=_hf_logits(model, tokens, mask), cfg=cfg, graph=graph, params=params,
                         logits=_jitted_logits(graph)(params, tokens, mask))


def test_logits_match_transformers_on_left_padded_batch(causal):
  ours = causal.logits
  assert causal.cfg.model_type == fx.CONFIGS[causal.kind]().model_type
  assert _max_err(ours, causal.ref, causal.mask) < ATOL
  # The weights are random enough that logits are far from flat: a mapping error would show.
  assert np.std(causal.ref[causal.mask.astype(bool)]) > 0.3


def _errors_against_transformers_bf16(causal, **dtypes):
  """(our logits loaded with `dtypes`, |error| on real tokens against the fp32 reference as a
  function, transformers' own bf16 logits)."""
  _, graph, params = hf.load(str(causal.dir), **dtypes)
  ours = np.asarray(_jitted_logits(graph)(params, causal.tokens, causal.mask), np.float32)
  with torch.no_grad():
    theirs = causal.model.to(torch.bfloat16)(**fx.hf_inputs(causal.tokens, causal.mask)).logits.float().numpy()
  causal.model.to(torch.float32)  # the fixture is shared
  real = causal.mask.astype(bool)
  return ours, lambda x: np.abs(x - causal.ref)[real], theirs


def test_bfloat16_is_as_accurate_as_transformers_in_bfloat16(causal):
  """bf16 weights and activations (the TPU/GPU setting): against the fp32 reference, our
  logits err no more than transformers' own bf16 model does (max and mean over real tokens)."""
  ours, err, theirs = _errors_against_transformers_bf16(causal, dtype="bfloat16", param_dtype="bfloat16")
  real = causal.mask.astype(bool)
  assert err(ours).max() <= 1.5 * err(theirs).max() + 1e-3, (err(ours).max(), err(theirs).max())
  assert err(ours).mean() <= 1.5 * err(theirs).mean() + 1e-4, (err(ours).mean(), err(theirs).mean())
  assert err(ours).max() < 0.1 * np.abs(causal.ref[real]).max()  # and bf16-small in absolute terms


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_kv_cache_decoding_matches_full_forward(causal, scan):
  cfg, graph, params = causal.cfg, causal.graph, causal.params
  if scan:  # one stacked [B, L, G, S, K] cache carried through the scan over layers
    cfg = cfg.replace(scan_layers=True)
    graph, params = decoder.abstract(cfg)[0], decoder.stack_layers(params)
  tokens, mask = jnp.asarray(causal.tokens), jnp.asarray(causal.mask)
  positions = decoder.positions_from_mask(mask)
  B = tokens.shape[0]
  slots = jnp.arange(T)

  @jax.jit
  def prefill(params, cache):
    # Query t sees cache slots s <= t that hold real tokens; slots past the prompt are empty.
    attend = (slots[None, None, :] <= jnp.arange(PROMPT)[None, :, None]) & mask[:, None, :].astype(bool)
    model = decoder.merge(graph, params)
    hidden, cache = model(tokens[:, :PROMPT], positions[:, :PROMPT], attend, cache=cache, cache_index=0)
    return model.logits(hidden), cache

  @jax.jit
  def step(params, cache, t):
    token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    position = jax.lax.dynamic_slice_in_dim(positions, t, 1, axis=1)
    attend = ((slots <= t)[None, :] & mask.astype(bool))[:, None, :]  # [B, 1, S] key-valid slots
    model = decoder.merge(graph, params)
    hidden, cache = model(token, position, attend, cache=cache, cache_index=t)
    return model.logits(hidden), cache

  logits, cache = prefill(params, decoder.init_cache(cfg, B, T))
  chunks = [logits]
  for t in range(PROMPT, T):
    logits, cache = step(params, cache, jnp.int32(t))
    chunks.append(logits)
  cached = jnp.concatenate(chunks, axis=1)
  assert _max_err(cached, causal.logits, causal.mask) < ATOL
  assert _max_err(cached, causal.ref, causal.mask) < ATOL


@pytest.mark.parametrize("variant", ["unrolled", "remat", "scan_layers"])
def test_outputs_at_some_positions_match_transformers_and_the_full_gradient(causal, variant):
  """Hidden states asked for at a few positions only (the last block runs its queries and MLP
  there alone) give transformers' logits at those positions, with and without a KV cache, and
  the same gradient as the full forward read at those positions."""
  cfg, params = causal.cfg, causal.params
  if variant == "remat":
    cfg = cfg.replace(remat=True)
  if variant == "scan_layers":
    cfg, params = cfg.replace(scan_layers=True), decoder.stack_layers(params)
  graph = decoder.abstract(cfg)[0]
  tokens, mask = jnp.asarray(causal.tokens), jnp.asarray(causal.mask)
  rows = np.array([[T - 1, T - 3], [T - 2, T - 1], [T - 1, T - 4]], np.int32)  # real positions, any order
  assert np.take_along_axis(causal.mask, rows, 1).all()
  want = np.take_along_axis(causal.ref, rows[..., None], 1)

  def picked(params, outputs_at):
    model, hidden = decoder.forward(graph, params, tokens, mask, outputs_at=outputs_at)
    return model.logits(hidden)

  def cached(params, outputs_at):  # the same pass written into a KV cache (a prefill)
    model = decoder.merge(graph, params)
    hidden, _ = model(tokens, decoder.positions_from_mask(mask), decoder.causal_mask(mask),
                      decoder.init_cache(cfg, len(rows), T), 0, outputs_at=outputs_at)
    return model.logits(hidden)

  for run in (picked, cached):
    got = jax.jit(run)(params, jnp.asarray(rows))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  weights = np.random.default_rng(0).standard_normal(want.shape).astype(np.float32)
  loss_at = lambda p: (picked(p, jnp.asarray(rows)) * weights).sum()
  loss_full = lambda p: (decoder.take_rows(picked(p, None), jnp.asarray(rows)) * weights).sum()
  grad_at, grad_full = (jax.jit(jax.grad(f))(params) for f in (loss_at, loss_full))
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grad_full))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0), grad_at, grad_full)


def test_export_loads_unchanged_in_transformers(causal, tmp_path):
  out = tmp_path / "export"
  hf.save(str(out), causal.cfg, causal.params, config_overrides=fx.IDS)
  assert sorted(os.listdir(tmp_path)) == ["export"]  # the temporary dir was renamed into place
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
  assert type(exported).__name__ == hf.CAUSAL_LM_CLASS[causal.cfg.model_type]
  exported_logits = _hf_logits(exported.eval(), causal.tokens, causal.mask)
  assert _max_err(exported_logits, causal.ref, causal.mask) < 1e-5
  # And back in: the same params, bit for bit.
  cfg, _, params = hf.load(str(out))
  assert cfg == causal.cfg
  jax.tree.map(np.testing.assert_array_equal, params, causal.params)


def _same_layout_parity(kind: str, tmp_path):
  """A SAME_LAYOUT model built, loaded and exported: its logits on a left-padded batch and its
  export's, in transformers, both against transformers' own. Returns what the test checks next."""
  model = fx.build(kind, tmp_path / "in")
  tokens, mask = _batch()
  cfg, graph, params = hf.load(str(tmp_path / "in"))
  ref = _hf_logits(model, tokens, mask)
  assert _max_err(_jitted_logits(graph)(params, tokens, mask), ref, mask) < ATOL
  hf.save(str(tmp_path / "out"), cfg, params, config_overrides=fx.IDS)
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
  assert _max_err(_hf_logits(exported.eval(), tokens, mask), ref, mask) < 1e-5
  assert hf.load(str(tmp_path / "out"))[0] == cfg
  return SimpleNamespace(cfg=cfg, params=params, tokens=tokens, mask=mask, ref=ref, exported=exported)


def test_llama_with_llama3_rope_scaling_matches_transformers_and_exports(tmp_path):
  """Llama 3.1's scaled RoPE through the whole model: logits on a left-padded batch, the export
  (its rope_scaling written back) and the round trip (greedy decoding: test_sampling.py)."""
  run = _same_layout_parity("llama_rope_scaled", tmp_path)
  assert (run.cfg.rope_type, run.cfg.rope_factor, run.cfg.rope_original_max_positions) == ("llama3", 4.0, 16)
  assert fx.rope_type(run.exported.config) == "llama3"
  unscaled = _jitted_logits(decoder.abstract(run.cfg.replace(rope_type="default"))[0])(run.params, run.tokens, run.mask)
  assert _max_err(unscaled, run.ref, run.mask) > 100 * ATOL  # the scaling shows in these logits


def test_mistral_matches_transformers_within_its_sliding_window(tmp_path):
  """Mistral is Llama with a sliding window over the keys. Up to the window's length every key is
  inside it, so the decoder's full causal attention is the same function; longer sequences are
  refused by name before any stage runs. Logits, export (the window kept, or null kept null: a
  missing key would read as transformers' default of 4096) and the check."""
  run = _same_layout_parity("mistral", tmp_path)
  cfg = run.cfg
  assert (cfg.model_type, cfg.sliding_window, cfg.kv_heads) == ("mistral", 16, 2)
  assert type(run.exported).__name__ == "MistralForCausalLM" and run.exported.config.sliding_window == 16
  batching.check_positions(cfg, 16, "policy")
  with pytest.raises(ValueError, match="policy: sequences of 17 tokens .* sliding window of 16"):
    batching.check_positions(cfg, 17, "policy")
  unwindowed = cfg.replace(sliding_window=None)
  assert json.loads(json.dumps(hf.config_to_hf(unwindowed, "MistralForCausalLM")))["sliding_window"] is None
  assert transformers.MistralConfig(**hf.config_to_hf(unwindowed, "MistralForCausalLM")).sliding_window is None
  batching.check_positions(unwindowed, 4096 * 32, "policy")
  from configs import demo
  from p3o_jax import pipeline
  config = demo.get_config("runlocal")  # prompts of 8 tokens and 10 new ones
  config.mesh.data = 1
  with pytest.raises(ValueError, match=rf"policy {tmp_path / 'in'}: sequences of 18 tokens .* sliding window of 16"):
    pipeline.load_policy(config, str(tmp_path / "in"))


def _logprob_grads(graph, params, tokens, mask):
  loss = lambda p: decoder.token_logprobs(graph, p, tokens, mask).sum()
  return jax.jit(jax.grad(loss))(params)


def test_blocked_attention_matches_transformers_and_its_gradient(causal):
  """Queries in blocks of 3 (T=8: two full blocks and one padded) against transformers, and
  the same logits and gradients as all queries at once."""
  blocked, _ = decoder.abstract(causal.cfg.replace(attention_block=3))
  whole, _ = decoder.abstract(causal.cfg.replace(attention_block=0))
  logits = _jitted_logits(blocked)(causal.params, causal.tokens, causal.mask)
  assert _max_err(logits, causal.ref, causal.mask) < ATOL
  assert _max_err(logits, _jitted_logits(whole)(causal.params, causal.tokens, causal.mask), causal.mask) < ATOL
  got = _logprob_grads(blocked, causal.params, causal.tokens, causal.mask)
  want = _logprob_grads(whole, causal.params, causal.tokens, causal.mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, want)


@pytest.mark.parametrize("block", [0, 5], ids=["whole", "blocked"])
def test_packed_sequences_match_transformers_on_each_alone(causal, block):
  """Three sequences packed two rows of 12 (8 + 4, then 6 after left padding), each a segment that
  attends to itself from position 0: every segment's logits are transformers' on that sequence
  in a row of its own (learned and rotary positions alike)."""
  real = causal.mask.astype(bool)
  sequences = [causal.tokens[i][real[i]] for i in range(len(LENGTHS))]
  width, layout = 12, [[0, 2], [1]]
  tokens = np.full((2, width), fx.PAD_ID, np.int32)
  segments = np.zeros((2, width), np.int32)
  where = {}
  for row, members in enumerate(layout):
    at = width - sum(len(sequences[i]) for i in members)
    for segment, i in enumerate(members, start=1):
      tokens[row, at:at + len(sequences[i])], segments[row, at:at + len(sequences[i])] = sequences[i], segment
      where[i] = (row, at)
      at += len(sequences[i])
  graph, _ = decoder.abstract(causal.cfg.replace(attention_block=block))

  @jax.jit
  def logits(params, tokens, segments):
    model, hidden = decoder.forward(graph, params, tokens, segments > 0, segments=segments)
    return model.logits(hidden)

  ours = np.asarray(logits(causal.params, tokens, segments))
  for i, sequence in enumerate(sequences):
    row, at = where[i]
    ref = causal.ref[i][real[i]]
    assert np.abs(ours[row, at:at + len(sequence)] - ref).max() < ATOL, (i, causal.kind)
  np.testing.assert_array_equal(decoder.segment_positions(jnp.asarray(segments))[0], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3])
  # The SFT loss of the packed rows is the one of the sequences one to a row (a token mean).
  targets = np.zeros_like(segments, bool)
  targets[:, 1:] = (segments[:, 1:] > 0) & (segments[:, 1:] == segments[:, :-1]) & (np.arange(width - 1) % 3 > 0)
  alone = np.zeros((len(sequences), T), bool)
  for i, sequence in enumerate(sequences):
    row, at = where[i]
    alone[i, T - len(sequence):] = targets[row, at:at + len(sequence)]
  loss = supervised.sft_loss_fn(graph)
  packed, _ = loss(causal.params, {"tokens": tokens, "mask": segments > 0, "loss_mask": targets, "segments": segments})
  rows, _ = loss(causal.params, {"tokens": causal.tokens, "mask": real, "loss_mask": alone})
  assert targets.sum() == alone.sum() > 6
  np.testing.assert_allclose(packed, rows, rtol=1e-6)


def test_blocked_attention_bounds_the_score_memory():
  """One block's scores at a time, forward and backward: the unblocked gradient needs
  temporaries beyond one layer's [B, H, T, T] float32 scores, the blocked one a fraction."""
  T, B, H = 512, 2, 4
  scores = B * H * T * T * 4
  temp = {}
  for block in (0, 64):
    cfg = decoder.DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=H, num_kv_heads=2,
                                max_position_embeddings=T, attention_block=block)
    graph, params = decoder.create(cfg)
    tokens, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
    loss = lambda p: decoder.token_logprobs(graph, p, tokens, mask).sum()
    temp[block] = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temp[0] > scores and temp[64] < temp[0] / 4, (temp, scores)


@pytest.mark.parametrize("block", [0, 2])
def test_attention_over_a_shared_prefix_against_numpy(block):
  """Rows b * K + k attending over prefix b's keys kept once (decoder.continue_prefix) and their
  own: NumPy softmax attention over the prefix repeated for every row and concatenated with the
  row's own keys, grouped-query heads, masked slots in both parts, queries in blocks or not."""
  rng = np.random.default_rng(3)
  B, K, T, G, R, D, P, N = 2, 3, 5, 2, 2, 8, 6, 7
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  q, k, v = normal(B * K, T, G, R, D), normal(B * K, G, N, D), normal(B * K, G, N, D)
  prefix = decoder.LayerCache(normal(B, G, P, D), normal(B, G, P, D))
  mask = rng.random((B * K, T, P + N)) < 0.6
  mask[:, :, 0] = True  # every query sees a key
  cache = decoder.continue_prefix(prefix, K, N)
  assert isinstance(cache, decoder.PrefixedCache) and cache.prefix_v.shape == (B, G, P, D)
  got = decoder.attend(q, k, v, mask, block, (cache.prefix_k, cache.prefix_v))

  keys = np.concatenate([np.repeat(prefix.k, K, 0), k], 2)  # [B * K, G, P + N, D]
  values = np.concatenate([np.repeat(prefix.v, K, 0), v], 2)
  scores = np.einsum("btgrd,bgsd->btgrs", q, keys) / np.sqrt(D)
  scores = np.where(mask[:, :, None, None, :], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  want = np.einsum("btgrs,bgsd->btgrd", weights / weights.sum(-1, keepdims=True), values)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)


def test_attention_scores_are_not_kept_for_the_backward():
  """A pass shorter than one attention block (a prompt, the responses after it) keeps no layer's
  [B, H, T, T] scores until the backward pass, which recomputes them from q and k: no residual
  autodiff saves is as large as one layer's scores (the MLP's [B, T, F] and the mask's [B, T, T]
  are the largest), while without the recomputation the probabilities would be among them."""
  from jax._src.ad_checkpoint import saved_residuals
  T, B, H = 128, 2, 4
  cfg = decoder.DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=H, num_kv_heads=2,
                              max_position_embeddings=T)
  assert cfg.attention_block >= T
  graph, params = decoder.create(cfg)
  tokens, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
  sizes = lambda loss: [int(np.prod(a.shape)) for a, _ in saved_residuals(loss, params)]
  kept = sizes(lambda p: decoder.token_logprobs(graph, p, tokens, mask).sum())
  assert max(kept) < B * H * T * T, sorted(kept)[-5:]
  q = jnp.ones((B, T, 2, 2, 8))
  kv = jnp.ones((B, 2, T, 8))
  whole = [int(np.prod(a.shape)) for a, _ in saved_residuals(
      lambda q: decoder._attend_all(q, kv, kv, decoder.causal_mask(mask)).sum(), q)]
  assert max(whole) >= B * H * T * T  # the power to fail: the plain attention keeps them


def test_scan_layers_matches_unrolled_and_round_trips(causal, tmp_path):
  """scan_layers: HF import stacks the same tensors; logits and gradients (with remat inside
  the scan) equal the unrolled model's; export writes the same checkpoint back."""
  cfg, graph, params = hf.load(str(causal.dir), scan_layers=True)
  assert cfg.scan_layers and decoder.logical_axes(graph)["layers"]["attn"]["q_kernel"][0] == "layers"
  jax.tree.map(np.testing.assert_array_equal, params, decoder.stack_layers(causal.params))
  logits = _jitted_logits(graph)(params, causal.tokens, causal.mask)
  # 1e-6 relative to the logits' scale (~8 float32 ulps): the scan body is fused apart from the
  # unrolled layers, and XLA:CPU's kernels round differently by instruction set.
  scale = max(1.0, float(np.abs(np.asarray(causal.logits)).max()))
  assert _max_err(logits, causal.logits, causal.mask) < 1e-6 * scale
  remat, _ = decoder.abstract(cfg.replace(remat=True))
  got = decoder.unstack_layers(_logprob_grads(remat, params, causal.tokens, causal.mask))
  want = _logprob_grads(causal.graph, causal.params, causal.tokens, causal.mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, want)
  hf.save(str(tmp_path / "scan"), cfg, params, config_overrides=fx.IDS)
  hf.save(str(tmp_path / "unrolled"), causal.cfg, causal.params, config_overrides=fx.IDS)
  a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("scan", "unrolled"))
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert json.load(open(tmp_path / "scan" / "config.json")) == json.load(open(tmp_path / "unrolled" / "config.json"))


def test_score_head_on_a_causal_checkpoint_starts_fresh(causal):
  cfg, _, params = hf.load(str(causal.dir), head="score", seed=3)
  assert not cfg.lm_head and cfg.scalar_head and "lm_head" not in params
  assert params["scalar_kernel"].shape == (cfg.hidden_size, 1)
  np.testing.assert_array_equal(params["layers"][1]["attn"]["q_kernel"],
                                causal.params["layers"][1]["attn"]["q_kernel"])


# ----------------------------------------------------------------------------- reward models

@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "gptj", "llama", "mistral", "qwen3", "olmo2"])
def reward(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(f"{request.param}_rm")
  model = fx.build(request.param, directory, seq_cls=True, seed=1)
  cfg, graph, params = hf.load(str(directory), head="score")
  return SimpleNamespace(kind=request.param, dir=directory, model=model, cfg=cfg, graph=graph, params=params,
                         scores=_jitted_scores(graph))


def _hf_scores(model, tokens, mask):
  with torch.no_grad():
    return model(**fx.hf_inputs(tokens, mask)).logits[:, 0].numpy()


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_reward_matches_sequence_classification(reward, left):
  tokens, mask = _batch(left=left, seed=2)
  ref = _hf_scores(reward.model, tokens, mask)
  ours = reward.scores(reward.params, tokens, mask)
  assert not reward.cfg.lm_head and reward.cfg.scalar_head and not reward.cfg.scalar_head_bias
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
  # As the RL loop scores: the last layer run on each row's last real token alone.
  last_only = jax.jit(lambda p, t, m: sequences.sequence_scores(reward.graph, p, t, m))(reward.params, tokens, mask)
  np.testing.assert_allclose(last_only, ref, atol=ATOL, rtol=0)
  assert np.ptp(ref) > 0.1  # scores differ between rows, so a wrong read position would show


def test_reward_export_and_value_head(reward, tmp_path):
  tokens, mask = _batch(seed=4)
  ref = _hf_scores(reward.model, tokens, mask)
  hf.save(str(tmp_path / "rm"), reward.cfg, reward.params, config_overrides={"pad_token_id": fx.PAD_ID})
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / "rm"), attn_implementation="eager").eval()
  np.testing.assert_allclose(_hf_scores(exported, tokens, mask), ref, atol=1e-5, rtol=0)
  # A critic started from the reward model: the same kernel and a zero bias.
  cfg, _, params = hf.load(str(reward.dir), head="value")
  assert cfg.scalar_head_bias and not cfg.lm_head and float(params["scalar_bias"][0]) == 0.0
  np.testing.assert_array_equal(params["scalar_kernel"], reward.params["scalar_kernel"])
  with pytest.raises(ValueError, match="value head"):
    hf.save(str(tmp_path / "critic"), cfg, params)


def test_score_positions_match_a_loop():
  rng = np.random.default_rng(0)
  masks = [_batch(left=True)[1], _batch(left=False)[1], (rng.random((4, 7)) < 0.5).astype(np.int32)]
  for mask in masks:
    expected = [max([t for t in range(mask.shape[1]) if mask[b, t]], default=0) for b in range(len(mask))]
    np.testing.assert_array_equal(decoder.score_positions(jnp.asarray(mask)), expected)
    scalars = rng.normal(size=mask.shape).astype(np.float32)
    np.testing.assert_array_equal(decoder.last_token_scalar(jnp.asarray(scalars), jnp.asarray(mask)),
                                  scalars[np.arange(len(mask)), expected])


# ----------------------------------------------------------------------------- configs & bad input

def _hf_dict(kind: str) -> dict:
  fx.require(fx.CONFIGS, kind)
  return fx.CONFIGS[kind]().to_dict()


ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "rotary_pct", "rotary_emb_base")


def test_rope_and_eps_names_in_both_config_formats():
  """transformers 5 writes the RoPE settings as one rope_parameters dict, 4.x as flat fields
  (GPT-NeoX's rotary_pct and rotary_emb_base); the hub holds config.json files of both kinds.
  Both are written here by hand, whichever transformers is installed."""
  base = {k: v for k, v in _hf_dict("gpt_neox").items() if k not in ROPE_KEYS}
  new_style = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}
  legacy = {**base, "rotary_pct": 0.25, "rotary_emb_base": 500.0, "layer_norm_eps": 1e-3}
  a, b = hf.config_from_hf(new_style), hf.config_from_hf(legacy)
  assert (a.rotary_pct, a.rope_theta, a.parallel_residual) == (0.25, 500.0, True)
  assert (b.rotary_pct, b.rope_theta, b.norm_eps) == (0.25, 500.0, 1e-3)
  llama = hf.config_from_hf({**_hf_dict("llama"), "rope_parameters": None, "rope_theta": 123.0})
  assert (llama.rope_theta, llama.kv_heads, llama.dim_per_head) == (123.0, 2, 24)
  assert hf.config_from_hf(_hf_dict("gpt2")).norm_eps == 1e-5
  qwen = hf.config_from_hf(_hf_dict("qwen2"), dtype="bfloat16")
  assert (qwen.qkv_bias, qwen.out_bias, qwen.dtype) == (True, False, "bfloat16")


@pytest.mark.parametrize("kind, scaling", [
    ("linear", {"factor": 4.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ("llama3", {"factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 4096}),
], ids=["linear", "llama3.1", "llama3-other"])
def test_rope_scaling_matches_transformers_frequencies_and_tables(kind, scaling):
  """Llama 3.1-shaped RoPE (theta 5e5, head_dim 128) against transformers' own frequency
  functions, in both config formats; the cos table at positions up to 100k as its rotary
  embedding class computes it (float32)."""
  from transformers import modeling_rope_utils
  from transformers.models.llama import modeling_llama
  config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=131072, rope_theta=500000.0,
                                    rope_scaling={"rope_type": kind, **scaling})
  d = config.to_dict()
  legacy = {**{k: v for k, v in d.items() if k not in ("rope_parameters", "rope_scaling")}, "rope_theta": 500000.0,
            "rope_scaling": {"type": kind, **scaling}}
  ours, from_legacy = hf.config_from_hf(d), hf.config_from_hf(legacy)
  assert ours == from_legacy and ours.rope_type == kind
  theirs, attention_factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind](config, "cpu")
  assert attention_factor == 1.0
  freqs = np.asarray(decoder.rope_frequencies(ours, 128))
  np.testing.assert_allclose(freqs, theirs.numpy(), rtol=1e-6, atol=0)
  assert not np.allclose(freqs, np.asarray(decoder.rope_frequencies(ours.replace(rope_type="default"), 128)))
  positions = torch.tensor([[0, 1, 7, 8191, 8192, 65536, 100000]])
  cos, sin = modeling_llama.LlamaRotaryEmbedding(config=config)(torch.zeros(1, 1, dtype=torch.float32), positions)
  our_cos, our_sin = decoder.rotary_tables(jnp.asarray(positions.numpy()), decoder.rope_frequencies(ours, 128))
  np.testing.assert_allclose(np.asarray(our_cos), cos.numpy(), atol=2e-3)
  np.testing.assert_allclose(np.asarray(our_sin), sin.numpy(), atol=2e-3)
  exported = hf.config_to_hf(ours, "LlamaForCausalLM")
  assert hf.config_from_hf(exported) == ours
  assert fx.rope_type(transformers.LlamaConfig(**exported)) == kind


HUB_CONFIGS = os.path.join(os.path.dirname(__file__), "data", "hub_configs")


@pytest.mark.parametrize("name, expected", [
    ("Llama-3.2-1B", dict(model_type="llama", num_layers=16, kv_heads=8, dim_per_head=64, rope_theta=5e5,
                          rope_type="llama3", rope_factor=32.0, rope_original_max_positions=8192,
                          tie_embeddings=True, qk_norm="", qkv_bias=False)),
    ("Qwen3-0.6B", dict(model_type="qwen3", num_layers=28, kv_heads=8, dim_per_head=128, rope_theta=1e6,
                        rope_type="default", tie_embeddings=True, qk_norm="head", qkv_bias=False, out_bias=False)),
    ("OLMo-2-0425-1B", dict(model_type="olmo2", num_layers=16, kv_heads=16, dim_per_head=128, rope_theta=5e5,
                            rope_type="default", tie_embeddings=False, qk_norm="width", norm_position="post")),
])
def test_hub_configs_read_as_transformers_reads_them(name, expected, tmp_path):
  """config.json as the hub serves it (tests/data/hub_configs): the fields, the RoPE frequencies
  against transformers' reading of the same file, and the export's round trip."""
  from transformers import modeling_rope_utils
  with open(os.path.join(HUB_CONFIGS, f"{name}.json")) as f:
    raw = json.load(f)
  cfg = hf.config_from_hf(raw)
  assert {k: getattr(cfg, k) for k in expected} == expected
  if raw["model_type"] not in transformers.CONFIG_MAPPING:
    pytest.skip(f"transformers {transformers.__version__} has no {raw['model_type']} model")
  shutil.copy(os.path.join(HUB_CONFIGS, f"{name}.json"), tmp_path / "config.json")
  theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
  kind = fx.rope_type(theirs)
  theta = (getattr(theirs, "rope_parameters", None) or {}).get("rope_theta") or theirs.rope_theta
  inv_freq, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind](theirs, "cpu") if kind != "default" else (
      1.0 / (theta ** (torch.arange(0, cfg.dim_per_head, 2).float() / cfg.dim_per_head)), 1.0)
  np.testing.assert_allclose(np.asarray(decoder.rope_frequencies(cfg, cfg.dim_per_head)), inv_freq.numpy(), rtol=1e-6)
  assert hf.config_from_hf(hf.config_to_hf(cfg, raw["architectures"][0])) == cfg


def test_unsupported_model_type_names_the_supported_ones():
  with pytest.raises(ValueError, match="'bert'.*gpt2, gpt_neox, gptj, llama, mistral, qwen2, qwen3, olmo2"):
    hf.config_from_hf({"model_type": "bert", "hidden_size": 8})


@pytest.mark.parametrize("kind, change, message", [
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'.*default, linear, llama3"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}}, "yarn"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "no 'low_freq_factor'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "sliding"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16}, "qwen3 sliding"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "quick_gelu"}, "quick_gelu"),
    ("gptj", {"rotary_dim": None}, "rotary_dim"),
])
def test_unsupported_features_raise(kind, change, message):
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf({**_hf_dict(kind), **change})


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
  directory = tmp_path_factory.mktemp("llama_files")
  model = fx.build("llama", directory, seed=5)
  return SimpleNamespace(dir=directory, model=model, tensors=load_file(str(directory / "model.safetensors")))


def _copy_with(src, dst, tensors):
  shutil.copytree(src, dst)
  os.remove(dst / "model.safetensors")
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return str(dst)


def test_directory_without_safetensors_names_the_path(llama_files, tmp_path):
  shutil.copy(llama_files.dir / "config.json", tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    hf.load(str(tmp_path))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin is not read"):
    hf.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    hf.load(str(tmp_path / "absent"))


def test_wrong_shape_names_tensor_and_both_shapes(llama_files, tmp_path):
  name = "model.layers.1.self_attn.k_proj.weight"  # expected (2 * 24, 64)
  tensors = {**llama_files.tensors, name: llama_files.tensors[name][:24]}
  path = _copy_with(llama_files.dir, tmp_path / "bad", tensors)
  with pytest.raises(ValueError, match=r"k_proj.weight'.*\(24, 64\).*\(48, 64\)"):
    hf.load(path)


def test_missing_and_unexpected_tensors_are_named(llama_files, tmp_path):
  gone = "model.layers.0.mlp.up_proj.weight"
  tensors = {k: v for k, v in llama_files.tensors.items() if k != gone}
  with pytest.raises(ValueError, match=f"'{gone}' is missing"):
    hf.load(_copy_with(llama_files.dir, tmp_path / "missing", tensors))
  extra = "model.layers.0.mlp.up_proj.bias"
  tensors = {**llama_files.tensors, extra: np.zeros(96, np.float32),
             "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(12, np.float32)}  # ignored buffer
  with pytest.raises(ValueError, match=r"unexpected tensors.*up_proj.bias") as info:
    hf.load(_copy_with(llama_files.dir, tmp_path / "extra", tensors))
  assert "inv_freq" not in str(info.value)


def test_sharded_checkpoint_loads_like_a_single_file(llama_files, tmp_path):
  llama_files.model.save_pretrained(str(tmp_path), max_shard_size="40KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len({v for v in json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"].values()}) > 1
  _, _, sharded = hf.load(str(tmp_path), param_dtype="bfloat16")
  _, _, single = hf.load(str(llama_files.dir))
  assert sharded["embed"].dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), sharded, single)


def test_save_refuses_configs_the_family_cannot_express(tmp_path):
  cfg = hf.config_from_hf(_hf_dict("gpt_neox")).replace(num_kv_heads=2)
  with pytest.raises(ValueError, match="num_kv_heads=2"):
    hf.config_to_hf(cfg, "GPTNeoXForCausalLM")
  with pytest.raises(ValueError, match="gpt_neox"):
    hf.save(str(tmp_path / "x"), cfg, params={})  # the config is checked before any params
  assert not os.path.exists(tmp_path / "x")


def test_save_writes_the_tokenizer_and_its_special_ids(llama_files, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<pad>", "</s>"] + [f"w{i}" for i in range(fx.VOCAB - 2)]
  backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                   eos_token="</s>")
  cfg, _, params = hf.load(str(llama_files.dir))
  hf.save(str(tmp_path / "out"), cfg, params, tokenizer=tokenizer)
  hf.save(str(tmp_path / "out"), cfg, params, tokenizer=tokenizer)  # overwrite in place
  assert sorted(os.listdir(tmp_path)) == ["out"]
  config = json.load(open(tmp_path / "out" / "config.json"))
  assert (config["pad_token_id"], config["eos_token_id"]) == (0, 1)
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert reloaded("w5 w7")["input_ids"] == tokenizer("w5 w7")["input_ids"] == [7, 9]


def test_hub_id_goes_through_snapshot_download(llama_files, monkeypatch):
  calls = []

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
    calls.append((repo_id, revision, allow_patterns))
    return str(llama_files.dir)

  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  cfg, _, _ = hf.load("some-org/tiny-llama", revision="abc123")
  repo_id, revision, patterns = calls[0]
  assert (repo_id, revision, cfg.model_type) == ("some-org/tiny-llama", "abc123", "llama")
  assert {"config.json", "*.safetensors", "model.safetensors.index.json"} <= set(patterns)
  assert not any("bin" in p for p in patterns)


def test_gpt2_without_prefix_and_with_mask_buffers(tmp_path):
  """Original GPT-2 files name tensors without 'transformer.' and carry attn.bias buffers."""
  fx.build("gpt2", tmp_path / "src", seed=6)
  tensors = load_file(str(tmp_path / "src" / "model.safetensors"))
  bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  bare.update({f"h.{i}.attn.bias": np.ones((1, 1, 64, 64), np.float32) for i in range(2)})
  assert "wte.weight" in bare and not any(k.startswith("transformer.") for k in bare)
  _, _, from_bare = hf.load(_copy_with(tmp_path / "src", tmp_path / "bare", bare))
  _, _, from_prefixed = hf.load(str(tmp_path / "src"))
  jax.tree.map(np.testing.assert_array_equal, from_bare, from_prefixed)


def test_load_places_each_tensor_onto_its_fsdp8_shards(tmp_path):
  """hf.load(shardings=...) puts each device's slice straight onto it; values equal an unsharded
  load bitwise."""
  from p3o_jax import sharding
  path = str(tmp_path)
  fx.build("llama", path)  # hidden 64, GQA: every embed-sized dim splits 8 ways
  mesh = sharding.make_mesh(data=1, fsdp=8)
  place = lambda graph, abstract: sharding.logical_to_mesh(decoder.logical_axes(graph), mesh, shapes=abstract)
  _, _, whole = hf.load(path)
  _, graph, sharded = hf.load(path, shardings=place)
  split = 0
  for (key, a), b in zip(jax.tree_util.tree_leaves_with_path(whole), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))
    assert len(b.addressable_shards) == 8
    for shard in b.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(a)[shard.index])
    if not b.sharding.is_fully_replicated:
      split += 1
      assert all(shard.data.size * 8 == a.size for shard in b.addressable_shards), jax.tree_util.keystr(key)
  assert split >= 5, "embed-sized tensors should be split over fsdp"


def test_weight_matmul_reads_bf16_and_sums_in_fp32():
  """matmul_dtype='bfloat16': both inputs rounded to bf16, the products summed in float32 (NumPy
  float64 on the rounded inputs agrees to float32 rounding), unlike a bf16-summed dot."""
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((2, 3, 512)).astype(np.float32), rng.standard_normal((512, 64)).astype(np.float32)
  cfg = decoder.DecoderConfig(vocab_size=8, hidden_size=512, num_layers=1, num_heads=8, matmul_dtype="bfloat16")
  out = np.asarray(jax.jit(lambda a, b: decoder.weight_matmul(cfg, "btd,df->btf", a, b))(x, w))
  assert out.dtype == np.float32
  rounded = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
  want = np.einsum("btd,df->btf", rounded(x), rounded(w))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
  assert np.abs(out - np.einsum("btd,df->btf", x, w)).max() > 1e-3  # the inputs really were rounded
  bf16_sums = np.asarray(jnp.einsum("btd,df->btf", jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)), np.float64)
  assert np.abs(out - want).max() < 0.1 * np.abs(bf16_sums - want).max()
  # The backward pass multiplies in bf16 too: gradients = float64 products of the bf16-rounded
  # cotangent and operands, returned in float32.
  g = rng.standard_normal(out.shape).astype(np.float32)
  dx, dw = jax.jit(jax.grad(lambda a, b: jnp.sum(decoder.weight_matmul(cfg, "btd,df->btf", a, b) * g), (0, 1)))(x, w)
  assert dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(dx, np.einsum("btf,df->btd", rounded(g), rounded(w)), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, np.einsum("btd,btf->df", rounded(x), rounded(g)), rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="matmul_dtype='int8'"):
    cfg.replace(matmul_dtype="int8")


def test_bf16_matmuls_stay_close_to_fp32_logits(causal):
  """A whole model with bf16 matmul inputs (fp32 weights, activations and sums): its logits err
  against the fp32 reference no more than transformers' bf16 model does."""
  ours, err, theirs = _errors_against_transformers_bf16(causal, matmul_dtype="bfloat16")
  assert 1e-4 < err(ours).max() <= 1.5 * err(theirs).max() + 1e-3, (err(ours).max(), err(theirs).max())
  twin = decoder.with_matmul_dtype(causal.graph, "bfloat16")  # the fp32 model's bf16-matmul twin: same params
  again = np.asarray(_jitted_logits(twin)(causal.params, causal.tokens, causal.mask), np.float32)
  np.testing.assert_array_equal(again, ours)
  assert decoder.with_matmul_dtype(causal.graph, "") is causal.graph
