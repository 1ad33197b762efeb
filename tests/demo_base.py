"""The demo's runlocal config shrunk further for tests, and an SFT policy and reward model trained
from it once per test module (2 steps each), copied into each test's own workdir."""

import os
import shutil

from configs import demo
from p3o_jax import pipeline
from p3o_jax import workdir as workdir_lib


def tiny_config():
  c = demo.get_config("runlocal")
  c.sft.steps = c.rm.steps = 2
  c.rm.num_prompts = 8
  c.sft.batch_size = c.rm.batch_size = 16
  c.log.tensorboard = False
  c.mesh.data = 1  # one of the 8 simulated devices; the sharded runs are their own tests
  return c


def train_base(tmp_path_factory) -> str:
  """A workdir holding the tiny config's trained sft and rm stages."""
  workdir = str(tmp_path_factory.mktemp("base"))
  config = tiny_config()
  task = pipeline.load_task(config, workdir)
  pipeline.run_sft(config, workdir, task)
  pipeline.run_rm(config, workdir, task)
  return workdir


def fresh(base_workdir, tmp_path) -> str:
  """`tmp_path` as a workdir holding finished sft and rm stages (exports, the reward model's
  sampled and held-out pairs, completion markers)."""
  for stage in ("sft", "rm"):
    shutil.copytree(os.path.join(base_workdir, stage, "hf"), os.path.join(tmp_path, stage, "hf"))
    workdir_lib.mark_complete(os.path.join(tmp_path, stage))
  for name in (pipeline.PAIRS_FILE, pipeline.HELD_OUT_PAIRS_FILE):
    shutil.copy(os.path.join(base_workdir, "rm", name), os.path.join(tmp_path, "rm", name))
  return str(tmp_path)
