"""Runs of the study (`bench/frontier.py`, `bench/invariance.py`): one shared SFT (and reward
model) per task, then many RL runs from it, each its own workdir and its own process.

  <out>/base/<task>/sft/hf, rm/hf        trained once, seed 0
  <out>/runs/<name>/                     one RL run: sft/hf, rm/hf, rm/preferences.jsonl link to the base,
                                         rl/<algo>/metrics.jsonl holds its eval records,
                                         log.txt its output, study_args.json what it was run with

Every stage is `python -m p3o_jax.main --config.stage=...` in a child process with its own
session, bounded by a timeout and ended by its process-group id when it runs over. A run is
finished when its policy is exported and its log holds the final eval record; a rerun skips
finished runs and resumes unfinished ones from their checkpoints (p3o_jax/resume.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from p3o_jax import host_devices  # noqa: E402
from p3o_jax.eval import frontier  # noqa: E402
from p3o_jax.rl import algorithms  # noqa: E402

BASE_SEED = 0  # the shared SFT, reward model and task prompts
TASK_OPS = {"sort": ("sort",), "reverse": ("reverse",)}  # data.demo.ops per task name


@dataclasses.dataclass(frozen=True)
class Run:
  """One RL run: `args` are the --config.* overrides on top of the study's common ones."""
  name: str
  task: str
  label: str           # what tables and plots call the algorithm
  beta: float
  seed: int
  algo: str            # rl.algo: the folder under rl/
  args: tuple[str, ...]


def common_args(config_arg: str, task: str, extra: tuple[str, ...] = ()) -> list[str]:
  """Arguments every stage of a task gets: the demo config, the fixed task seed, one device."""
  ops = TASK_OPS[task]
  return [f"--config={os.path.join(REPO, 'configs', 'demo.py')}{config_arg}",
          f"--config.data.demo.seed={BASE_SEED}", f"--config.data.demo.ops={ops!r}",
          "--config.log.tensorboard=False", "--config.mesh.data=1", *extra]


def child_env(compile_cache: str | None = None) -> dict:
  """The children's environment: the repo importable, one CPU device per run (not a test session's
  simulated devices, nor p3o_jax's one per core: host_devices.py). `compile_cache`: p3o_jax's persistent compilation cache
  folder or 'off' (default: the caller's, p3o_jax/compile_cache.py); runs of one program (same
  algorithm, other seed or beta) then compile it once."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  # One CPU device per run (runs go --jobs at a time, one core each), whatever the caller simulates.
  env["XLA_FLAGS"] = host_devices.xla_flags_with_device_count(env.get("XLA_FLAGS", ""), 1)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  if compile_cache:
    env["P3O_JAX_COMPILE_CACHE"] = compile_cache
  return env


def _has_export(folder: str) -> bool:
  return os.path.isdir(folder) and any(f.endswith(".safetensors") for f in os.listdir(folder))


def base_dir(out: str, task: str) -> str:
  return os.path.join(out, "base", task)


def run_dir(out: str, run: Run) -> str:
  return os.path.join(out, "runs", run.name)


def metrics_path(out: str, run: Run) -> str:
  return os.path.join(run_dir(out, run), "rl", run.algo, "metrics.jsonl")


def is_finished(out: str, run: Run) -> bool:
  """Exported policy, and the log's last eval record is at the run's last iteration (an offline
  algorithm's: its last step)."""
  workdir = run_dir(out, run)
  if not _has_export(os.path.join(workdir, "rl", run.algo, "hf")):
    return False
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    iterations = saved["dpo"]["steps"] if algorithms.get(run.algo).offline else saved["rl"]["iterations"]
    points = frontier.load_frontier(metrics_path(out, run))
  except (OSError, ValueError, KeyError):
    return False
  return bool(points) and points[-1].step == iterations


def eval_points(out: str, run: Run) -> list[frontier.FrontierPoint]:
  return frontier.load_frontier(metrics_path(out, run))


class Child:
  """A stage in its own process session, its output in `log`, killed by its group id on timeout."""

  def __init__(self, name: str, argv: list[str], log: str, env: dict, timeout: float):
    self.name, self.log, self.timeout = name, log, timeout
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "ab") as f:
      self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   start_new_session=True)
    self.start = time.time()

  def poll(self) -> int | None:
    """The exit status when done; ends the process group and returns -9 past the timeout."""
    rc = self.proc.poll()
    if rc is None and time.time() - self.start > self.timeout:
      self.kill()
      return -9
    return rc

  def kill(self):
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):  # SIGTERM: the stage saves and exits
      try:
        os.killpg(self.proc.pid, sig)
      except ProcessLookupError:
        return
      try:
        self.proc.wait(wait)
        return
      except subprocess.TimeoutExpired:
        continue


def stage_argv(workdir: str, stage: str, args: list[str]) -> list[str]:
  config, rest = args[0], args[1:]  # --config=... comes before any --config.* override
  return [sys.executable, "-m", "p3o_jax.main", config, f"--workdir={workdir}", f"--config.stage={stage}", *rest]


def train_base(out: str, task: str, args: list[str], env: dict, timeout: float, stages=("sft", "rm")):
  """The task's SFT (and reward model) once, seed BASE_SEED, in one process (bench/train_base.py);
  a stage already exported is not rerun."""
  workdir = base_dir(out, task)
  todo = [s for s in stages if not _has_export(os.path.join(workdir, s, "hf"))]
  if not todo:
    return
  config, rest = args[0], args[1:]
  argv = [sys.executable, os.path.join(REPO, "bench", "train_base.py"), config, f"--workdir={workdir}",
          f"--stages={','.join(todo)}", *rest, f"--config.seed={BASE_SEED}"]
  child = Child(f"{task}/base", argv, os.path.join(workdir, "base.log"), env, timeout)
  while (rc := child.poll()) is None:
    time.sleep(0.2)
  if rc != 0:
    raise RuntimeError(f"{task}: shared stages {todo} failed (exit {rc}); see {child.log}")
  print(f"  base {task} ({'+'.join(todo)}): {time.time() - child.start:.0f}s", flush=True)


def prepare_run(out: str, run: Run, args: list[str]):
  """The run's workdir with links to the shared SFT and reward model; refuses a workdir made with
  other arguments (a finished run there would be skipped and silently mixed into the results)."""
  workdir = run_dir(out, run)
  os.makedirs(workdir, exist_ok=True)
  record = os.path.join(workdir, "study_args.json")
  if os.path.exists(record):
    with open(record) as f:
      before = json.load(f)
    if before != args:
      raise ValueError(f"{workdir} was run with other arguments:\n  {before}\nnow:\n  {args}\n"
                       "use another --out")
  else:
    with open(record, "w") as f:
      json.dump(args, f, indent=1)
  for stage, name in (("sft", "hf"), ("rm", "hf"), ("rm", "preferences.jsonl")):  # the pairs: offline DPO's data
    source = os.path.join(base_dir(out, run.task), stage, name)
    link = os.path.join(workdir, stage, name)
    if os.path.exists(source) and not os.path.lexists(link):
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(source, link)


def run_all(out: str, runs: list[Run], args_of, env: dict, jobs: int, timeout: float) -> dict[str, str]:
  """Every unfinished run, `jobs` at a time; returns {name: 'skipped' | 'done' | 'failed (...)'}.
  `args_of(run)` gives the run's full --config arguments."""
  status = {r.name: "skipped" for r in runs if is_finished(out, r)}
  pending = [r for r in runs if r.name not in status]
  print(f"{len(runs)} runs: {len(status)} finished, {len(pending)} to run, {jobs} at a time", flush=True)
  for run in pending:  # every workdir checked before the first child starts
    prepare_run(out, run, args_of(run))
  active: list[tuple[Run, Child]] = []
  while pending or active:
    while pending and len(active) < jobs:
      run = pending.pop(0)
      argv = stage_argv(run_dir(out, run), "rl", args_of(run))
      active.append((run, Child(run.name, argv, os.path.join(run_dir(out, run), "log.txt"), env, timeout)))
    for run, child in list(active):
      rc = child.poll()
      if rc is None:
        continue
      active.remove((run, child))
      took = time.time() - child.start
      ok = rc == 0 and is_finished(out, run)
      status[run.name] = "done" if ok else f"failed (exit {rc}{', timed out' if rc == -9 else ''})"
      print(f"  {run.name}: {status[run.name]} in {took:.0f}s", flush=True)
    time.sleep(0.2)
  return status
