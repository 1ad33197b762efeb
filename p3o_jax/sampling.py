"""Jitted sampling: prefill each prompt once, decode K responses per prompt with a KV cache.

Shape letters: B prompts, K samples per prompt, R = B*K rows, P prompt bucket length,
N max new tokens, S = P + N cache length, V vocab.

    tokens, mask = pad_prompts(token_lists, bucket=64, pad_id=pad)
    out = generate(graph, params, tokens, mask, rng, max_new_tokens=128, num_samples=2,
                   eos_id=eos, pad_id=pad)
    out.tokens, out.logprobs, out.mask   # [R, N], row b*K + k is sample k of prompt b

How it runs (one jitted function per static setting and shape):
  1. Prefill the left-padded prompts [B, P] into the cache; keep the logits of the last
     position only (left padding puts every prompt's last real token there).
  2. Repeat those logits K times on the batch axis, and give each of the R rows N cache slots
     of its own after its prompt's, which the cache keeps once for all K
     (`decoder.continue_prefix`): a step reads each prompt's keys and values once.
  3. Sample token 0 from the prefill logits, then `lax.while_loop`: feed the previous token at
     cache slot P + step - 1 (position = real prompt length + step - 1), sample the next one.
     The loop ends after N tokens or as soon as every row has emitted EOS.
  Randomness: one uniform per row and step, from key fold_in(rng, step), all drawn before the
  loop; a token is the inverse CDF of its (truncated) distribution at that uniform, so the same
  rng gives the same samples, and the loop body holds no random-bit generation over V.

Log-probabilities. `logprobs` is log softmax(logits / T) at the sampled token, in float32: the
temperature-scaled policy that `decoder.token_logprobs(..., temperature=T)` computes, so sampler
and trainer agree. It is NOT the log-probability under the distribution actually sampled from
when top-k, top-p or min_new_tokens change that distribution (truncation, EOS suppressed): use
T=1, top_k=0, top_p=1 for on-policy RL, or correct for the kept mass yourself.

The KV cache is created inside the jitted function and carried by the while loop, whose buffers
XLA updates in place (`dynamic_update_slice`), so no cache crosses the jit boundary and there is
nothing to donate.

Several devices (`mesh=`): the prompts are split over the mesh's batch axes (data x fsdp).
Where every device holds the whole model (parameters replicated over those axes), each shard
runs the whole prefill + decode loop on its own rows (`shard_map`): no collective runs per
token, and each shard stops as soon as its own rows have finished. Where the parameters are
split (fsdp, as the trainer places them, or tensor > 1), the whole batch decodes as one
partitioned program over the parameters as they lie: XLA moves activations or one weight at a
time inside the loop, so no device ever holds the whole model (tests/test_sampling.py checks
the compiled program's memory). The uniforms are drawn for all rows before the split, so the
samples do not depend on the number of shards. On a multi-core CPU, one host device per core
(`--xla_force_host_platform_device_count`) puts every core to work on a small model.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from p3o_jax import sharding
from p3o_jax.models import decoder

log = logging.getLogger(__name__)

NEG_INF = -jnp.inf


class SampleOutput(NamedTuple):
  tokens: jax.Array         # [R, N] int32 response tokens; pad_id after the first EOS
  logprobs: jax.Array       # [R, N] float32 log softmax(logits / T) of each token; 0 where mask is 0
  mask: jax.Array           # [R, N] int32, 1 up to and including the first EOS
  lengths: jax.Array        # [R] int32 number of response tokens (EOS included)
  finished: jax.Array       # [R] bool, True where the row emitted EOS
  prompt_tokens: jax.Array  # [R, P] the prompts, each repeated K times
  prompt_mask: jax.Array    # [R, P] int32
  num_steps: jax.Array      # [] int32 token positions actually decoded (< N after an early stop)


# ----------------------------------------------------------------------------- prompts

def bucket_length(longest: int, bucket: int | Sequence[int] | None = None) -> int:
  """The padded prompt length: `bucket` itself (int), the smallest of several buckets that
  fits `longest` (the largest one when none does), or the next power of two (None)."""
  if bucket is None:
    return max(1, 1 << max(0, longest - 1).bit_length())
  if isinstance(bucket, int):
    return bucket
  buckets = sorted(bucket)
  return next((b for b in buckets if b >= longest), buckets[-1])


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int | Sequence[int] | None = None,
                pad_id: int = 0, truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to one bucket length -> (tokens [B, P] int32, mask [B, P] int32).

  A prompt longer than the bucket is an error, or, with truncate=True, loses its oldest
  tokens (a warning is logged).
  """
  if not prompts:
    raise ValueError("pad_prompts got no prompts")
  lengths = [len(p) for p in prompts]
  for i, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
  length = bucket_length(max(lengths), bucket)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, prompt in enumerate(prompts):
    if len(prompt) > length:
      if not truncate:
        raise ValueError(f"prompt {i} has {len(prompt)} tokens, longer than the bucket length "
                         f"{length}; raise the bucket or pass truncate=True")
      log.warning("prompt %d truncated from the left: %d -> %d tokens", i, len(prompt), length)
      prompt = prompt[len(prompt) - length:]
    tokens[i, length - len(prompt):] = np.asarray(prompt, np.int32)
    mask[i, length - len(prompt):] = 1
  return tokens, mask


# ----------------------------------------------------------------------------- token choice

def _nucleus_keep(sorted_logits, top_p):
  """[R, C] logits sorted descending -> bool keep mask: the smallest prefix with mass >= top_p.

  A token is kept when the mass strictly before it is < top_p, so the top token always is.
  """
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  return mass_before < top_p


def _below(x):
  """The largest float32 strictly below x (x > 0): keeps a search target inside the total."""
  return jnp.nextafter(x, jnp.zeros_like(x))


def _block_size(size: int) -> int:
  """Scan block for `inverse_cdf`: a divisor of `size` near sqrt(size), which balances the two
  scans and needs no padding copy; sqrt(size) itself (with padding) when none is close."""
  target = max(1, math.isqrt(size))
  divisors = [d for d in range(max(1, target // 2), 2 * target + 1) if size % d == 0]
  return min(divisors, key=lambda d: abs(d - target)) if divisors else target


def inverse_cdf(weights, u, block: int | None = None):
  """Sample index i of each row with probability weights[i] / sum(weights), given u ~ U[0, 1).

  weights: [R, C] >= 0 with a positive entry per row; u: [R]. Returns [R] int32: the first
  index whose running sum exceeds u * total. Two levels (block sums, then one block) keep the
  scans short, and one uniform per row replaces the C Gumbel draws of `categorical`, which
  dominate a decode step's cost on CPU at LM vocabulary sizes. An index of zero weight is never
  returned: the target is kept strictly below each total, and the chosen index is where the
  running sum strictly increases.
  """
  R, C = weights.shape
  block = min(block or _block_size(C), C)
  num_blocks = -(-C // block)
  w = jnp.pad(weights, ((0, 0), (0, num_blocks * block - C))).reshape(R, num_blocks, block)
  pick = lambda b: jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]
  return _two_level_search(w.sum(-1), pick, u, block)


def _two_level_search(block_mass, pick, u, block: int):
  """`inverse_cdf`'s search: block_mass [R, num_blocks] >= 0; pick(b) -> [R, block] the weights
  of block b[r] of each row."""
  cum = jnp.cumsum(block_mass, axis=-1)
  target = jnp.minimum(u * cum[:, -1], _below(cum[:, -1]))
  b = jnp.sum(cum <= target[:, None], axis=-1)               # first block whose running sum > target
  before = jnp.where(b > 0, jnp.take_along_axis(cum, jnp.maximum(b - 1, 0)[:, None], -1)[:, 0], 0.0)
  cum_in = jnp.cumsum(pick(b), axis=-1)
  rest = jnp.minimum(target - before, _below(cum_in[:, -1]))
  j = jnp.sum(cum_in <= rest[:, None], axis=-1)
  return (b * block + j).astype(jnp.int32)


def sample_vocab_first(logits, u, temperature, eos_id: int, eos_forbidden):
  """Sample one token per row from [V, R] logits (a vocabulary-first head's output), at
  temperature T, with EOS excluded while eos_forbidden: the distribution `inverse_cdf` draws from
  in the [R, V] layout, at the same uniform u [R].

  Returns (token [R] int32, log softmax(logits / T) at the token [R], EOS's mass included). Two
  passes read all V x R logits, the peak and each block's mass; the chosen block's weights, EOS's
  block without EOS and the token's logit are gathered afterwards and recomputed. (The [R, V]
  layout's own steps, run on [V, R], write three V x R intermediates, and a mask inside the block
  sums keeps XLA from fusing them: either cost as much as the layout saves.)
  """
  V, R = logits.shape
  block = _block_size(V)
  num_blocks = -(-V // block)
  logits = logits.astype(jnp.float32)
  peak = jnp.max(logits, axis=0) / temperature  # max(logits / T): dividing by T > 0 keeps the order
  padded = jnp.pad(logits, ((0, num_blocks * block - V), (0, 0)), constant_values=NEG_INF)
  padded = padded.reshape(num_blocks, block, R)
  block_mass = jnp.exp(padded / temperature - peak).sum(1).T                     # [R, num_blocks]
  log_z = jnp.log(block_mass.sum(-1)) + peak

  def weights(x, x_peak, ids):  # exp(x / T - peak), EOS's weight 0 while forbidden
    return jnp.where((ids == eos_id) & eos_forbidden, 0.0, jnp.exp(x / temperature - x_peak))
  eos_block = eos_id // block
  without_eos = weights(padded[eos_block], peak, eos_block * block + jnp.arange(block)[:, None]).sum(0)
  draw_mass = block_mass.at[:, eos_block].set(without_eos)

  def pick(b):  # [R, block]: the weights of block b[r] of row r
    in_block = jnp.take_along_axis(padded, b[None, None, :], axis=0)[0].T
    return weights(in_block, peak[:, None], b[:, None] * block + jnp.arange(block))
  token = _two_level_search(draw_mass, pick, u, block)
  logprob = jnp.take_along_axis(logits, token[None, :], axis=0)[0] / temperature - log_z
  return token, logprob


def _choose(logits, probs, u, *, greedy: bool, top_k: int, use_top_p: bool, top_p):
  """Pick one token per row. logits: [R, V] float32, temperature-scaled, -inf where forbidden;
  probs: [R, V] the matching unnormalised exp(logits - max); u: [R] uniform draws."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if top_k == 0 and not use_top_p:
    return inverse_cdf(probs, u)
  # Work on the candidates in descending order: the top-k (cheap partial sort) or the whole
  # vocabulary (top-p only), then map the chosen rank back to its token id.
  k = top_k or logits.shape[-1]
  cand_logits, cand_ids = jax.lax.top_k(logits, k)  # [R, C]
  cand_probs = jnp.exp(cand_logits - cand_logits[:, :1])
  if use_top_p:
    cand_probs = jnp.where(_nucleus_keep(cand_logits, top_p), cand_probs, 0.0)
  rank = inverse_cdf(cand_probs, u)
  return jnp.take_along_axis(cand_ids, rank[:, None], axis=-1)[:, 0]


class _Loop(NamedTuple):
  step: jax.Array      # [] int32 index of the next token to write
  token: jax.Array     # [R] int32 the last written token (input of the next forward)
  tokens: jax.Array    # [R, N] int32
  logprobs: jax.Array  # [R, N] float32
  lengths: jax.Array   # [R] int32
  done: jax.Array      # [R] bool
  cache: list          # per layer: S = P + N slots for each of R rows (a PrefixedCache when K > 1)


# ----------------------------------------------------------------------------- the jitted sampler

def _sample_fn(graph, *, max_new_tokens: int, num_samples: int, top_k: int, use_top_p: bool,
               greedy: bool, eos_id: int, pad_id: int, stop: tuple[tuple[int, ...], ...] = ()):
  """The pure function that `generate` jits; static settings are closed over."""
  N, K = max_new_tokens, num_samples

  def run(params, prompt_tokens, prompt_mask, uniforms, temperature, top_p, min_new_tokens):
    """uniforms: [N, B*K] one draw per step and row (`_uniforms`)."""
    model = decoder.merge(graph, params)
    B, P = prompt_tokens.shape
    prompt_valid = prompt_mask.astype(bool)
    prompt_len = prompt_valid.sum(-1).astype(jnp.int32)

    # 1. Prefill once per prompt, into P cache slots its K samples share (step 2); logits of the
    # last (always real) position only.
    last = jnp.full((B, 1), P - 1, jnp.int32)  # the last layer runs on that position alone
    hidden, cache = model(prompt_tokens, decoder.positions_from_mask(prompt_valid),
                          decoder.causal_mask(prompt_valid), decoder.init_cache(model.cfg, B, P), 0,
                          outputs_at=last)
    first_logits = model.logits(hidden)[:, 0]  # [B, V]
    model.stack_projections()  # the loop's weights as it reads them best, laid out once
    # [R, V] logits, or [V, R] where that is faster and the token choice can read them so
    step_logits, vocab_first = model.decoding_logits(
        allow_vocab_first=not (greedy or top_k or use_top_p))

    # 2. K samples per prompt, row b*K + k: each with N cache slots of its own after its
    # prompt's, which the cache keeps once for all K.
    rep = lambda x: jnp.repeat(x, K, axis=0)
    cache = decoder.continue_prefix(cache, K, N)
    first_logits, prompt_len, prompt_valid = rep(first_logits), rep(prompt_len), rep(prompt_valid)
    R = B * K
    slots = jnp.arange(P + N)
    key_valid_prompt = jnp.pad(prompt_valid, ((0, 0), (0, N)))  # [R, S]; generated slots added per step
    is_eos = jnp.arange(first_logits.shape[-1]) == eos_id

    def emit(state: _Loop, logits, vocab_first: bool = False) -> _Loop:
      """Sample token `state.step` from [R, V] logits (or [V, R] if vocab_first: plain sampling
      only) and write it (pad once a row is done)."""
      step = state.step
      if vocab_first:
        token, logprob = sample_vocab_first(logits, uniforms[step], temperature, eos_id,
                                            step < min_new_tokens)
        return write(state, token, logprob)
      scaled = logits.astype(jnp.float32) / temperature
      peak = jnp.max(scaled, axis=-1, keepdims=True)
      probs = jnp.exp(scaled - peak)  # one exp over V serves both log Z and the sampler
      log_z = jnp.log(probs.sum(-1)) + peak[:, 0]
      forbid = is_eos & (step < min_new_tokens)
      token = _choose(jnp.where(forbid, NEG_INF, scaled), jnp.where(forbid, 0.0, probs),
                      uniforms[step], greedy=greedy, top_k=top_k,
                      use_top_p=use_top_p, top_p=top_p)
      logprob = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - log_z
      return write(state, token, logprob)

    def write(state: _Loop, token, logprob) -> _Loop:
      step = state.step
      live = ~state.done
      out_token = jnp.where(live, token, pad_id)
      tokens = jax.lax.dynamic_update_index_in_dim(state.tokens, out_token, step, axis=1)
      ends = token == eos_id
      for sequence in stop:  # a live row's last len(sequence) tokens are all its own
        width = len(sequence)
        last = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(step - width + 1, 0), width, axis=1)
        ends |= (step >= width - 1) & jnp.all(last == jnp.asarray(sequence, jnp.int32), axis=1)
      return _Loop(
          step=step + 1,
          token=out_token,
          tokens=tokens,
          logprobs=jax.lax.dynamic_update_index_in_dim(
              state.logprobs, jnp.where(live, logprob, 0.0), step, axis=1),
          lengths=state.lengths + live.astype(jnp.int32),
          done=state.done | (live & ends),
          cache=state.cache)

    def keep_going(state: _Loop):
      return (state.step < N) & ~jnp.all(state.done)

    def decode_step(state: _Loop) -> _Loop:
      # Feed the token written at step - 1: cache slot P + step - 1, position prompt_len + step - 1.
      prev = state.step - 1
      key_valid = key_valid_prompt | ((slots >= P) & (slots <= P + prev))[None, :]
      hidden, cache = model(state.token[:, None], (prompt_len + prev)[:, None],
                            key_valid[:, None, :], state.cache, P + prev)
      return emit(state._replace(cache=cache), step_logits(hidden), vocab_first)

    # 3. Token 0 from the prefill, then one forward per further token.
    state = _Loop(step=jnp.int32(0), token=jnp.zeros((R,), jnp.int32),
                  tokens=jnp.full((R, N), pad_id, jnp.int32),
                  logprobs=jnp.zeros((R, N), jnp.float32),
                  lengths=jnp.zeros((R,), jnp.int32), done=jnp.zeros((R,), bool), cache=cache)
    state = jax.lax.while_loop(keep_going, decode_step, emit(state, first_logits))

    return SampleOutput(
        tokens=state.tokens, logprobs=state.logprobs,
        mask=(jnp.arange(N)[None, :] < state.lengths[:, None]).astype(jnp.int32),
        lengths=state.lengths, finished=state.done,
        prompt_tokens=rep(prompt_tokens), prompt_mask=rep(prompt_mask).astype(jnp.int32),
        num_steps=state.step)

  return run


def _uniforms(rng, steps: int, rows: int):
  """[steps, rows] U[0, 1) draws: step n uses key fold_in(rng, n), so a row's draws do not
  depend on how many steps or shards there are."""
  draw = lambda step: jax.random.uniform(jax.random.fold_in(rng, step), (rows,), jnp.float32)
  return jax.vmap(draw)(jnp.arange(steps))


def _batch_axes(mesh: Mesh | None) -> tuple[str, ...]:
  """The mesh axes that split the batch (size > 1 only); () means one shard, as does a mesh
  that also splits the model (tensor > 1): its collectives inside the decode loop would need
  every device at every step, so such a mesh decodes the whole batch as one program."""
  if mesh is None:
    return ()
  spec = sharding.logical_to_spec(("batch",), mesh)[0]
  axes = tuple(a for a in ((spec,) if isinstance(spec, str) else tuple(spec or ())) if mesh.shape[a] > 1)
  if any(size > 1 for name, size in mesh.shape.items() if name not in axes):
    return ()
  return axes


def _split_axes(params) -> set[str]:
  """Mesh axes along which some parameter is split (not replicated)."""
  axes = set()
  for leaf in jax.tree.leaves(params):
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    for entry in spec or ():
      axes.update((entry,) if isinstance(entry, str) else tuple(entry or ()))
  return axes


def _loop_axes(mesh: Mesh | None, split_axes: set[str]) -> tuple[str, ...]:
  """The batch axes that each run their own decode loop (shard_map): none when a parameter is
  split along one of them (`split_axes`, e.g. fsdp), since a per-shard loop needs the whole
  model on every device."""
  axes = _batch_axes(mesh)
  return () if split_axes & set(axes) else axes


def _row_uniforms(rng, steps: int, samples: int, total_prompts: int, prompt_ids):
  """The uniforms of rows prompt_ids[b] * samples + k of a `total_prompts`-prompt batch: a chunk
  of a rollout draws exactly what the whole rollout would for its rows."""
  rows = (prompt_ids[:, None] * samples + jnp.arange(samples)[None]).reshape(-1)
  return jnp.take(_uniforms(rng, steps, total_prompts * samples), rows, axis=1)


def _jitted(graph, *, mesh: Mesh | None, axes: tuple[str, ...], total_prompts: int, **static):
  """generate's jitted function: rng in, uniforms drawn inside, then one decode loop for the
  whole batch (partitioned over the inputs' shardings), or one per shard of `axes` of `mesh`."""
  run = _sample_fn(graph, **static)
  steps, samples = static["max_new_tokens"], static["num_samples"]
  draw = lambda rng, prompt_ids: _row_uniforms(rng, steps, samples, total_prompts, prompt_ids)
  if not axes:
    def whole(params, prompt_tokens, prompt_mask, rng, prompt_ids, *settings):
      out = run(params, prompt_tokens, prompt_mask, draw(rng, prompt_ids), *settings)
      if mesh is None:
        return out
      # Rows leave split over the batch axes, as the per-shard loops leave them.
      rows = NamedSharding(mesh, sharding.logical_to_spec(("batch",), mesh, shape=out.tokens.shape[:1]))
      return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows) if x.ndim else x, out)
    return jax.jit(whole)

  rows, replicated = PartitionSpec(axes), PartitionSpec()

  def per_shard(params, prompt_tokens, prompt_mask, uniforms, *settings):
    out = run(params, prompt_tokens, prompt_mask, uniforms, *settings)
    return out._replace(num_steps=out.num_steps[None])  # one count per shard

  sharded_run = jax.shard_map(
      per_shard, mesh=mesh, axis_names=frozenset(axes), check_vma=False,
      in_specs=(replicated, rows, rows, PartitionSpec(None, axes), replicated, replicated, replicated),
      out_specs=SampleOutput(*([rows] * len(SampleOutput._fields))))

  def split(params, prompt_tokens, prompt_mask, rng, prompt_ids, *settings):
    uniforms = draw(rng, prompt_ids)
    uniforms = jax.lax.with_sharding_constraint(uniforms, NamedSharding(mesh, PartitionSpec(None, axes)))
    out = sharded_run(params, prompt_tokens, prompt_mask, uniforms, *settings)
    return out._replace(num_steps=out.num_steps.max())

  return jax.jit(split)


_COMPILED: dict = {}
_GRAPH_KEYS: dict = {}
_STRUCTURES: dict = {}


def _graph_key(graph: decoder.Graph) -> int:
  """A small int naming the graph's structure: its graphdef plus every parameter's shape and
  dtype. Memoised per graph object: flattening the template, or even hashing the graphdef,
  costs more than a small decode step."""
  held = _GRAPH_KEYS.get(id(graph.template))
  if held is None or held[0] is not graph.template:
    leaves, treedef = jax.tree_util.tree_flatten(graph.template)
    structure = (graph.graphdef, treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))
    held = _GRAPH_KEYS[id(graph.template)] = (graph.template, _STRUCTURES.setdefault(structure, len(_STRUCTURES)))
  return held[1]


def _compiled(graph: decoder.Graph, mesh: Mesh | None, axes: tuple[str, ...], **static):
  key = (_graph_key(graph), mesh, axes, tuple(sorted(static.items())))
  if key not in _COMPILED:
    _COMPILED[key] = _jitted(graph, mesh=mesh, axes=axes, **static)
  return _COMPILED[key]


def stop_sequences(tokenizer, texts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """sampler.stop's strings as the token sequences the sampler stops after: each string as the
  tokenizer writes it alone and as it writes it after other text (a SentencePiece tokenizer
  writes a word-initial piece differently there), without repeats."""
  if isinstance(texts, str):
    raise TypeError(f"sampler.stop must be a list of strings, got the string {texts!r}")
  if not texts:
    return ()
  out = []
  before = tokenizer(".", add_special_tokens=False)["input_ids"]
  for text in texts:
    if not isinstance(text, str) or not text:
      raise ValueError(f"sampler.stop holds {text!r}; each stop must be a non-empty string")
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    after = tokenizer("." + text, add_special_tokens=False)["input_ids"]
    variants = [alone] + ([after[len(before):]] if after[:len(before)] == before else [])
    out += [tuple(int(t) for t in v) for v in variants if v]
  return tuple(dict.fromkeys(out))


def generate(graph: decoder.Graph, params: dict, prompt_tokens, prompt_mask, rng, *,
             max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, eos_id: int,
             pad_id: int, greedy: bool = False, mesh: Mesh | None = None,
             prompt_ids=None, total_prompts: int | None = None,
             stop: Sequence[Sequence[int]] = ()) -> SampleOutput:
  """Sample `num_samples` responses for each LEFT-padded prompt.

  prompt_tokens, prompt_mask: [B, P] (see `pad_prompts`); rng: a PRNG key.
  Returns a SampleOutput with R = B * num_samples rows, prompt-major (row b*K + k).

  Compiled once per (model, shapes, max_new_tokens, num_samples, top_k, greedy, whether
  top_p < 1, eos_id, pad_id, mesh); temperature, top_p and min_new_tokens are traced and may
  change freely. top_k=0 and top_p=1 mean no truncation; with greedy=True the argmax is taken
  (log-probs are still reported under logits / temperature).

  mesh: decode each batch shard (mesh axes data x fsdp) on its own devices with its own loop;
  B must be divisible by the number of shards, else the whole batch runs as one (logged), as
  it does on a mesh with tensor > 1 and when `params` are split along a batch axis (fsdp): one
  program over the parameters as placed, never gathered whole on a device.
  The same rng gives the same samples with or without a mesh.

  prompt_ids, total_prompts: these prompts are rows `prompt_ids` [B] of a batch of
  `total_prompts` (a chunk of a rollout); each row then samples with the randomness it has in
  the whole batch, so a rollout sampled chunk by chunk equals the one sampled at once.

  stop: token sequences (`stop_sequences`) a row stops after, as after EOS; the sequence is the
  response's end. Matched as ids: a sample that spells a stop string with other tokens goes on.
  """
  if np.ndim(prompt_tokens) != 2 or np.shape(prompt_tokens) != np.shape(prompt_mask):
    raise ValueError(f"prompt_tokens {np.shape(prompt_tokens)} and prompt_mask {np.shape(prompt_mask)} "
                     "must both be [B, P]")
  if max_new_tokens < 1 or num_samples < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} and num_samples={num_samples} must be >= 1")
  if not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(f"min_new_tokens={min_new_tokens} must lie in [0, max_new_tokens={max_new_tokens}]")
  if not greedy and not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0 (use greedy=True for argmax)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must lie in (0, 1]")
  vocab_size = graph.template["embed"].shape[0]
  if not 0 <= top_k <= vocab_size:
    raise ValueError(f"top_k={top_k} must lie in [0, vocab_size={vocab_size}] (0 disables it)")
  if not 0 <= eos_id < vocab_size:
    raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab_size})")
  if "pos_embed" in graph.template:  # learned positions end; rotary ones do not
    max_positions = graph.template["pos_embed"].shape[0]
    if np.shape(prompt_tokens)[1] + max_new_tokens > max_positions:
      raise ValueError(f"prompt length {np.shape(prompt_tokens)[1]} + max_new_tokens {max_new_tokens} "
                       f"exceeds the model's {max_positions} learned positions")
  if not isinstance(prompt_mask, jax.core.Tracer):
    held = ([np.asarray(s.data) for s in prompt_mask.addressable_shards]  # this process's rows only
            if isinstance(prompt_mask, jax.Array) else [np.asarray(prompt_mask)])
    last_col = np.concatenate([h[:, -1] for h in held])
    if not last_col.all():
      raise ValueError(f"prompts must be LEFT-padded: rows {np.flatnonzero(last_col == 0).tolist()} "
                       "end in padding (use pad_prompts)")
  stop = tuple(tuple(int(t) for t in seq) for seq in stop if len(seq) <= max_new_tokens)  # longer: never met
  if any(not seq or not all(0 <= t < vocab_size for t in seq) for seq in stop):
    raise ValueError(f"stop sequences {stop} must be non-empty and inside the vocabulary [0, {vocab_size})")
  split_axes = _split_axes(params)
  axes = _loop_axes(mesh, split_axes)
  shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if np.shape(prompt_tokens)[0] % shards:
    log.warning("generate: %d prompts do not split over %d batch shards; decoding them as one batch",
                np.shape(prompt_tokens)[0], shards)
    axes = ()
  if not axes and (mesh is None or mesh.size == 1 or not split_axes):
    mesh = None  # one program on the inputs' devices
  batch = np.shape(prompt_tokens)[0]
  if prompt_ids is None:
    prompt_ids, total_prompts = np.arange(batch), batch
  if total_prompts is None or np.shape(prompt_ids) != (batch,):
    raise ValueError(f"prompt_ids must hold one id per prompt ({batch}) and come with total_prompts")
  run = _compiled(graph, mesh, axes, max_new_tokens=int(max_new_tokens), num_samples=int(num_samples),
                  top_k=int(top_k), use_top_p=bool(top_p < 1.0), greedy=bool(greedy),
                  eos_id=int(eos_id), pad_id=int(pad_id), total_prompts=int(total_prompts), stop=stop)
  as_int32 = lambda x: x if getattr(x, "dtype", None) == np.int32 else np.asarray(x, np.int32)
  return run(params, as_int32(prompt_tokens), as_int32(prompt_mask), rng, as_int32(prompt_ids),
             np.float32(temperature if temperature > 0 else 1.0), np.float32(top_p),
             np.int32(min_new_tokens))
