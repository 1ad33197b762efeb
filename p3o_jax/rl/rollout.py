"""Rollout: K responses per prompt from the jitted sampler, scored, with old and reference
log-probs and the sequence KL. Everything here runs once per RL iteration, outside the
update; every arrow is a jitted function.

Rows are prompt-major: row b * K + k is the k-th response to prompt b.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import host_devices, sampling, sharding
from p3o_jax.data import batching
from p3o_jax.models import decoder
from p3o_jax.rl import sequences


class RewardSource(Protocol):
  """Scores rows (query, query_mask, response, response_mask).

  A source with `on_device = True` takes the global device arrays and returns a global [N]
  array (a reward model); any other source takes this process's rows as NumPy and returns
  their scores (a Python function: each process scores its own rows).
  """
  def __call__(self, query, query_mask, response, response_mask) -> np.ndarray: ...


class ModelReward:
  """A Flax reward model (scalar head read at the last real token). `score_fn` is the pure
  function, so the Roller can run it in the same program as the log-prob passes."""
  on_device = True

  def __init__(self, graph, params):
    self.params = params
    self.score_fn = functools.partial(sequences.response_scores, graph)
    self._score = jax.jit(self.score_fn)

  def __call__(self, query, query_mask, response, response_mask):
    return self._score(self.params, query, query_mask, response, response_mask)


class TextReward:
  """Any Python function of the decoded texts: fn(prompts: list[str], responses: list[str]).

  It also gets the prompt dataset's other columns, one value per row, as keyword arguments (as
  TRL's reward functions do): a verifiable reward reads each prompt's answer from them, e.g.
  fn(prompts, responses, answer). A column is passed when fn takes **kwargs or a parameter of
  its name, so a function of the texts alone is called as it always was.
  """

  def __init__(self, fn: Callable, tokenizer):
    self.fn, self.tokenizer = fn, tokenizer
    try:
      params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a callable without a signature: texts alone
      params = []
    self._all_columns = any(p.kind is p.VAR_KEYWORD for p in params)
    self._columns = {p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    self.reads_columns = self._all_columns or bool(self._columns)  # else the callers gather none

  def __call__(self, query, query_mask, response, response_mask, columns: dict | None = None):
    prompts, responses = decode_rows(self.tokenizer, query, query_mask, response, response_mask)
    given = {name: list(values) for name, values in (columns or {}).items()
             if name not in ("prompts", "responses") and (self._all_columns or name in self._columns)}
    for name, values in given.items():
      if len(values) != len(prompts):
        raise ValueError(f"column {name!r} has {len(values)} values for {len(prompts)} rows")
    return np.asarray(self.fn(prompts, responses, **given), np.float32)


def score_rows(reward: RewardSource, rows: sharding.RowSplit, device: dict, host: dict,
               columns: dict | None = None) -> np.ndarray:
  """This process's scores from `reward`, given the rows as global arrays and as local NumPy;
  `columns`: the dataset's other columns for these rows, for a host-side reward."""
  names = ("query", "query_mask", "response", "response_mask")
  if getattr(reward, "on_device", False):
    return rows.local(reward(*(device[n] for n in names)))
  return np.asarray(reward(*(host[n] for n in names), **({"columns": columns} if columns else {})))


def decode_rows(tokenizer, query, query_mask, response, response_mask):
  """Texts of the real tokens only: masks, never token ids, decide what is real (docs/pitfalls.md, 2).

  The response keeps special tokens other than its final EOS, so a stray pad or BOS that the
  policy emitted is scored as what it is rather than silently dropped.
  """
  query, query_mask = np.asarray(query), np.asarray(query_mask).astype(bool)
  response, response_mask = np.asarray(response), np.asarray(response_mask).astype(bool)
  eos = tokenizer.eos_token_id
  prompts = tokenizer.batch_decode([q[m] for q, m in zip(query, query_mask)], skip_special_tokens=True)
  kept = []
  for r, m in zip(response, response_mask):
    ids = r[m]
    kept.append(ids[:-1] if len(ids) and ids[-1] == eos else ids)
  return prompts, tokenizer.batch_decode(kept, skip_special_tokens=False)


@dataclasses.dataclass
class Experience:
  """One rollout: this process's rows, as host arrays (all N = prompts * K rows in one process)."""
  query: np.ndarray           # [n, P] left-padded
  query_mask: np.ndarray      # [n, P]
  response: np.ndarray        # [n, R] right-padded after EOS
  response_mask: np.ndarray   # [n, R] 1 up to and including the first EOS
  logp_old: np.ndarray | None  # [n, R] per-token, the trainer's forward of the policy that sampled
                               # (None: the pass was skipped, see Roller.__call__'s old_pass)
  logp_ref: np.ndarray        # [n, R] per-token, under the frozen reference
  scores: np.ndarray          # [n] reward source output, after the missing-EOS penalty
  has_eos: np.ndarray         # [n] bool
  k: int                      # responses per prompt
  logp_sampler: np.ndarray | None = None  # [n, R] the sampler's own log-probs (rollout IS correction)
  values: np.ndarray | None = None  # [n, R] when the algorithm has a critic
  gold: np.ndarray | None = None    # [n] the demo's gold reward, for logging
  rows: sharding.RowSplit | None = None  # which of the N global rows these are (None: all)

  @property
  def logp_policy(self) -> np.ndarray:
    """[n, R] the sampling policy's per-token log-probs, for statistics: the trainer's old pass,
    or where it was skipped the sampler's own (then the same weights in the same dtypes)."""
    return self.logp_old if self.logp_old is not None else self.logp_sampler

  @property
  def seq_kl(self) -> np.ndarray:
    """k1 estimate of KL(pi || pi_ref) per response: sum_t log pi - log pi_ref (docs/pitfalls.md, 4)."""
    return ((self.logp_policy - self.logp_ref) * self.response_mask).sum(-1)

  def all_rows(self, x) -> np.ndarray:
    """A per-row array of this process's rows -> all N rows in global order (for statistics)."""
    return np.asarray(x) if self.rows is None else self.rows.gather(x)

  def own(self, everything) -> np.ndarray:
    """The inverse of all_rows: this process's rows of an all-N-rows array."""
    everything = np.asarray(everything)
    return everything if self.rows is None or self.rows.replicated else everything[self.rows.rows]

  @property
  def num_response_tokens(self) -> int:
    return int(self.all_rows(self.response_mask.sum(-1)).sum())


class Roller:
  """Samples and scores. Holds the jitted functions so they compile once per shape.

  Built by `make_roller` from the config. `sampler_dtype` ('float32' | 'bfloat16') is the dtype
  the sampler reads the policy's weights in, as an inference engine serving bf16 weights would;
  the trainer's old log-probs always come from the weights as stored, and the sampler's own
  log-probs are kept beside them for the rollout importance correction.
  """

  def __init__(self, graph, ref_params, reward: RewardSource, *, sampler_cfg, eos_id: int, pad_id: int,
               missing_eos_penalty: float | None = None, gold: RewardSource | None = None, mesh=None,
               sampler_dtype: str = "float32", sampler_matmul_dtype: str = "", ref_matmul_dtype: str = "",
               sample_devices=None, stop: tuple = ()):
    self.graph, self.ref_params, self.reward, self.gold = graph, ref_params, reward, gold
    self.stop = stop  # token sequences a response ends with, as with EOS (sampling.stop_sequences)
    # The sampler and the reference may read the policy's weights in other matmul dtypes
    # (decoder.weight_matmul); the trainer's old log-probs always use the policy's own.
    self.sampler_graph = decoder.with_matmul_dtype(graph, sampler_matmul_dtype)
    self.ref_graph = decoder.with_matmul_dtype(graph, ref_matmul_dtype)
    # Each batch shard of the mesh samples its own rows (sampling.generate); without a mesh,
    # one device does everything.
    self.mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    # `sample_devices` (single process; host_devices.sampler_devices): the sampler decodes on a
    # data mesh of its own, the passes and the update stay on `mesh`; the samples are the same.
    self.sample_mesh = self.mesh if not sample_devices else sharding.make_mesh(-1, 1, 1, devices=sample_devices)
    self.sampler_cfg, self.eos_id, self.pad_id = sampler_cfg, eos_id, pad_id
    self.missing_eos_penalty = missing_eos_penalty
    self._sampler_weights = None if sampler_dtype == "float32" else jax.jit(
        lambda p: jax.tree.map(lambda x: x.astype(sampler_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, p))
    self._passes: dict = {}

  @property
  def samples_as_trainer(self) -> bool:
    """Whether the sampler reads the policy's weights as the trainer does (dtypes, matmuls)."""
    return self._sampler_weights is None and self.sampler_graph is self.graph

  def _teacher_forced(self, out_sharding, k: int, value_fn, score_fn=None, old_pass: bool = True):
    """One jitted program for every teacher-forced pass over the rows: old (unless `old_pass`
    is off) and reference log-probs, the critic's values and the reward model's scores
    (`score_fn`, when the reward is a model), its outputs laid out row-split like the batch."""
    key = (out_sharding, k, value_fn, score_fn, old_pass)
    if key not in self._passes:
      logprobs = functools.partial(sequences.response_logprobs, temperature=self.sampler_cfg.temperature)

      def passes(params, ref_params, value_params, reward_params, query, query_mask, response, response_mask,
                 logp_sampler):
        # Each prompt once, before its k responses (sequences: the prompt's work is done once).
        rows = (query, query_mask, response, response_mask)
        out = {"query": jnp.repeat(query, k, axis=0), "query_mask": jnp.repeat(query_mask, k, axis=0),
               "response": response, "response_mask": response_mask,
               "logp_ref": logprobs(self.ref_graph, ref_params, *rows), "logp_sampler": logp_sampler}
        if old_pass:  # old log-probs from the trainer's own forward: the first inner step's ratio is exactly 1
          out["logp_old"] = logprobs(self.graph, params, *rows)
        if value_fn is not None:
          out["values"] = value_fn(value_params, *rows)
        if score_fn is not None:
          out["scores"] = score_fn(reward_params, *rows)
        return out
      self._passes[key] = jax.jit(passes, out_shardings=out_sharding)
    return self._passes[key]

  def __call__(self, params, query, query_mask, rng, k: int, baseline: np.ndarray | None = None,
               split: sharding.RowSplit | None = None, critic: tuple[Callable, object] | None = None,
               chunk: int | None = None, old_pass: bool = True, ref_params=None,
               columns: dict | None = None, greedy: bool = False) -> Experience:
    """query, query_mask: the prompts' rows this process feeds, [len(split.rows), P] (all rows
    without `split`); baseline: their per-prompt rewards subtracted from each of the K scores;
    columns: {name: one value per prompt, the same prompts}, the dataset's other columns, which a
    host-side reward gets for each of the prompt's K rows (`TextReward`);
    critic: (values(params, query, query_mask, response, response_mask) -> [N, R], its params);
    chunk: sample, score and teacher-force `chunk` prompts at a time (of the split's n), so one
    chunk's KV cache and activations are the peak; the result equals one chunk's.
    old_pass=False (the algorithm's `skips_old_pass`): no old-policy pass, logp_old None; kept
    when the sampler reads the weights otherwise than the trainer, whose statistics
    (`Experience.logp_policy`) then need it.
    ref_params: the reference's params for this call, where the Roller was built without them
    (a LoRA policy's frozen model is its reference, read from the train state at each call).
    greedy: each response the argmax at every step (a held-out accuracy as verl's validation
    reports it), not a sample.
    """
    old_pass = old_pass or not self.samples_as_trainer
    split = split or sharding.RowSplit(len(query), self.mesh)
    columns = {name: list(values) for name, values in (columns or {}).items()}
    chunk = split.n if not chunk or chunk >= split.n else int(chunk)
    if split.n % chunk:
      raise ValueError(f"rl.rollout_chunk={chunk} must divide the {split.n} prompts of a rollout")
    count, held = split.n // chunk, len(split.rows)
    if held % count:
      raise ValueError(f"this process holds {held} of the {split.n} prompts; rl.rollout_chunk={chunk} "
                       f"cuts them into {count} chunks")
    # Chunk c is every process's c-th block of its own rows, so no process reads a prompt it
    # does not hold; `prompt_ids` tells the sampler where each of the chunk's rows sits in the
    # whole rollout, so it draws the randomness that row would draw there.
    parts, mine = [], held // count
    for c in range(count):
      piece = slice(c * mine, (c + 1) * mine)
      part = split if count == 1 else sharding.RowSplit(chunk, self.mesh)
      if len(part.rows) != mine:
        raise ValueError(f"rl.rollout_chunk={chunk}: a chunk would give this process {len(part.rows)} prompts, "
                         f"but it holds {mine} per chunk; choose a chunk that data x fsdp divides")
      prompt_ids = np.arange(split.n) if count == 1 else part.gather(np.asarray(split.rows)[piece])
      piece_columns = {name: values[piece] for name, values in columns.items()}
      parts.append(self._chunk(params, np.asarray(query)[piece], np.asarray(query_mask)[piece], rng, k, part,
                               critic, prompt_ids, split.n, old_pass, ref_params, piece_columns, greedy))
    host = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    rows = split.repeat(k)
    has_eos = host.pop("finished")  # ended with EOS or a stop sequence, as the sampler saw it
    scores = host.pop("scores")
    if baseline is not None:
      scores = scores - np.repeat(np.asarray(baseline, np.float32), k)
    if self.missing_eos_penalty is not None:
      scores = scores - self.missing_eos_penalty * (~has_eos)
    return Experience(
        query=host["query"], query_mask=host["query_mask"], response=host["response"],
        response_mask=host["response_mask"], logp_old=host.get("logp_old"), logp_ref=host["logp_ref"],
        scores=scores, has_eos=has_eos, k=k, logp_sampler=host["logp_sampler"], values=host.get("values"),
        gold=host.get("gold"), rows=rows)

  def _chunk(self, params, query, query_mask, rng, k, split, critic, prompt_ids, total_prompts,
             old_pass: bool = True, ref_params=None, columns: dict | None = None, greedy: bool = False) -> dict:
    """One chunk of prompts: sampled, teacher-forced and scored; this process's rows as NumPy."""
    ref_params = self.ref_params if ref_params is None else ref_params
    if ref_params is None:
      raise ValueError("this Roller was built without reference params: pass ref_params to each call")
    rows = split.repeat(k)
    host_prompts = {"query": np.asarray(query, np.int32), "query_mask": np.asarray(query_mask, np.int32)}
    prompts = split.to_global(host_prompts)
    sample_params = params if self._sampler_weights is None else self._sampler_weights(params)
    apart = self.sample_mesh is not self.mesh
    if apart:  # device to device copies, no host round trip
      sample_params = sharding.replicate_onto(sample_params, self.sample_mesh)
      sample_prompts = sharding.RowSplit(split.n, self.sample_mesh).to_global(host_prompts)
    else:
      sample_prompts = prompts
    s = self.sampler_cfg
    out = sampling.generate(
        self.sampler_graph, sample_params, sample_prompts["query"], sample_prompts["query_mask"], rng,
        max_new_tokens=s.max_new_tokens, num_samples=k, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        min_new_tokens=s.get("min_new_tokens", 0), eos_id=self.eos_id, pad_id=self.pad_id, mesh=self.sample_mesh,
        prompt_ids=prompt_ids, total_prompts=total_prompts, stop=self.stop, greedy=greedy)
    if apart:
      out = out._replace(**dict(zip(("tokens", "mask", "logprobs"), jax.device_put(
          (out.tokens, out.mask, out.logprobs), rows.sharding))))
    value_fn, value_params = critic if critic is not None else (None, None)
    score_fn = getattr(self.reward, "score_fn", None)
    device = self._teacher_forced(rows.sharding, k, value_fn, score_fn, old_pass)(  # dispatched, not awaited
        params, ref_params, value_params, self.reward.params if score_fn else None, prompts["query"],
        prompts["query_mask"], out.tokens, out.mask.astype(jnp.int32), out.logprobs)
    # The rewards not already in that program: host-side ones (Python functions, the demo's gold
    # reward) read the sampler's rows while the device still runs the passes; on-device ones
    # read the passes' rows.
    sources = {name: r for name, r in (("scores", None if score_fn else self.reward), ("gold", self.gold))
               if r is not None}
    on_host = {name: r for name, r in sources.items() if not getattr(r, "on_device", False)}
    # Rows are prompt-major: row b * k + j answers this chunk's prompt b.
    row_columns = {name: [v for v in values for _ in range(k)] for name, values in (columns or {}).items()}
    scored = {}
    if on_host:
      sampled = {name: rows.local(x) for name, x in (("query", out.prompt_tokens), ("query_mask", out.prompt_mask),
                                                      ("response", out.tokens), ("response_mask", out.mask))}
      scored = {name: score_rows(r, rows, None, sampled, row_columns) for name, r in on_host.items()}
    host = {name: rows.local(x) for name, x in device.items()} | {"finished": rows.local(out.finished)}
    scored.update({name: score_rows(r, rows, device, host) for name, r in sources.items() if name not in on_host})
    host.update({name: np.asarray(s, np.float32) for name, s in scored.items()})
    scores = host["scores"]
    if scores.shape != (len(rows.rows),):  # a scalar or [N, 1] would broadcast silently below
      raise ValueError(f"reward source returned scores of shape {scores.shape}; expected "
                       f"({len(rows.rows)},), one per response row")
    if not np.all(np.isfinite(scores)):
      bad = rows.rows[np.flatnonzero(~np.isfinite(scores))]
      raise FloatingPointError(f"reward source returned non-finite scores at rows {bad[:10].tolist()}")
    return host


def make_roller(config, graph, ref_params, reward: RewardSource, tokenizer, *, gold: RewardSource | None = None,
                mesh=None, penalise_missing_eos: bool = True) -> Roller:
  """The Roller for `config` (sampler settings, EOS/pad ids, missing-EOS penalty): the one place
  a rollout is assembled, for RL, the demo's preference pairs and the eval stage. `ref_params`
  None: each call passes them."""
  penalty = (config.rl.missing_eos_penalty or None) if penalise_missing_eos else None
  return Roller(graph, ref_params, reward, sampler_cfg=config.sampler, eos_id=tokenizer.eos_token_id,
                pad_id=batching.pad_token_id(tokenizer), missing_eos_penalty=penalty, gold=gold, mesh=mesh,
                sampler_dtype=config.sampler.param_dtype,
                sampler_matmul_dtype=config.sampler.matmul_dtype or config.model.matmul_dtype,
                ref_matmul_dtype=config.model.frozen_matmul_dtype or config.model.matmul_dtype,
                sample_devices=host_devices.sampler_devices(  # sized by the model, whose reference it is
                    config, mesh, graph.template if ref_params is None else ref_params),
                stop=sampling.stop_sequences(tokenizer, config.sampler.get("stop", ())))


def reference_rewards(reward: RewardSource, query, query_mask, response, response_mask,
                      chunk: int = 64, mesh=None, columns: dict | None = None) -> np.ndarray:
  """[N] rewards of given (prompt, response) rows, e.g. each prompt's dataset response: the
  baseline of rl.reward_baseline='reference'. Scored in chunks of `chunk` rows, each process
  scoring its share of every chunk on `mesh` (default: one device); all N on every process.
  `columns`: {name: N values}, the dataset's other columns, for a host-side reward."""
  mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  names, arrays = ("query", "query_mask", "response", "response_mask"), (query, query_mask, response, response_mask)
  columns = {name: list(values) for name, values in (columns or {}).items()}
  out = []
  for start in range(0, len(query), chunk):
    split = sharding.RowSplit(len(query[start:start + chunk]), mesh)
    host = {n: np.asarray(a[start:start + chunk])[split.rows] for n, a in zip(names, arrays)}
    device = split.to_global(host) if getattr(reward, "on_device", False) else None
    mine = {name: [values[start + i] for i in split.rows] for name, values in columns.items()}
    out.append(split.gather(np.asarray(score_rows(reward, split, device, host, mine), np.float32).reshape(-1)))
  scores = np.concatenate(out) if out else np.zeros((0,), np.float32)
  if scores.shape != (len(query),) or not np.all(np.isfinite(scores)):
    raise ValueError(f"reference rewards: expected {len(query)} finite scores, got shape {scores.shape}")
  return scores


class RunningMoments:
  """Running mean/std over all rewards seen (Chan et al. parallel update); host-side, saved
  in checkpoints so a resumed run scales rewards exactly as before (docs/pitfalls.md, 10)."""

  def __init__(self, count=0.0, mean=0.0, m2=0.0):
    self.count, self.mean, self.m2 = float(count), float(mean), float(m2)

  def update(self, x: np.ndarray):
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
      return
    n, mean, m2 = x.size, x.mean(), ((x - x.mean()) ** 2).sum()
    delta, total = mean - self.mean, self.count + n
    self.mean += delta * n / total
    self.m2 += m2 + delta ** 2 * self.count * n / total
    self.count = total

  @property
  def std(self) -> float:
    return float(np.sqrt(self.m2 / max(self.count - 1, 1)))

  def state(self) -> dict:
    return {"count": self.count, "mean": self.mean, "m2": self.m2}


def process_scores(scores: np.ndarray, *, clip: float | None, moments: RunningMoments | None,
                   everything: Callable = np.asarray) -> np.ndarray:
  """Reward clip to +-clip, then divide by the running std (no mean shift: P3O is invariant to
  per-prompt shifts anyway, and PPO's critic sees the same scale). The std is guarded.
  `everything(scores)` gives every process's scores (Experience.all_rows): the statistics
  are those of the whole rollout."""
  scores = np.asarray(scores, np.float32)
  if clip is not None and clip > 0:
    scores = np.clip(scores, -clip, clip)
  if moments is not None:
    moments.update(everything(scores))
    std = moments.std
    if np.isfinite(std) and std > 1e-8:
      scores = scores / std
  return scores
