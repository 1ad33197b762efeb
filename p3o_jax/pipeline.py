"""The stages: sft -> rm -> rl -> eval, each reading the previous stage's output from workdir.

    <workdir>/data/         the demo task's files and tokenizer (demo only)
    <workdir>/sft/hf/       SFT policy, Hugging Face format (also the RL reference)
    <workdir>/rm/hf/        reward model, *ForSequenceClassification format
    <workdir>/rm/preferences*.jsonl  the pairs it trained on and its held-out ones, when sampled (demo)
    <workdir>/rl/<algo>/hf/ trained policy per algorithm (RL, or an offline one such as DPO
                            on the reward model's pairs); metrics.jsonl holds the frontier
    <workdir>/eval/         report.md, frontier.png, win_rate.png

A stage's input can also come from the config instead (model.hf for the policy,
model.reward_hf for the reward model), so each stage runs alone.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
from typing import Callable

import datasets
import jax
import numpy as np
from transformers import AutoTokenizer

from p3o_jax import distributed, paths, preference, sharding, supervised
from p3o_jax.data import batching, hub, synthetic
from p3o_jax.eval import frontier, report, winrate
from p3o_jax.metrics_log import MetricsLogger
from p3o_jax.models import decoder, hf, lora, policy as models
from p3o_jax.models.policy import Policy
from p3o_jax.rl import algorithms, loop
from p3o_jax.rl.rollout import ModelReward, TextReward, decode_rows, make_roller, reference_rewards

log = logging.getLogger(__name__)
STAGES = ("sft", "rm", "rl", "eval")
PAIRS_FILE = "preferences.jsonl"  # under rm/: the pairs the rm stage sampled (demo)
HELD_OUT_PAIRS_FILE = "preferences_held_out.jsonl"  # and the held-out prompts' pairs


@dataclasses.dataclass
class Task:
  """Texts for every stage, and the gold reward when the task has one."""
  tokenizer: object
  sft_prompts: list[str]
  sft_completions: list[str]
  rl_prompts: list[str]
  eval_prompts: list[str]
  preferences: dict | None = None           # {'prompt', 'chosen', 'rejected'} lists (hub tasks), or
                                            # unpaired {'prompt', 'completion', 'label'} (KTO alone)
  eval_preferences: dict | None = None      # held-out pairs, the same (data.preference_eval_split)
  gold: Callable | None = None              # gold(prompts, responses) -> [N] (demo)
  rl_references: list[str] | None = None    # each prompt's dataset response (rl.reward_baseline)
  eval_references: list[str] | None = None
  rl_columns: datasets.Dataset | None = None   # the prompts' other dataset columns (a Python reward's
  eval_columns: datasets.Dataset | None = None  # keyword arguments, e.g. GSM8K's answer), row for row
  sft_reply_spans: list | None = None       # per SFT row, its prompt's earlier assistant replies as
                                            # character ranges (trained under sft.assistant_turns='all')


def chat_template(template: str, tokenizer) -> hub.ChatTemplate | None:
  """What renders conversational data: data.chat_template (a Jinja template, or a file holding one)
  set on `tokenizer`, so that the policies the stages export carry it, or else the tokenizer's
  own template; None when neither is there (text data needs none)."""
  if template and "{" not in template:
    if not paths.resolve(template).is_file():
      raise FileNotFoundError(f"data.chat_template={template!r}: no such file, and not a Jinja template")
    template = paths.resolve(template).read_text()
  if template:
    tokenizer.chat_template = template
  return hub.ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else None


def load_task(config, workdir: str) -> Task:
  if config.task == "demo":
    d = config.data.demo
    task_seed = d.get("seed", -1)  # the prompts and demonstrations; -1: config.seed
    task = synthetic.make_demo_task(
        config.seed if task_seed < 0 else task_seed, d.n_train_prompts, d.n_eval_prompts, n_sft=d.n_sft, ops=tuple(d.ops),
        min_digits=d.min_digits, max_digits=d.max_digits, noise_frac=d.noise_frac,
        token_noise=d.token_noise, length_noise=d.length_noise)
    if distributed.is_main():
      synthetic.save_demo_task(task, paths.join(workdir, "data"))
    return Task(synthetic.build_tokenizer(), task.sft_prompts, task.sft_completions, task.train_prompts,
                task.eval_prompts[: config.eval.num_prompts], gold=synthetic.gold_reward)
  data = config.data
  field = "tokenizer" if config.model.tokenizer else "hf"
  try:
    tokenizer = AutoTokenizer.from_pretrained(config.model[field])
  except OSError as e:  # transformers' message names no id when the hub and its cache fail
    raise OSError(f"model.{field}={config.model[field]!r}: no tokenizer in that folder, the Hugging Face "
                  f"Hub or its local cache: {e}") from e
  chat = chat_template(data.chat_template, tokenizer)
  subset = {"data_dir": data.data_dir} if data.data_dir else {}
  sft = hub.load_sft(data.sft, data.sft_split, chat, **subset) if data.sft else None
  prefs = hub.load_preferences(data.preference, data.preference_split, chat, **subset) if data.preference else None
  held_out = None
  if data.preference and data.preference_eval_split and config.eval.num_pairs:
    held_out = hub.load_preferences(data.preference, data.preference_eval_split, chat, **subset)
    held_out = held_out.select(range(min(len(held_out), config.eval.num_pairs)))
  prompts = hub.load_prompts(data.prompts, data.prompts_split, chat, keep_columns=True, **subset)
  eval_prompts = hub.load_prompts(data.prompts, data.eval_split, chat, keep_columns=True, **subset)
  eval_prompts = eval_prompts.select(range(min(len(eval_prompts), config.eval.num_prompts)))
  other = lambda ds: ds.remove_columns("prompt") if len(ds.column_names) > 1 else None
  references = {}
  if config.rl.reward_baseline == "reference":
    for name, split in (("rl", data.prompts_split), ("eval", data.eval_split)):
      try:  # the dataset's own response to each prompt: what SFT would train on
        references[name] = list(hub.load_sft(data.prompts, split, chat, **subset)["completion"])
      except ValueError as e:
        raise ValueError(f"rl.reward_baseline='reference' needs a response for every prompt in "
                         f"data.prompts={data.prompts!r} ({split}): {e}") from e
  return Task(tokenizer, sft["prompt"] if sft else [], sft["completion"] if sft else [],
              list(prompts["prompt"]), list(eval_prompts["prompt"]),
              preferences=None if prefs is None else prefs.to_dict(),
              eval_preferences=None if held_out is None else held_out.to_dict(),
              rl_references=references.get("rl"),
              eval_references=references.get("eval", [])[: config.eval.num_prompts] or None,
              rl_columns=other(prompts), eval_columns=other(eval_prompts),
              sft_reply_spans=sft["reply_spans"] if sft and config.sft.assistant_turns == "all" else None)


def _logger(config, directory: str) -> MetricsLogger:
  return MetricsLogger(directory, use_tensorboard=config.log.tensorboard, use_wandb=config.log.wandb,
                       wandb_project=config.log.wandb_project, config=config)


def _queries(config, tokenizer, prompts):
  return batching.tokenize_prompts(tokenizer, prompts, config.data.max_prompt_len, config.data.truncate_prompts)


def _rows_of(columns: datasets.Dataset | None, rows) -> dict | None:
  """{name: a value per row} of the dataset columns `columns` at `rows` (None: no columns)."""
  return None if columns is None else columns[[int(i) for i in rows]]


def reward_baseline(config, tok, reward, prompts: list[str], references: list[str] | None,
                    columns: datasets.Dataset | None = None) -> np.ndarray | None:
  """Per-prompt rewards to subtract (rl.reward_baseline) for `prompts`.

  'reference': the reward of each prompt's own dataset response, the P3O paper's HH reward
  r(x, y) - r(x, y_chosen). P3O's loss does not change (it sees reward differences within a
  prompt); PPO's advantages and the reported rewards do.
  """
  if config.rl.reward_baseline == "none":
    return None
  if references is None:
    raise ValueError("rl.reward_baseline='reference' needs the prompts' dataset responses; this task has none")
  if len(references) != len(prompts):
    raise ValueError(f"rl.reward_baseline='reference': {len(references)} dataset responses for {len(prompts)} prompts")
  response, response_mask = batching.tokenize_responses(tok, references, config.sampler.max_new_tokens)
  baseline = reference_rewards(reward, *_queries(config, tok, prompts), response, response_mask,
                               mesh=sharding.mesh_from_config(config.mesh), columns=_rows_of(columns, range(len(prompts))))
  log.info("reward baseline: mean reference reward %.4f over %d prompts", baseline.mean(), len(baseline))
  return baseline


def sft_policy_path(config, workdir: str) -> str:
  """The SFT policy (also the RL reference): this workdir's sft stage output when there is one,
  else config.model.hf (an SFT checkpoint trained elsewhere)."""
  local = paths.join(workdir, "sft", "hf")
  if paths.resolve(local).joinpath("config.json").is_file() or not config.model.hf:
    return local
  return config.model.hf


def _placement(config):
  """fn(graph, abstract params) -> their shardings on config.mesh, by the logical-axis rules."""
  mesh = sharding.mesh_from_config(config.mesh)
  return lambda graph, abstract: sharding.logical_to_mesh(decoder.logical_axes(graph), mesh, shapes=abstract)


def _dtypes(config, frozen: bool = False) -> dict:
  """How models are built; `frozen`: the weights of a model never trained (reference, reward
  model) in model.frozen_dtype."""
  matmul = (config.model.frozen_matmul_dtype or config.model.matmul_dtype) if frozen else config.model.matmul_dtype
  return dict(dtype=config.model.dtype, param_dtype=config.model.frozen_dtype if frozen else config.model.param_dtype,
              remat=config.model.remat, scan_layers=config.model.scan_layers, matmul_dtype=matmul)


def sequence_length(config) -> int:
  """The longest sequence a stage runs: a prompt cut to data.max_prompt_len, then the response."""
  return config.data.max_prompt_len + config.sampler.max_new_tokens


def load_policy(config, path: str, tokenizer=None) -> Policy:
  """A policy from an HF folder, each tensor placed straight onto its shards of config.mesh, once
  its positions (or sliding window) are known to hold the run's sequences."""
  policy = models.load(path, _placement(config), tokenizer=tokenizer, **_dtypes(config))
  batching.check_positions(policy.cfg, sequence_length(config), f"policy {path}")
  return policy


# ----------------------------------------------------------------------------- stages

def run_sft(config, workdir: str, task: Task, stop=None) -> str | None:
  out = paths.join(workdir, "sft")
  tok = task.tokenizer
  max_len = sequence_length(config)
  if config.model.hf:
    policy = load_policy(config, config.model.hf, tok)  # checks its positions
  else:
    policy = models.init(decoder.DecoderConfig(vocab_size=len(tok), **_dtypes(config), **dict(config.model.arch)),
                         config.seed, _placement(config), tok)
    batching.check_positions(policy.cfg, max_len, "sft")
  if not task.sft_prompts:
    raise ValueError("the sft stage needs SFT data: set config.data.sft")

  make_batch, num_examples = sft_batches(config, task)
  return _fit_and_export("sft", config, out, config.sft, supervised.sft_loss_fn(policy.graph), policy,
                         make_batch, num_examples, stop)


def sft_batches(config, task: Task) -> tuple[Callable, int]:
  """(make_batch(row indices) -> the SFT stage's batch of those rows, the number of rows): the
  examples one to a row (`batching.sft_batch`), or with sft.packing several to a row
  (`batching.pack_sft`, packed once here)."""
  tok, length = task.tokenizer, sequence_length(config)
  cut = dict(max_prompt_len=config.data.max_prompt_len, truncate=config.data.truncate_prompts)
  if config.sft.packing:
    packed = batching.pack_sft(tok, task.sft_prompts, task.sft_completions, length,
                               reply_spans=task.sft_reply_spans, **cut)
    rows, real = len(packed["tokens"]), int(packed["mask"].sum())
    if rows < config.sft.batch_size:
      raise ValueError(f"sft.packing: the {len(task.sft_prompts)} SFT examples pack into {rows} rows of {length} "
                       f"tokens, fewer than sft.batch_size={config.sft.batch_size} (which counts packed rows)")
    log.info("sft: %d examples packed into %d rows of %d tokens (%.0f%% of them real, against %.0f%% one "
             "example to a row)", len(task.sft_prompts), rows, length, 100 * real / (rows * length),
             100 * real / (len(task.sft_prompts) * length))
    return (lambda idx: {name: values[idx] for name, values in packed.items()}), rows

  def make_batch(idx):
    spans = [task.sft_reply_spans[i] for i in idx] if task.sft_reply_spans else None
    return batching.sft_batch(tok, [task.sft_prompts[i] for i in idx], [task.sft_completions[i] for i in idx],
                              length, reply_spans=spans, **cut)
  return make_batch, len(task.sft_prompts)


def _fit_and_export(name, config, out, stage_cfg, loss_fn, model: Policy, make_batch, num_examples,
                    stop, held_out=None) -> str | None:
  """A supervised stage (sft or rm): train with logging and checkpoints, export to <out>/hf
  (with LoRA on this stage: the merged model, and an SFT policy's adapters under <out>/adapter).
  `held_out(params) -> metrics`, when given, is logged as `<name>/held_out/*` every eval.every steps."""
  if lora.applies(config.get("lora"), name):
    if name == "sft" and not config.model.hf:
      log.warning("sft: LoRA adapters on a freshly initialised model (model.hf is empty): only they train")
    model = with_lora(config, name, model)  # the step reads it through lora.adapted (train_state)
  with _logger(config, out) as logger:
    last = {}

    def evaluate(step, params):
      last.update({f"held_out/{k}": v for k, v in held_out(params).items()})
      logger.log(step, {f"{name}/{k}": v for k, v in last.items()})

    params, metrics = supervised.fit(
        name, loss_fn, model.params, make_batch, num_examples, params_axes=model.logical_axes(),
        mesh_cfg=config.mesh, stage_cfg=stage_cfg, seed=config.seed, workdir=out, logger=logger,
        ckpt_cfg=config.ckpt, log_every=config.log.every, stop=stop,
        evaluate=None if held_out is None else evaluate, eval_every=config.eval.every)
    logger.summary(name, {**metrics, **last})
  if stop is not None and stop.requested:
    return None  # stopped: the checkpoint holds the state; the export is for a finished stage
  if name == "sft" and lora.has_adapters(params) and config.model.hf:
    hf.save_adapter(paths.join(out, "adapter"), model.cfg, params, alpha=config.lora.alpha,
                    base_model=config.model.hf)
  path = paths.join(out, "hf")
  hf.save(path, model.cfg, lora.merged(params, cast=True), tokenizer=model.tokenizer)
  return path


def with_lora(config, stage: str, model: Policy) -> Policy:
  """`model` with the config's LoRA adapters (models/lora.py), its sizes logged."""
  c = config.lora
  model = models.with_adapters(model, rank=c.rank, alpha=c.alpha, targets=c.targets, seed=config.seed)
  log.info("%s: LoRA rank %d, alpha %g on %s: %d trainable params of %d", stage, c.rank, c.alpha, c.targets,
           lora.count(lora.trainable(model.params)), lora.count(model.params))
  return model


def sample_preferences(config, workdir: str, task: Task) -> tuple[dict, dict | None]:
  """Demo: (pairs, held-out pairs or None) sampled from the SFT policy, labelled by the gold
  reward via a BT coin flip: rm.pairs_per_prompt for each of rm.num_prompts RL prompts, and as
  many for each of the first held-out prompts, up to eval.num_pairs pairs. One pass over both
  (the same sampler program); each process samples its rows of every chunk, and every process
  gets all pairs (the dataset)."""
  policy = load_policy(config, sft_policy_path(config, workdir))
  tok = task.tokenizer
  per_prompt = config.rm.pairs_per_prompt
  train = task.rl_prompts[: config.rm.num_prompts or len(task.rl_prompts)]
  held_out = task.eval_prompts[: -(-config.eval.num_pairs // per_prompt)]  # ceil: 0 pairs, no prompts
  prompts, k = train + held_out, 2 * per_prompt
  n = len(prompts)
  mesh = sharding.mesh_from_config(config.mesh)
  roller = make_roller(config, policy.graph, policy.params, TextReward(task.gold, tok), tok, mesh=mesh,
                       penalise_missing_eos=False)
  rng = np.random.default_rng(config.seed)
  out = {"prompt": [], "chosen": [], "rejected": []}
  chunk = 64
  for start in range(0, n, chunk):
    split = sharding.RowSplit(len(prompts[start:start + chunk]), mesh)
    queries = _queries(config, tok, [prompts[start + i] for i in split.rows])
    exp = roller(policy.params, *queries, jax.random.key(config.seed + start), k, split=split)
    every = {name: exp.all_rows(getattr(exp, name)) for name in ("query", "query_mask", "response", "response_mask")}
    _, responses = decode_rows(tok, every["query"], every["query_mask"], every["response"], every["response_mask"])
    scores = exp.all_rows(exp.scores).reshape(-1, 2)
    a_wins = synthetic.bradley_terry_label(scores[:, 0], scores[:, 1], rng, config.data.demo.bt_temperature)
    for p, (ra, rb), win in zip(np.repeat(prompts[start:start + chunk], k // 2),
                                np.asarray(responses).reshape(-1, 2), a_wins):
      out["prompt"].append(str(p))
      out["chosen"].append(ra if win else rb)
      out["rejected"].append(rb if win else ra)
  cut = len(train) * per_prompt
  pairs = {key: rows[:cut] for key, rows in out.items()}
  return pairs, ({key: rows[cut:cut + config.eval.num_pairs] for key, rows in out.items()} if held_out else None)


def _write_pairs(path: str, pairs: dict) -> None:
  """{'prompt', 'chosen', 'rejected'} lists as JSON lines, the hub's preference schema."""
  paths.write_text(path, "".join(json.dumps(dict(zip(pairs, row))) + "\n" for row in zip(*pairs.values())))


def _read_pairs(path) -> dict:
  rows = [json.loads(line) for line in paths.resolve(path).read_text().splitlines() if line.strip()]
  return {key: [row[key] for row in rows] for key in ("prompt", "chosen", "rejected")}


def preference_pairs(config, workdir: str, task: Task) -> tuple[dict, dict | None]:
  """(pairs, held-out pairs or None): the pairs the reward model learns from, which offline
  algorithms (DPO) train on: the task's preference dataset, else those the rm stage sampled and
  saved, else sampled now as it does."""
  if task.preferences is not None:
    return task.preferences, task.eval_preferences
  saved, held = (paths.resolve(paths.join(workdir, "rm", name)) for name in (PAIRS_FILE, HELD_OUT_PAIRS_FILE))
  if saved.is_file():
    return _read_pairs(saved), _read_pairs(held) if held.is_file() and config.eval.num_pairs else None
  if task.gold is None:
    raise ValueError(f"rl.algo={config.rl.algo!r} trains on preference pairs: set data.preference (a dataset of "
                     f"prompt, chosen, rejected), or run the rm stage that samples them in this workdir")
  log.warning("no %s: sampling the preference pairs from the SFT policy, as the rm stage does", saved)
  return sample_preferences(config, workdir, task)


def run_rm(config, workdir: str, task: Task, stop=None) -> str | None:
  out = paths.join(workdir, "rm")
  tok = task.tokenizer
  prefs, held_out = task.preferences, task.eval_preferences
  if prefs is not None and "label" in prefs:
    raise ValueError(f"data.preference={config.data.preference!r} holds unpaired responses (prompt, completion, "
                     "label), which train KTO alone; the reward model trains on pairs: drop the rm stage and give "
                     "the rl stage's reward by model.reward_hf or model.reward_fn")
  if prefs is None:
    prefs, held_out = sample_preferences(config, workdir, task)
    if distributed.is_main():  # what the reward model learns from, for a look and for DPO
      _write_pairs(paths.join(out, PAIRS_FILE), prefs)
      if held_out is not None:
        _write_pairs(paths.join(out, HELD_OUT_PAIRS_FILE), held_out)
  model = models.with_scalar_head(load_policy(config, sft_policy_path(config, workdir), tok), _placement(config))
  loss_fn = supervised.reward_loss_fn(model.graph)
  accuracy = None
  if held_out is not None:  # the reward model's accuracy on pairs it does not train on
    accuracy = supervised.held_out_metrics(loss_fn, preference.pair_batches(config, tok, held_out),
                                           len(held_out["prompt"]), config.rm.batch_size,
                                           sharding.mesh_from_config(config.mesh))
  return _fit_and_export("rm", config, out, config.rm, loss_fn, model, preference.pair_batches(config, tok, prefs),
                         len(prefs["prompt"]), stop, held_out=accuracy)


def load_callable(spec: str, field: str) -> Callable:
  """'package.module:function' -> the function (`field` names the config entry in errors)."""
  module_name, _, name = spec.partition(":")
  if not module_name or not name:
    raise ValueError(f"{field}={spec!r}; expected 'package.module:function'")
  return getattr(importlib.import_module(module_name), name)


def reward_source(config, workdir: str, tok):
  """The reward RL optimises: a Python function of the texts (model.reward_fn), else the reward
  model from model.reward_hf or the rm stage, placed on config.mesh. Returns (reward source,
  reward model or None)."""
  if config.model.reward_fn:
    return TextReward(load_callable(config.model.reward_fn, "model.reward_fn"), tok), None
  path = config.model.reward_hf or paths.join(workdir, "rm", "hf")
  rm = models.load(path, _placement(config), head="score", **_dtypes(config, frozen=True))
  batching.check_positions(rm.cfg, sequence_length(config), f"reward model {path}")
  return ModelReward(rm.graph, rm.params), rm


def _reward_columns(reward, columns: datasets.Dataset | None) -> datasets.Dataset | None:
  """The prompts' dataset columns where the reward reads some (a Python function naming them or
  taking **kwargs); else None, so that no rollout gathers them."""
  return columns if getattr(reward, "reads_columns", False) else None


def _prompts(config, tok, texts: list[str], baseline, columns: datasets.Dataset | None = None) -> loop.Prompts:
  return loop.Prompts(len(texts), lambda rows: _queries(config, tok, [texts[i] for i in rows]), baseline,
                      None if columns is None else functools.partial(_rows_of, columns))


def run_rl(config, workdir: str, task: Task, stop=None) -> str | None:
  out = paths.join(workdir, "rl", config.rl.algo)
  tok = task.tokenizer
  policy = load_policy(config, sft_policy_path(config, workdir), tok)
  adapters = lora.applies(config.get("lora"), "rl")
  # With LoRA the policy's frozen model is the reference (read from the train state each
  # iteration, in the policy's dtype), so no copy of it is kept.
  ref_params = None if adapters else models.frozen_copy(policy.params, config.model.frozen_dtype)
  reward, rm = reward_source(config, workdir, tok)
  gold = TextReward(task.gold, tok) if task.gold else None
  roller = make_roller(config, policy.graph, ref_params, reward, tok, gold=gold,
                       mesh=sharding.mesh_from_config(config.mesh))
  rl_columns, eval_columns = (_reward_columns(reward, c) for c in (task.rl_columns, task.eval_columns))
  held_out = _prompts(config, tok, task.eval_prompts,
                      reward_baseline(config, tok, reward, task.eval_prompts, task.eval_references, eval_columns),
                      eval_columns)
  if adapters:
    policy = with_lora(config, "rl", policy)
  with _logger(config, out) as logger:
    if algorithms.get(config.rl.algo).offline:  # trains on the preference pairs; evaluated as RL is
      pairs, held_out_pairs = preference_pairs(config, workdir, task)
      params, record = preference.train(config, out, policy, roller, pairs=pairs, held_out_pairs=held_out_pairs,
                                        eval_prompts=held_out, logger=logger, stop=stop)
    else:
      train = _prompts(config, tok, task.rl_prompts,
                       reward_baseline(config, tok, reward, task.rl_prompts, task.rl_references, rl_columns),
                       rl_columns)
      params, record = loop.train(config, out, policy, roller, train_prompts=train, eval_prompts=held_out,
                                  logger=logger, critic=rm, stop=stop)
    logger.summary(f"rl/{config.rl.algo}", record)
  if stop is not None and stop.requested:
    return None  # stopped: the checkpoint holds the state; the export is for a finished stage
  path = paths.join(out, "hf")
  if lora.has_adapters(params):  # the adapters alone too, as peft loads them onto the SFT policy
    hf.save_adapter(paths.join(out, "adapter"), policy.cfg, params, alpha=config.lora.alpha,
                    base_model=sft_policy_path(config, workdir))
  hf.save(path, policy.cfg, lora.merged(params, cast=True), tokenizer=tok)
  return path


def run_eval(config, workdir: str, task: Task) -> str:
  """Frontier from the RL logs; head-to-head win rates of every final policy on held-out
  prompts, by the reward model and by a judge: eval.judge ('package.module:function' of
  (prompt, first, second) -> 1 | 0 | 0.5, e.g. an LLM judge), else the gold reward (demo).
  Each process samples and scores its rows; process 0 judges and writes the report."""
  out = paths.join(workdir, "eval")
  tok = task.tokenizer
  policies = {"sft": sft_policy_path(config, workdir)}
  rl_root = paths.resolve(workdir) / "rl"
  for algo in sorted(p.name for p in rl_root.iterdir()) if rl_root.is_dir() else []:
    if (rl_root / algo / "hf" / "config.json").is_file():
      policies[algo] = os.fspath(rl_root / algo / "hf")
  reward, _ = reward_source(config, workdir, tok)
  gold = TextReward(task.gold, tok) if task.gold else None
  ref = models.load(policies["sft"], _placement(config), **_dtypes(config, frozen=True))
  mesh = sharding.mesh_from_config(config.mesh)
  split = sharding.RowSplit(len(task.eval_prompts), mesh)
  queries = _queries(config, tok, [task.eval_prompts[i] for i in split.rows])
  columns = _reward_columns(reward, task.eval_columns)
  baseline = reward_baseline(config, tok, reward, task.eval_prompts, task.eval_references, columns)
  rewards, golds, texts, summary = {}, {}, {}, {}
  for name, path in policies.items():
    policy = load_policy(config, path)
    roller = make_roller(config, policy.graph, ref.params, reward, tok, gold=gold, mesh=mesh,
                         penalise_missing_eos=False)
    exp = roller(policy.params, *queries, jax.random.key(config.seed + 7), 1, split=split,
                 baseline=None if baseline is None else baseline[split.rows],
                 columns=_rows_of(columns, split.rows))
    rewards[name] = exp.all_rows(exp.scores)
    if config.eval.judge:  # the judge reads every row's text on process 0
      every = [exp.all_rows(getattr(exp, n)) for n in ("query", "query_mask", "response", "response_mask")]
      texts[name] = decode_rows(tok, *every)[1]
    summary[f"{name}/reward"] = float(rewards[name].mean())
    summary[f"{name}/kl"] = float(exp.all_rows(exp.seq_kl).mean())
    if exp.gold is not None:
      golds[name] = exp.all_rows(exp.gold)
      summary[f"{name}/gold_reward"] = float(golds[name].mean())
  names, matrix = winrate.win_rate_matrix(rewards)
  judge = None
  if config.eval.judge and distributed.is_main():
    judge = winrate.win_rate_matrix_by_judge(texts, task.eval_prompts, load_callable(config.eval.judge, "eval.judge"),
                                             seed=config.seed)[1]
  elif not config.eval.judge:
    judge = winrate.win_rate_matrix(golds)[1] if golds else None
  logs = [os.fspath(rl_root / a / "metrics.jsonl") for a in policies if a != "sft"]
  path = paths.join(out, report.REPORT_NAME)
  if distributed.is_main():
    points = frontier.load_frontier([p for p in logs if paths.resolve(p).is_file()]) if logs else []
    path = report.write_report(out, points, names, matrix, judge_matrix=judge)
  with _logger(config, out) as logger:
    logger.log(0, summary)
    logger.summary("eval", summary)
  return path
