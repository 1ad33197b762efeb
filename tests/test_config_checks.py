"""Config validation: each bad field is named; override typos get a did-you-mean."""
import importlib.util
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from p3o_jax import config_checks, value_checks
from p3o_jax.config_checks import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.sampler = ml_collections.ConfigDict(dict(max_new_tokens=16, min_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0))
  c.optim = ml_collections.ConfigDict(dict(lr=1e-5, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0, schedule="constant"))
  c.sft = ml_collections.ConfigDict(dict(steps=10, optim=ml_collections.ConfigDict(dict(lr=1e-4))))
  c.rl = ml_collections.ConfigDict(dict(algo="p3o", variant="v2", k=2, beta=0.05, eps=0.2, c=10.0,
                                        kl_source="theta", prompts_per_rollout=8, num_minibatches=2,
                                        micro_batches=2, inner_epochs=1, gamma=1.0, lam=0.95))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c


def errors_for(**changes):
  c = small_config()
  for path, value in changes.items():
    section, field = path.split("__")
    c[section][field] = value
  return config_checks.problems(c)


def test_valid_config_passes():
  config_checks.validate(small_config())
  assert config_checks.problems(small_config()) == []


@pytest.mark.parametrize("change, message", [
    (dict(optim__lr=-1.0), "optim.lr must be > 0, got -1"),
    (dict(optim__lr=0.0), "optim.lr must be > 0, got 0"),
    (dict(rl__k=1), "rl.k must be >= 2, got 1"),
    (dict(rl__algo="gpro"), "rl.algo must be one of 'p3o', 'ppo', 'online_dpo', 'dpo', 'simpo', 'orpo', 'kto', 'grpo', 'gspo', 'reinforce_pp', 'rloo'; got 'gpro'"),
    (dict(rl__variant="v3"), "rl.variant must be one of 'v1', 'v2'; got 'v3'"),
    (dict(rl__eps=0.0), "rl.eps must be > 0, got 0"),
    (dict(rl__c=0.5), "rl.c must be >= 1, got 0.5"),
    (dict(rl__beta=-0.1), "rl.beta must be >= 0, got -0.1"),
    (dict(rl__kl_source="ref"), "rl.kl_source must be one of 'theta', 'old'; got 'ref'"),
    (dict(sampler__temperature=0.0), "sampler.temperature must be > 0, got 0"),
    (dict(sampler__top_p=0.0), "sampler.top_p must be > 0, got 0"),
    (dict(sampler__top_p=1.5), "sampler.top_p must be <= 1, got 1.5"),
    (dict(rl__gamma=1.1), "rl.gamma must be <= 1, got 1.1"),
    (dict(sft__optim=ml_collections.ConfigDict(dict(lr=-2e-5))), "sft.optim.lr must be > 0, got -2e-05"),
    (dict(mesh__fsdp=0), "mesh.fsdp must be a positive int or -1"),
    (dict(optim__schedule="step"), "optim.schedule must be one of 'constant', 'cosine', 'linear'"),
])
def test_each_bad_field_is_named(change, message):
  found = errors_for(**change)
  assert len(found) == 1 and found[0].startswith(message), found


def test_types_are_checked():
  # A config file can set a field with the wrong type (ConfigDict locks the type it first sees).
  c = ml_collections.ConfigDict(dict(rl=dict(k=2.5, inner_epochs=True), optim=dict(lr="1e-5", b1=float("nan"))))
  assert sorted(config_checks.problems(c)) == [
      "optim.b1 must be finite, got nan",
      "optim.lr must be a number, got str '1e-5'",
      "rl.inner_epochs must be an int, got bool True",
      "rl.k must be an int, got float 2.5"]


def test_batch_arithmetic_and_cross_field_rules():
  assert errors_for(rl__num_minibatches=3) == [
      "rl.prompts_per_rollout=8 must be divisible by rl.num_minibatches=3 (each minibatch takes whole prompts "
      "with all their responses)"]
  assert errors_for(rl__micro_batches=3) == [
      "a minibatch of rl.prompts_per_rollout / rl.num_minibatches = 4 prompts must be divisible by "
      "rl.micro_batches=3"]
  assert errors_for(rl__micro_batches=0)[0].startswith("rl.micro_batches")
  assert errors_for(rl__algo="online_dpo", rl__k=4) == [
      "rl.algo='online_dpo' needs rl.k=2 responses per prompt, got 4"]
  assert errors_for(sampler__min_new_tokens=20) == ["sampler.min_new_tokens=20 must be <= sampler.max_new_tokens=16"]
  assert errors_for(mesh__data=-1, mesh__fsdp=-1)[0].startswith("at most one of mesh.data")


def test_validate_lists_every_problem_at_once():
  c = small_config()
  c.optim.lr, c.rl.k = -1.0, 1
  with pytest.raises(ConfigError) as info:
    config_checks.validate(c)
  assert "optim.lr must be > 0, got -1" in str(info.value) and "rl.k must be >= 2, got 1" in str(info.value)


def test_partial_config_checks_only_present_fields():
  c = ml_collections.ConfigDict(dict(rl=dict(k=3)))
  config_checks.validate(c)
  c.rl.k = 0
  assert config_checks.problems(c) == ["rl.k must be >= 2, got 0"]


def test_algorithm_choices_and_options_come_from_the_registry():
  """rl.algo and pipeline.algos take exactly the registered names; an algorithm's own options are
  in config_base with its default and checked by its rule; its K rule is a cross-check."""
  import dataclasses
  from p3o_jax import config_base
  from p3o_jax.rl import algorithms
  c = config_base.base_config()
  for name in algorithms.names():
    c.rl.algo, c.rl.k = name, 2
    assert config_checks.problems(c) == [], name
  c.rl.algo = "nope"
  assert any("rl.algo" in p and "grpo" in p for p in config_checks.problems(c))
  c.rl.algo, c.rl.loss_type = "grpo", "grpoo"
  assert config_checks.problems(c) == ["rl.loss_type must be one of 'grpo', 'dr_grpo', 'dapo'; got 'grpoo'"]
  c.rl.loss_type, c.rl.algo, c.rl.k = "grpo", "online_dpo", 3
  assert config_checks.problems(c) == ["rl.algo='online_dpo' needs rl.k=2 responses per prompt, got 3"]

  @dataclasses.dataclass(frozen=True)
  class Hyper:
    toy_option: float

  toy = type("Toy", (algorithms.Algorithm,), {"name": "toy_algo", "Hyper": Hyper,
                                              "options": {"toy_option": (1.5, value_checks.positive)}})
  algorithms.register(toy)
  try:
    c = config_base.base_config()
    assert c.rl.toy_option == 1.5
    c.rl.algo, c.pipeline.algos, c.rl.toy_option = "toy_algo", ("p3o", "toy_algo"), -1.0
    assert config_checks.problems(c) == ["rl.toy_option must be > 0, got -1.0"]
    assert algorithms.create(c.rl, None, 1.0).hp == Hyper(-1.0)
  finally:
    del algorithms.REGISTRY["toy_algo"]


def load_config_file(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name, arg", [("demo.py", None), ("demo.py", "runlocal"), ("demo.py", "algo=ppo"),
                                       ("demo.py", "algo=online_dpo,runlocal"), ("tldr.py", None), ("hh.py", None),
                                       ("ultrafeedback.py", None), ("ultrafeedback.py", "runlocal"), ("gsm8k.py", None),
                                       ("gsm8k.py", "algo=grpo,k=8,runlocal")])
def test_shipped_configs_are_valid(name, arg):
  config_checks.validate(load_config_file(name, arg))


def test_unknown_override_suggests_the_close_field():
  c = small_config()
  argv = ["main.py", "--config=cfg.py", "--config.rl.bta=0.1", "--config.rl.k", "4", "--noconfig.optim.lr",
          "--config.optm.lr=1", "--config.rl.zzzz=1", "--other=1"]
  with pytest.raises(ConfigError) as info:
    config_checks.check_overrides(c, argv)
  lines = str(info.value).splitlines()
  assert lines[0] == "--config.rl.bta: unknown field 'rl.bta'; did you mean 'rl.beta'?"
  assert lines[1] == "--config.optm.lr: unknown field 'optm.lr'; did you mean 'optim.lr'?"
  assert lines[2].startswith("--config.rl.zzzz: unknown field 'rl.zzzz'; fields at rl: algo, beta, c,")
  assert len(lines) == 3
  config_checks.check_overrides(c, ["main.py", "--config.rl.beta=0.1", "--config.rl=foo"])  # known: no error
  assert config_checks.suggest_key(c, "sampler.temprature") == "sampler.temperature"


def test_flags_parser_reports_typo_before_absl(tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text("import ml_collections\n"
                 "def get_config(arg=None):\n"
                 "  return ml_collections.ConfigDict(dict(rl=dict(beta=0.05, k=2)))\n")
  main = tmp_path / "main.py"
  main.write_text("from absl import app\nfrom ml_collections import config_flags\n"
                  "from p3o_jax import config_checks\n"
                  "CONFIG = config_flags.DEFINE_config_file('config')\n"
                  "def main(argv):\n  print('beta', CONFIG.value.rl.beta)\n"
                  "app.run(main, flags_parser=config_checks.flags_parser)\n")
  run = lambda *args: subprocess.run([sys.executable, str(main), f"--config={cfg}", *args],
                                     capture_output=True, text=True, timeout=60)
  bad = run("--config.rl.bta=0.1")
  assert bad.returncode == 1
  assert "--config.rl.bta: unknown field 'rl.bta'; did you mean 'rl.beta'?" in bad.stderr
  good = run("--config.rl.beta=0.2")
  assert good.returncode == 0 and "beta 0.2" in good.stdout


def test_check_overrides_from_argv_alone_uses_the_entry_points_config_flag():
  """`check_overrides(sys.argv)` as p3o_jax.main.entry() calls it: the config comes from argv."""
  from p3o_jax import main  # noqa: F401 - registers the --config flag
  demo = f"--config={REPO / 'configs' / 'demo.py'}:runlocal"
  with pytest.raises(ConfigError, match=r"--config.rl.bta: unknown field 'rl.bta'; did you mean 'rl.beta'\?"):
    config_checks.check_overrides(["main.py", demo, "--config.rl.bta=0.1"])
  config_checks.check_overrides(["main.py", demo, "--config.rl.beta=0.1"])
  config_checks.check_overrides(["main.py", "--config.rl.bta=0.1"])  # no config file named: absl reports it
