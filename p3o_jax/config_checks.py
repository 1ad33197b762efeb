"""Config validation: every error names the field, and typos in overrides get a suggestion.

    config = FLAGS.config
    config_checks.validate(config)      # raises ConfigError listing every bad field

    app.run(main, flags_parser=config_checks.flags_parser)
    # --config.rl.bta=0.1  ->  --config.rl.bta: unknown field 'rl.bta'; did you mean 'rl.beta'?

`SCHEMA` below is the table of known fields. A key is a dotted suffix of config paths: its
check applies to every field whose path equals it or ends with `.<key>` (so `optim.lr`
covers `optim.lr`, `sft.optim.lr` and `rm.optim.lr`; `arch.num_layers` covers
`model.arch.num_layers`); the longest matching key wins. Only fields present in the config
are checked, so partial configs (tests, a single stage) validate too; each check also
checks the type (an int field must hold an int, not 2.5 or True).

`CROSS_CHECKS` holds the rules that relate several fields (batch arithmetic, algorithm
constraints); each runs only when all its fields are present. The algorithm names and the
options only one algorithm reads come from the registry (`p3o_jax/rl/algorithms/`), see
`schema()`.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from typing import Any, Callable, Iterator

from p3o_jax import host_devices
from p3o_jax.models import lora
from p3o_jax.rl import algorithms
from p3o_jax.value_checks import (Check, boolean, integer, is_int, names_from, non_negative, non_negative_int, number,
                                  one_of, positive, positive_int, probability, string)

log = logging.getLogger(__name__)

VARIANTS = ("v1", "v2")
KL_SOURCES = ("theta", "old")   # losses.p3o: current params (detached) or the rollout policy
STAGES = ("sft", "rm", "rl", "eval", "pipeline")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """One or more config fields are invalid; the message has one line per problem."""


# ----------------------------------------------------------------------------- checks
# The generic value checks (number, one_of, positive_int, ...) live in value_checks; these few
# know this project's fields (mesh sizes, CPU device counts).

def mesh_size(v):
  if is_int(v) and (v == -1 or v >= 1):
    return None
  return f"must be a positive int or -1 (use the remaining devices), got {v!r}"


def cpu_devices(v):
  try:
    host_devices.parse(v)
  except ValueError as e:
    return str(e)
  return None


def lora_names(known) -> Check:
  def check(v):
    if not isinstance(v, str):
      return f"must be a string, got {v!r}"
    try:
      lora.parse_names(v, known, "")
    except ValueError as e:
      return str(e).split(": ", 1)[1]
    return None
  return check


def sampler_cpu_devices(v):
  return None if host_devices.is_auto(v) else cpu_devices(v)


def stop_strings(v):
  if isinstance(v, (tuple, list)) and all(isinstance(x, str) and x for x in v):
    return None
  return f"must be a list of non-empty strings, e.g. ('\\nQuestion:',), got {v!r}"


# ----------------------------------------------------------------------------- the schema

SCHEMA: dict[str, Check] = {
    # run
    "seed": integer(),
    "stage": one_of(*STAGES),
    "task": string,
    # model
    "model.hf": string,
    "model.tokenizer": string,
    "model.reward_hf": string,
    "model.dtype": one_of(*DTYPES),
    "model.param_dtype": one_of(*DTYPES),
    "model.frozen_dtype": one_of(*DTYPES),
    "model.matmul_dtype": one_of("", *DTYPES),
    "model.frozen_matmul_dtype": one_of("", *DTYPES),
    "sampler.matmul_dtype": one_of("", *DTYPES),
    "model.remat": boolean,
    "model.scan_layers": boolean,
    "arch.vocab_size": positive_int,
    "arch.hidden_size": positive_int,
    "arch.num_layers": positive_int,
    "arch.num_heads": positive_int,
    "arch.num_kv_heads": positive_int,
    "arch.intermediate_size": positive_int,
    "arch.max_position_embeddings": positive_int,
    # LoRA (rank 0: off)
    "lora.rank": non_negative_int,
    "lora.alpha": positive,
    "lora.targets": lora_names(lora.ALL),
    "lora.stages": lora_names(lora.STAGES),
    # data
    "data.max_prompt_len": positive_int,
    "data.truncate_prompts": one_of("left", "right", "error"),
    # sampler
    "sampler.max_new_tokens": positive_int,
    "sampler.min_new_tokens": non_negative_int,
    "sampler.temperature": positive,
    "sampler.top_k": non_negative_int,             # 0: off
    "sampler.top_p": number(gt=0, le=1),
    "sampler.stop": stop_strings,
    # optimizers (optim, sft.optim, rm.optim, dpo.optim)
    "optim.lr": positive,
    "optim.b1": number(ge=0, lt=1),
    "optim.b2": number(ge=0, lt=1),
    "optim.eps": positive,
    "optim.weight_decay": non_negative,
    "optim.grad_clip": non_negative,               # 0: off
    "optim.warmup_steps": non_negative_int,
    "optim.schedule": one_of(*SCHEDULES),
    "optim.mu_dtype": one_of("float32", "bfloat16"),
    # supervised stages
    "sft.steps": positive_int,
    "sft.batch_size": positive_int,
    "sft.assistant_turns": one_of("all", "last"),
    "sft.packing": boolean,
    "rm.steps": positive_int,
    "rm.batch_size": positive_int,
    "rm.pairs_per_prompt": positive_int,
    "rm.num_prompts": non_negative_int,            # 0: all
    "dpo.steps": positive_int,
    "dpo.batch_size": positive_int,
    # RL: rollout and update sizes
    "rl.iterations": positive_int,
    "rl.prompts_per_rollout": positive_int,
    "rl.k": integer(ge=2),
    "rl.inner_epochs": positive_int,
    "rl.num_minibatches": positive_int,
    "rl.micro_batches": positive_int,              # gradient accumulation steps per minibatch
    "rl.rollout_chunk": non_negative_int,          # 0: the whole rollout at once
    # RL: P3O
    "rl.variant": one_of(*VARIANTS),
    "rl.beta": non_negative,
    "rl.eps": positive,
    "rl.c": number(ge=1),
    "rl.kl_source": one_of(*KL_SOURCES),
    "rl.whiten_delta": boolean,
    "rl.clip_per_token": boolean,
    "rl.normalise": one_of("pair", "token"),
    # RL: rewards
    "rl.reward_clip": positive,
    "rl.reward_scaling": boolean,
    "rl.reward_baseline": one_of("none", "reference"),
    "rl.missing_eos_penalty": non_negative,
    # RL: PPO
    "rl.gamma": probability,
    "rl.lam": probability,
    "rl.vf_coef": non_negative,
    "rl.cliprange_value": positive,
    "rl.critic": one_of("head", "separate"),
    "rl.kl_init": non_negative,
    "rl.kl_target": positive,
    "rl.target_kl": positive,
    "rl.kl_horizon": positive_int,
    "rl.horizon": positive_int,
    "rl.adaptive_kl": boolean,
    "rl.whiten_advantages": boolean,
    # RL: DPO, online and offline
    "rl.dpo_beta": positive,
    # RL: rollout importance correction
    "rl.rollout_is": one_of("none", "tis"),
    "rl.rollout_is_cap": number(ge=1),
    "sampler.param_dtype": one_of("float32", "bfloat16"),
    "sampler.cpu_devices": sampler_cpu_devices,
    # eval, pipeline
    "eval.every": positive_int,
    "eval.num_prompts": positive_int,
    "eval.num_pairs": non_negative_int,
    "eval.greedy": boolean,
    # checkpoints, logging, mesh
    "ckpt.every": positive_int,
    "ckpt.keep": positive_int,
    "ckpt.resume": boolean,
    "ckpt.allow_changes": string,
    "log.every": positive_int,
    "log.tensorboard": boolean,
    "log.wandb": boolean,
    "log.level": one_of("debug", "info", "warning", "error"),
    "mesh.data": mesh_size,
    "mesh.fsdp": mesh_size,
    "mesh.tensor": mesh_size,
    "mesh.cpu_devices": cpu_devices,
    "mesh.cpu_reuse_memory": boolean,
}


# ----------------------------------------------------------------------------- cross-field rules
# Each: (fields it needs, check(values...) -> problem or None). Runs when all fields exist.

def _divides_rollout(prompts, num_minibatches):
  if prompts % num_minibatches:
    return (f"rl.prompts_per_rollout={prompts} must be divisible by rl.num_minibatches={num_minibatches} "
            f"(each minibatch takes whole prompts with all their responses)")
  return None


def _micro_batches(prompts, num_minibatches, micro):
  per_minibatch = prompts // num_minibatches if num_minibatches else 0
  if num_minibatches and prompts % num_minibatches == 0 and per_minibatch % micro:
    return (f"a minibatch of rl.prompts_per_rollout / rl.num_minibatches = {per_minibatch} prompts must be "
            f"divisible by rl.micro_batches={micro}")
  return None


def _k_fits_algo(algo, k):
  return algorithms.get(algo).k_problem(k) if algo in algorithms.REGISTRY else None


def _new_tokens(min_new, max_new):
  return f"sampler.min_new_tokens={min_new} must be <= sampler.max_new_tokens={max_new}" if min_new > max_new else None


def _fits_positions(prompt_len, new_tokens, max_positions):
  if prompt_len + new_tokens > max_positions:
    return (f"data.max_prompt_len + sampler.max_new_tokens = {prompt_len} + {new_tokens} exceeds "
            f"model.arch.max_position_embeddings={max_positions}")
  return None


def _one_fill(data, fsdp, tensor):
  if [data, fsdp, tensor].count(-1) > 1:
    return f"at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1; got {data}, {fsdp}, {tensor}"
  return None


def _chunk_divides(prompts, chunk):
  if chunk and prompts % chunk:
    return f"rl.rollout_chunk={chunk} must divide rl.prompts_per_rollout={prompts}"
  return None


CROSS_CHECKS: list[tuple[tuple[str, ...], Callable[..., "str | None"]]] = [
    (("rl.prompts_per_rollout", "rl.rollout_chunk"), _chunk_divides),
    (("rl.prompts_per_rollout", "rl.num_minibatches"), _divides_rollout),
    (("rl.prompts_per_rollout", "rl.num_minibatches", "rl.micro_batches"), _micro_batches),
    (("rl.algo", "rl.k"), _k_fits_algo),
    (("sampler.min_new_tokens", "sampler.max_new_tokens"), _new_tokens),
    (("data.max_prompt_len", "sampler.max_new_tokens", "model.arch.max_position_embeddings"), _fits_positions),
    (("mesh.data", "mesh.fsdp", "mesh.tensor"), _one_fill),
]


# ----------------------------------------------------------------------------- walking configs

def _is_mapping(x) -> bool:
  return hasattr(x, "items") and callable(x.items)


def flatten(config, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted path, value) for every leaf of a ConfigDict / FrozenConfigDict / dict."""
  for key, value in config.items():
    path = f"{prefix}{key}"
    if _is_mapping(value):
      yield from flatten(value, path + ".")
    else:
      yield path, value


def all_paths(config, prefix: str = "") -> list[str]:
  """Every dotted path, leaves and sub-configs alike (what an override may name)."""
  out = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    out.append(path)
    if _is_mapping(value):
      out.extend(all_paths(value, path + "."))
  return out


def schema() -> dict[str, Check]:
  """SCHEMA plus what the algorithm registry declares: the names `rl.algo` and `pipeline.algos`
  take, and each algorithm's own options."""
  names = algorithms.names()
  out = {**SCHEMA, "rl.algo": one_of(*names), "pipeline.algos": names_from(*names)}
  out.update({f"rl.{name}": check for name, (_, check) in algorithms.options().items() if check is not None})
  return out


def rule_for(path: str) -> "tuple[str, Check] | None":
  """The schema() entry whose key is the longest dotted suffix of `path`."""
  best = None
  for key, check in schema().items():
    if (path == key or path.endswith("." + key)) and (best is None or len(key) > len(best[0])):
      best = (key, check)
  return best


def problems(config) -> list[str]:
  """Every problem found, one line each, naming the field."""
  values = dict(flatten(config))
  found = []
  for path, value in values.items():
    rule = rule_for(path)
    if rule is not None:
      problem = rule[1](value)
      if problem:
        found.append(f"{path} {problem}")
  bad_fields = {line.split(" ", 1)[0] for line in found}
  for fields, check in CROSS_CHECKS:
    if all(f in values for f in fields) and not bad_fields.intersection(fields):
      problem = check(*(values[f] for f in fields))
      if problem:
        found.append(problem)
  return found


def validate(config) -> None:
  """Raises ConfigError listing every invalid field; logs RL sampling settings that bias log-probs."""
  found = problems(config)
  if found:
    raise ConfigError("invalid config:\n  " + "\n  ".join(found))
  values = dict(flatten(config))
  if values.get("rl.algo") is not None:
    if values.get("sampler.top_k", 0) != 0 or values.get("sampler.top_p", 1.0) != 1.0:
      log.warning("sampler.top_k=%s, sampler.top_p=%s truncate the sampling distribution; RL importance "
                  "ratios assume the untruncated one (use top_k=0, top_p=1 for RL)",
                  values.get("sampler.top_k"), values.get("sampler.top_p"))


# ----------------------------------------------------------------------------- overrides

def suggest_key(config, dotted_key: str) -> str | None:
  """The existing dotted path closest to `dotted_key` (difflib), or None."""
  paths = all_paths(config)
  matches = difflib.get_close_matches(dotted_key, paths, n=1, cutoff=0.6)
  if not matches:  # a typo in the last component alone: compare names under the same parent
    parent, _, name = dotted_key.rpartition(".")
    siblings = [p for p in paths if p.rpartition(".")[0] == parent]
    names = difflib.get_close_matches(name, [p.rpartition(".")[2] for p in siblings], n=1, cutoff=0.5)
    matches = [f"{parent}.{names[0]}" if parent else names[0]] if names else []
  return matches[0] if matches else None


def override_keys(argv, flag_name: str = "config") -> list[tuple[str, str]]:
  """(argument as typed, dotted key) for each `--config.a.b=v`, `--config.a.b v`, `--noconfig.a.b`."""
  pattern = re.compile(rf"^--?(?:no)?{re.escape(flag_name)}\.([^=]+)")
  out = []
  for arg in argv:
    match = pattern.match(arg)
    if match:
      out.append((arg.split("=", 1)[0], match.group(1)))
  return out


def check_overrides(config, argv=None, flag_name: str = "config") -> None:
  """Raises ConfigError for each override in `argv` that names no field of `config`.

  `check_overrides(sys.argv)` (argv alone) loads the config file that argv names with the
  registered `--config` flag's parser first; it does nothing when argv names no config file.
  """
  if argv is None:
    argv, config = config, load_config_from_argv(config, flag_name)
    if config is None:
      return
  known = set(all_paths(config))
  found = []
  for typed, key in override_keys(argv, flag_name):
    if key in known:
      continue
    guess = suggest_key(config, key)
    hint = f"did you mean '{guess}'?" if guess else _fields_under(config, key)
    found.append(f"{typed}: unknown field '{key}'; {hint}")
  if found:
    raise ConfigError("\n".join(found))


def _fields_under(config, key: str) -> str:
  parts, node, prefix = key.split("."), config, []
  for part in parts[:-1]:
    if not (_is_mapping(node) and part in node and _is_mapping(node[part])):
      break
    node, prefix = node[part], prefix + [part]
  where = ".".join(prefix) or "the top level"
  return f"fields at {where}: {', '.join(sorted(node.keys()))}"


def config_file_from_argv(argv, flag_name: str = "config") -> str | None:
  """The value of `--config=path[:arg]` (or `--config path[:arg]`) in argv, if any."""
  for i, arg in enumerate(argv):
    for prefix in (f"--{flag_name}=", f"-{flag_name}="):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in (f"--{flag_name}", f"-{flag_name}") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config_from_argv(argv, flag_name: str = "config"):
  """The config that `--config=path[:arg]` in argv names, loaded by the registered flag's parser
  (it imports the file and calls get_config(arg), as flag parsing will); None without one."""
  from absl import flags

  path = config_file_from_argv(argv, flag_name)
  if path is None or flag_name not in flags.FLAGS:
    return None
  return flags.FLAGS[flag_name].parser.parse(path)


def flags_parser(argv, flag_name: str = "config"):
  """`app.run(main, flags_parser=flags_parser)`: checks config overrides, then parses as absl does.

  ml_collections only raises a bare AttributeError deep inside flag parsing for an unknown
  override; this loads the config file first and exits with a one-line message per typo.
  """
  from absl import app

  config = load_config_from_argv(argv, flag_name)
  if config is not None:
    try:
      check_overrides(config, argv, flag_name)
    except ConfigError as e:
      print(f"FATAL config error:\n{e}", file=sys.stderr)
      sys.exit(1)
  return app.parse_flags_with_usage(argv)
