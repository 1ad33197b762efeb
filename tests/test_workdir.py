"""Runs you can trust: errors during a save, stop semantics, workdir lock and config changes,
cut logs, bad inputs, corrupt checkpoints and a quiet console. Each test reproduces a fault
through the entry point (or the module that owns it) and checks what the user gets."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from demo_base import fresh, tiny_config, train_base
from p3o_jax import checkpoint, config_base, host_devices, main, pipeline
from p3o_jax import workdir as workdir_lib
from p3o_jax.metrics_log import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

# What the command line needs to build tiny_config() from configs/demo.py:runlocal.
TINY_ARGS = ["--config.sft.steps=2", "--config.rm.steps=2", "--config.rm.num_prompts=8",
             "--config.sft.batch_size=16", "--config.rm.batch_size=16", "--config.log.tensorboard=False",
             "--config.mesh.data=1"]


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """SFT and reward model trained once (2 steps each) for the tests of this module."""
  return train_base(tmp_path_factory)


def main_command(workdir, *args):
  return [sys.executable, "-m", "p3o_jax.main", "--config=configs/demo.py:runlocal", f"--workdir={workdir}",
          *TINY_ARGS, *args]


def main_env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS, os.environ.get("PYTHONPATH", "")]))


def run_main(workdir, *args, timeout=300):
  return subprocess.run(main_command(workdir, *args), cwd=REPO, env=main_env(), capture_output=True, text=True,
                        timeout=timeout)


def ckpt_dir(workdir, stage="rl/p3o"):
  return os.path.join(workdir, *stage.split("/"), "ckpt")


def test_error_during_an_async_save_commits_it_and_reports_the_error_once(base_workdir, tmp_path):
  workdir = fresh(base_workdir, tmp_path)
  proc = run_main(workdir, "--config.stage=rl", "--config.ckpt.every=1", "--config.rl.iterations=6",
                  "--config.model.reward_fn=faults:reward_failing_on_third_call")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.count("Traceback") == 1, proc.stderr[-5000:]
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last == "RuntimeError: reward service unavailable", proc.stderr[-3000:]
  # The save started before the error is committed, not left half-written.
  assert sorted(os.listdir(ckpt_dir(workdir))) == ["1"]


def test_sigterm_saves_exits_143_without_export_and_the_next_stage_refuses(base_workdir, tmp_path):
  workdir = fresh(base_workdir, tmp_path)
  log = open(tmp_path / "stderr.txt", "w+")
  proc = subprocess.Popen(main_command(workdir, "--config.stage=rl", "--config.rl.iterations=200",
                                       "--config.ckpt.every=100"), cwd=REPO, env=main_env(), stdout=subprocess.DEVNULL,
                          stderr=log, text=True)
  try:
    metrics = os.path.join(workdir, "rl", "p3o", "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and any("loss/total" in r for r in read_jsonl(metrics))):
      assert proc.poll() is None and time.time() < deadline, "the run ended before its first iteration"
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
  finally:
    if proc.poll() is None:
      proc.kill()
  log.seek(0)
  stderr = log.read()
  assert "Stopped by SIGTERM during stage rl/p3o (checkpoint step" in stderr, stderr[-3000:]
  assert "To resume, rerun the same command:" in stderr and "--config.stage=rl" in stderr
  stage = os.path.join(workdir, "rl", "p3o")
  assert not os.path.exists(os.path.join(stage, "hf"))  # no final export from a stopped run
  assert not workdir_lib.is_complete(stage)
  steps = checkpoint.committed_steps(os.path.join(stage, "ckpt"))
  assert len(steps) == 1 and 1 <= steps[0] < 200
  config = tiny_config()
  config.stage = "eval"
  with pytest.raises(workdir_lib.IncompleteStageError, match=r"rl/p3o.*incomplete.*--config.stage=rl"):
    main.run(config, workdir)


def test_a_stage_refuses_an_unfinished_upstream_stage(tmp_path):
  os.makedirs(tmp_path / "sft" / "ckpt" / "2")  # what a stopped sft leaves: a checkpoint, no export
  config = tiny_config()
  config.stage = "rm"
  with pytest.raises(workdir_lib.IncompleteStageError, match=r"stage rm reads the output of stage sft.*incomplete"):
    main.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "rm")
  shutil.rmtree(tmp_path / "sft")
  with pytest.raises(workdir_lib.IncompleteStageError, match=r"sft does not exist: run --config.stage=sft first"):
    main.run(config, str(tmp_path))


def test_workdir_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path, caplog):
  import json
  import socket
  config = tiny_config()
  config.stage = "rm"  # fails fast after the lock (no sft stage here), which is all this test needs
  lock = tmp_path / ".lock"
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "time": time.time()}))
  with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"in use by process {os.getppid()} on host"):
    main.run(config, str(tmp_path))
  assert json.loads(lock.read_text())["pid"] == os.getppid()  # a live owner's lock is left alone
  dead = subprocess.Popen(["true"])
  dead.wait()
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": time.time()}))
  with caplog.at_level("WARNING", logger="p3o_jax.workdir"):
    with pytest.raises(workdir_lib.IncompleteStageError):
      main.run(config, str(tmp_path))
  assert f"left by process {dead.pid}" in caplog.text and "taking it over" in caplog.text
  assert not lock.exists()  # released when the run ended


def test_resuming_with_changed_fields_fails_naming_them(base_workdir, tmp_path):
  import json
  workdir = fresh(base_workdir, tmp_path)
  config = tiny_config()
  config.stage, config.rl.iterations, config.ckpt.every = "rl", 1, 1
  main.run(config, workdir)
  changed = tiny_config()
  changed.stage, changed.rl.iterations = "rl", 2  # iterations may change: a longer run
  changed.rl.beta, changed.optim.lr = 0.2, 1e-3
  with pytest.raises(workdir_lib.ConfigChangedError, match=r"(?s)rl/p3o would resume checkpoint step 1.*"
                     r"optim.lr: 0.0003 -> 0.001.*rl.beta: 0.1 -> 0.2.*allow_changes=optim.lr,rl.beta"):
    main.run(changed, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["rl"]["beta"] == 0.1  # written only once the checks pass
  changed.ckpt.allow_changes = "rl.bta"
  with pytest.raises(Exception, match="ckpt.allow_changes names rl.bta, which match no config field"):
    main.run(changed, workdir)
  changed.ckpt.allow_changes = "rl.beta,optim.*"
  main.run(changed, workdir)
  steps = [r["step"] for r in read_jsonl(os.path.join(workdir, "rl", "p3o", "metrics.jsonl")) if "loss/total" in r]
  assert steps == [1, 2]  # resumed, not restarted
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["rl"]["beta"] == 0.2
  kept = [name for name in os.listdir(workdir) if name.startswith("config.json.")]
  assert len(kept) == 1
  with open(os.path.join(workdir, kept[0])) as f:
    assert json.load(f)["rl"]["beta"] == 0.1


def test_sampler_devices_may_change_on_resume():
  """sampler.cpu_devices never changes the samples, so a checkpoint saved with another setting, or
  before the field existed, resumes; a sampler setting that does change them is refused."""
  current = workdir_lib.fingerprint(config_base.base_config())
  saved = {k: v for k, v in current.items() if k != "sampler.cpu_devices"}
  for stage in ("rm", "rl"):
    assert workdir_lib.config_changes(saved, current, stage) == []
    assert workdir_lib.config_changes({**saved, "sampler.cpu_devices": "1"}, current, stage) == []
    assert workdir_lib.config_changes({**saved, "sampler.top_k": 5}, current, stage) == ["sampler.top_k: 5 -> 0"]


def test_demo_pipeline_console_is_short_and_ends_in_the_summary(tmp_path):
  """configs/demo.py:runlocal as a user runs it: a few lines of config, one bar per stage,
  the stage summaries and where the outputs are; no INFO lines from orbax or absl."""
  env = {k: v for k, v in main_env().items() if k != "XLA_FLAGS"}  # no simulated devices: as a user's shell
  proc = subprocess.run([sys.executable, "-m", "p3o_jax.main", "--config=configs/demo.py:runlocal",
                         f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  console = proc.stdout + proc.stderr
  assert console.count("\n") < 150, console
  assert "p3o_jax: task demo, sft -> rm -> rl/p3o -> eval" in proc.stdout
  # The trainer on one CPU device by default (mesh.cpu_devices=1), the sampler on one per core
  assert "cpu device(s), mesh {'data': 1," in proc.stdout, proc.stdout
  if host_devices.cores() > 1:
    assert "mesh.cpu_devices=1, sampler.cpu_devices=auto" in proc.stdout, proc.stdout
    assert proc.stdout.count(f"sampler on {host_devices.cores()} CPU devices (sampler.cpu_devices=auto") == 1, proc.stdout
  assert "== eval summary ==" in proc.stdout and "Done in" in proc.stdout and "p3o policy (HF)" in proc.stdout
  assert "orbax" not in console and "] Saving checkpoint" not in console
  for bar in ("sft:", "rm:", "rl/p3o:"):
    assert bar in proc.stderr


def test_log_level_info_brings_library_logs_back(tmp_path):
  proc = run_main(str(tmp_path), "--config.stage=sft", "--config.sft.steps=1", "--config.log.level=info")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Saving checkpoint at step 1" in proc.stderr  # orbax's own INFO line


def test_an_export_linked_from_a_complete_stage_counts_as_complete(tmp_path):
  """bench/study_runs.py links each run's sft/hf to a shared base workdir's export."""
  base = tmp_path / "base" / "sft"
  os.makedirs(base / "hf")
  run = tmp_path / "run" / "sft"
  os.makedirs(run)
  os.symlink(base / "hf", run / "hf")
  assert not workdir_lib.is_complete(str(run))  # the base stage has not finished
  workdir_lib.mark_complete(str(base))
  assert workdir_lib.is_complete(str(run))
