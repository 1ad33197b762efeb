"""Runs you can trust: errors during a save, stop semantics, workdir lock and config changes,
cut logs, bad inputs, corrupt checkpoints and a quiet console. Each test reproduces a fault
through the entry point (or the module that owns it) and checks what the user gets."""

import os
import shutil
import subprocess
import sys

import pytest

from configs import demo
from p3o_jax import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

CALLS = {"n": 0}


def reward_failing_on_third_call(prompts, responses):
  """A reward_fn that fails in the second training rollout, while the save of iteration 1 is
  still being written (ckpt.every=1)."""
  from p3o_jax.data import synthetic
  CALLS["n"] += 1
  if CALLS["n"] == 3:
    raise RuntimeError("reward service unavailable")
  return synthetic.gold_reward(prompts, responses)


def tiny_config():
  c = demo.get_config("runlocal")
  c.sft.steps = c.rm.steps = 2
  c.rm.num_prompts = 8
  c.sft.batch_size = c.rm.batch_size = 16
  c.log.tensorboard = False
  c.mesh.data = 1
  return c


# What the command line needs to build tiny_config() from configs/demo.py:runlocal.
TINY_ARGS = ["--config.sft.steps=2", "--config.rm.steps=2", "--config.rm.num_prompts=8",
             "--config.sft.batch_size=16", "--config.rm.batch_size=16", "--config.log.tensorboard=False",
             "--config.mesh.data=1"]


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """SFT and reward model trained once (2 steps each) for the tests of this module."""
  workdir = str(tmp_path_factory.mktemp("base"))
  config = tiny_config()
  task = pipeline.load_task(config, workdir)
  pipeline.run_sft(config, workdir, task)
  pipeline.run_rm(config, workdir, task)
  return workdir


def fresh(base_workdir, tmp_path):
  """A workdir holding finished sft and rm stages."""
  for stage in ("sft", "rm"):
    shutil.copytree(os.path.join(base_workdir, stage, "hf"), os.path.join(tmp_path, stage, "hf"))
  return str(tmp_path)


def run_main(workdir, *args, timeout=300):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "p3o_jax.main", "--config=configs/demo.py:runlocal",
                         f"--workdir={workdir}", *TINY_ARGS, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def ckpt_dir(workdir, stage="rl/p3o"):
  return os.path.join(workdir, *stage.split("/"), "ckpt")


def test_error_during_an_async_save_commits_it_and_reports_the_error_once(base_workdir, tmp_path):
  workdir = fresh(base_workdir, tmp_path)
  proc = run_main(workdir, "--config.stage=rl", "--config.ckpt.every=1", "--config.rl.iterations=6",
                  "--config.model.reward_fn=test_workdir:reward_failing_on_third_call")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.count("Traceback") == 1, proc.stderr[-5000:]
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last == "RuntimeError: reward service unavailable", proc.stderr[-3000:]
  # The save started before the error is committed, not left half-written.
  assert sorted(os.listdir(ckpt_dir(workdir))) == ["1"]
