"""End to end on the demo config: every algorithm runs, resume is exact, bad config is named,
a corrupt checkpoint is skipped, and the entry point prints where its outputs are."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import demo_base
from demo_base import fresh
from p3o_jax import main, pipeline
from p3o_jax.config_checks import ConfigError
from p3o_jax.metrics_log import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**rl):
  c = demo_base.tiny_config()
  c.rl.iterations = c.dpo.steps = 3
  c.rl.prompts_per_rollout = 4
  c.rl.num_minibatches = 2
  c.rl.inner_epochs = 2
  c.eval.every = 3
  c.eval.num_prompts = 4
  c.ckpt.every = 1
  for key, value in rl.items():
    c.rl[key] = value
  return c


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """SFT and reward model trained once (2 steps each) for every RL test in this module."""
  return demo_base.train_base(tmp_path_factory)


def run_rl(config, workdir, stop=None):
  config.stage = "rl"
  task = pipeline.load_task(config, workdir)
  return pipeline.run_rl(config, workdir, task, stop)


def iteration_rows(workdir, algo):
  return [r for r in read_jsonl(os.path.join(workdir, "rl", algo, "metrics.jsonl")) if "loss/total" in r]


def assert_finite_iterations(workdir, algo, steps):
  from p3o_jax.rl import algorithms
  rows = iteration_rows(workdir, algo)
  assert [r["step"] for r in rows] == steps
  names = (("loss/total", "rewards/margins", "logps/chosen", "optim/grad_norm")
           if algorithms.get(algo).offline else
           ("loss/total", "objective/kl", "objective/scores", "objective/rlhf_reward", "gold/reward", "optim/grad_norm"))
  for row in rows:
    for name in names:
      assert np.isfinite(row[name]), (name, row)
  # docs/pitfalls.md, 1: old log-probs come from the trainer's forward, so the first ratio is 1.
  if "val/ratio_first_minibatch" in rows[0]:
    np.testing.assert_allclose(rows[0]["val/ratio_first_minibatch"], 1.0, atol=1e-5)
  return rows


@pytest.mark.parametrize("rl", [
    dict(algo="p3o", variant="v1"),
    dict(algo="p3o", variant="v2", k=4, micro_batches=2),
], ids=["p3o-v1", "p3o-k4"])
def test_three_iterations_of_p3o_variants(base_workdir, tmp_path, rl):
  workdir = fresh(base_workdir, tmp_path)
  export = run_rl(tiny_config(**rl), workdir)
  assert_finite_iterations(workdir, rl["algo"], [1, 2, 3])
  assert os.path.isfile(os.path.join(export, "model.safetensors"))


def registry_runs():
  """Every registered algorithm with its defaults, and GRPO's other loss types."""
  from p3o_jax.rl import algorithms
  runs = [dict(algo=name) for name in algorithms.names()]
  runs += [dict(algo="grpo", loss_type="dr_grpo"), dict(algo="grpo", loss_type="dapo", rollout_is="tis")]
  return runs


@pytest.mark.parametrize("rl", registry_runs(), ids=lambda rl: "-".join(str(v) for v in rl.values()))
def test_every_algorithm_runs_checkpoints_and_resumes_bitwise(base_workdir, tmp_path, rl):
  """3 iterations with finite metrics and a checkpoint each; stopped after 2 and resumed, the
  third iteration and the exported policy are bitwise those of the straight run."""
  straight = fresh(base_workdir, tmp_path / "straight")
  export_a = run_rl(tiny_config(**rl), straight)
  rows_a = assert_finite_iterations(straight, rl["algo"], [1, 2, 3])
  assert sorted(os.listdir(os.path.join(straight, "rl", rl["algo"], "ckpt"))) == ["1", "2", "3"]

  resumed = fresh(base_workdir, tmp_path / "resumed")
  run_rl(tiny_config(**rl), resumed, stop=StopAfter(2))
  export_b = run_rl(tiny_config(**rl), resumed)
  rows_b = iteration_rows(resumed, rl["algo"])
  assert [r["step"] for r in rows_b] == [1, 2, 3]
  a, b = _final_params(export_a), _final_params(export_b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  for name, value in rows_a[2].items():
    if name not in VOLATILE:
      assert rows_b[2][name] == value, name
  evals = [r for r in read_jsonl(os.path.join(resumed, "rl", rl["algo"], "metrics.jsonl")) if "eval/kl" in r]
  assert [r["step"] for r in evals] == [0, 3] and abs(evals[0]["eval/kl"]) < 1e-5 < abs(evals[1]["eval/kl"])
  sft = _final_params(os.path.join(straight, "sft", "hf"))
  assert any(not np.array_equal(sft[name], a[name]) for name in sft)
  if rl["algo"] == "dpo":  # reference log-probs from the starting policy: every margin is 0 at step 1
    np.testing.assert_allclose(rows_a[0]["loss/total"], np.log(2), atol=1e-6)
    np.testing.assert_allclose(rows_a[0]["rewards/margins"], 0.0, atol=1e-6)
    # and on the held-out pairs, scored at every evaluation
    np.testing.assert_allclose(evals[0]["held_out/loss/dpo"], np.log(2), atol=1e-6)
    assert np.isfinite(evals[1]["held_out/rewards/accuracies"]) and evals[1]["held_out/loss/dpo"] != evals[0]["held_out/loss/dpo"]
  if rl["algo"] == "kto":  # from the reference: each response's loss 1 - sigma(0), the KL reference point 0
    np.testing.assert_allclose((rows_a[0]["loss/total"], rows_a[0]["kl"]), (0.5, 0.0), atol=1e-6)
    np.testing.assert_allclose((evals[0]["held_out/loss/kto"], evals[0]["held_out/kl"]), (0.5, 0.0), atol=1e-6)
    assert evals[1]["held_out/loss/kto"] != 0.5


class StopAfter:
  """Stands in for the SIGTERM flag: reads as requested once n iterations have finished."""

  def __init__(self, n):
    self.n, self.reads = n, 0

  @property
  def requested(self):
    self.reads += 1
    return self.reads >= self.n


def _final_params(export):
  return load_file(os.path.join(export, "model.safetensors"))


VOLATILE = ("time", "elapsed", "rl/tokens_per_s", "tokens_per_s")


def test_stop_and_resume_is_bitwise(base_workdir, tmp_path):
  straight = fresh(base_workdir, tmp_path / "straight")
  export_a = run_rl(tiny_config(iterations=4), straight)

  resumed = fresh(base_workdir, tmp_path / "resumed")
  run_rl(tiny_config(iterations=4), resumed, stop=StopAfter(2))
  assert [r["step"] for r in iteration_rows(resumed, "p3o")] == [1, 2]
  export_b = run_rl(tiny_config(iterations=4), resumed)

  a, b = _final_params(export_a), _final_params(export_b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  rows_a = {r["step"]: r for r in iteration_rows(straight, "p3o")}
  rows_b = {r["step"]: r for r in iteration_rows(resumed, "p3o")}
  assert sorted(rows_b) == [1, 2, 3, 4]
  for step in (3, 4):
    for name, value in rows_a[step].items():
      if name not in VOLATILE:
        assert rows_b[step][name] == value, (step, name)


def test_corrupt_latest_checkpoint_falls_back(base_workdir, tmp_path, caplog):
  workdir = fresh(base_workdir, tmp_path)
  run_rl(tiny_config(iterations=2), workdir)
  ckpt = os.path.join(workdir, "rl", "p3o", "ckpt")
  latest = os.path.join(ckpt, "2")
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with caplog.at_level("WARNING"):
    run_rl(tiny_config(iterations=3), workdir)
  assert "step 2 is unreadable" in caplog.text and "falling back to step 1" in caplog.text
  assert [r["step"] for r in iteration_rows(workdir, "p3o")][-2:] == [2, 3]


def test_config_errors_name_the_field():
  config = tiny_config()
  with pytest.raises(ConfigError, match=r"did you mean 'rl.beta'"):
    from p3o_jax import config_checks
    config_checks.check_overrides(config, ["prog", "--config.rl.bta=0.1"])
  for field, value, pattern in (("optim.lr", -1.0, "optim.lr"), ("rl.k", 1, "rl.k"),
                                ("rl.algo", "reinforce", "rl.algo")):
    bad = tiny_config()
    section, name = field.split(".")
    bad[section][name] = value
    with pytest.raises(ConfigError, match=pattern):
      main.run(bad, "/nonexistent/should-not-be-created")
  assert not os.path.exists("/nonexistent/should-not-be-created")


def test_unknown_override_on_the_command_line_suggests_the_match():
  proc = subprocess.run(
      [sys.executable, "-m", "p3o_jax.main", "--config=configs/demo.py:runlocal", "--workdir=/tmp/unused",
       "--config.rl.bta=0.1"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "did you mean 'rl.beta'" in proc.stderr


JUDGED = []


def prefer_shorter(prompt, first, second):
  """A judge for the eval hook: the shorter response wins."""
  JUDGED.append(prompt)
  return 0.5 if len(first) == len(second) else float(len(first) < len(second))


def test_pipeline_prints_where_outputs_are(tmp_path, capsys):
  config = tiny_config()
  config.rl.iterations = 1
  config.eval.judge = "test_pipeline:prefer_shorter"
  main.run(config, str(tmp_path))
  out = capsys.readouterr().out
  for name in ("sft policy (HF)", "reward model (HF)", "p3o policy (HF)", "report", "plots"):
    assert name in out
  assert os.path.isfile(os.path.join(tmp_path, "eval", "report.md"))
  assert os.path.isfile(os.path.join(tmp_path, "eval", "frontier.png"))
  assert os.path.isfile(os.path.join(tmp_path, "eval", "win_rate_judge.png"))
  assert len(JUDGED) == config.eval.num_prompts  # one sft-vs-p3o comparison per held-out prompt
  for stage in ("sft", "rm", os.path.join("rl", "p3o"), "eval"):  # each stage's completion marker
    assert os.path.isfile(os.path.join(tmp_path, stage, "COMPLETE")), stage
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["rl"]["algo"] == "p3o"


def test_rl_runs_on_a_sharded_mesh(base_workdir, tmp_path):
  """config.mesh wires the loop onto a (data=2, fsdp=2, tensor=2) mesh of 8 simulated devices.
  (Equality with one device is tested on a fixed batch in test_accumulation.py: two separate
  rollouts can differ by a sampled token flipped on float rounding.)"""
  workdir = fresh(base_workdir, tmp_path)
  config = tiny_config(iterations=1)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  export = run_rl(config, workdir)
  row = iteration_rows(workdir, "p3o")[0]
  for name in ("loss/total", "objective/kl", "optim/grad_norm"):
    assert np.isfinite(row[name]), name
  before, after = _final_params(os.path.join(workdir, "sft", "hf")), _final_params(export)
  assert any(not np.array_equal(before[n], after[n]) for n in after), "one RL iteration should move the policy"


def test_python_reward_function_replaces_the_reward_model(base_workdir, tmp_path):
  workdir = fresh(base_workdir, tmp_path)
  shutil.rmtree(os.path.join(workdir, "rm"))  # not needed, so not read
  config = tiny_config(iterations=2)
  config.model.reward_fn = "p3o_jax.data.synthetic:gold_reward"
  run_rl(config, workdir)
  for row in iteration_rows(workdir, "p3o"):
    np.testing.assert_allclose(row["objective/scores"], row["gold/reward"], rtol=1e-6)
  config.model.reward_fn = "p3o_jax.data.synthetic"
  with pytest.raises(ValueError, match="package.module:function"):
    run_rl(config, workdir)


def test_fsdp8_runs_with_a_checkpoint_every_iteration(base_workdir, tmp_path):
  """One process, fsdp=8: five RL runs saving every iteration (the non-finite check is one
  jitted program, not one eager collective per leaf, so saves cannot interleave and abort)."""
  for run in range(5):
    workdir = fresh(base_workdir, tmp_path / str(run))
    config = tiny_config(iterations=3)
    config.mesh.data, config.mesh.fsdp = 1, 8
    run_rl(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "rl", "p3o", "ckpt"))) == ["1", "2", "3"]


def test_a_file_url_workdir_runs_and_resumes(base_workdir, tmp_path):
  """A workdir given as a URL goes through etils.epath: file://... is the folder itself (never
  a local folder named 'file:'), and a rerun resumes from its checkpoint."""
  workdir = fresh(base_workdir, tmp_path / "run")
  url = "file://" + workdir
  run_rl(tiny_config(iterations=2), url)
  assert not os.path.exists("file:") and sorted(os.listdir(os.path.join(workdir, "rl", "p3o", "ckpt"))) == ["1", "2"]
  run_rl(tiny_config(iterations=3), url)
  steps = [r["step"] for r in iteration_rows(workdir, "p3o")]
  assert steps == [1, 2, 3], steps
  assert os.path.isfile(os.path.join(workdir, "rl", "p3o", "hf", "model.safetensors"))
