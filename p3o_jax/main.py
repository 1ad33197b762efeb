"""Entry point.

  python -m p3o_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m p3o_jax.main --config=configs/tldr.py --workdir=gs://... --config.rl.algo=ppo --config.rl.beta=0.1
  python -m p3o_jax.main --config=configs/demo.py --workdir=runs/demo --config.stage=rl

config.stage picks sft | rm | rl | eval | pipeline (all four in order, RL once per algorithm
in config.pipeline.algos). Each stage reads the previous stage's output from the workdir;
a stage that finds its own checkpoint there resumes from it.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time

import jax

from absl import app, flags, logging
from ml_collections import config_flags

from p3o_jax import (checkpoint, compile_cache, config_checks, distributed, host_devices, host_memory, paths,
                     pipeline, sharding)
from p3o_jax import workdir as workdir_lib
from p3o_jax.data import batching

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file: configs/<name>.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, logs, exports and plots go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process job first (jax.distributed): "
                                 "TPU pods, SLURM and Open MPI are detected; elsewhere name the coordinator.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1 (with --distributed).")
_LOCAL_DEVICES = flags.DEFINE_list("local_device_ids", None, "Devices this process owns, e.g. 0,1,2,3 "
                                   "(default: all it sees, or what the cluster assigns).")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for every process to join.")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", None, "JAX's persistent compilation cache folder, or 'off' "
                                     "(default: $P3O_JAX_COMPILE_CACHE, else ~/.cache/p3o_jax/jax).")


class Stopped(SystemExit):
  """A signal stopped the run after a checkpoint; exits 128 + the signal's number."""


def _stage_runs(config, stages):
  """(stage, algo) in order: RL once per algorithm of config.pipeline.algos in a pipeline."""
  for stage in stages:
    if stage == "rl":
      for algo in config.pipeline.algos if config.stage == "pipeline" else (config.rl.algo,):
        yield stage, algo
    else:
      yield stage, None


def _stage_name(stage: str, algo: str | None) -> str:
  return f"rl/{algo}" if algo else stage


def _stop_message(stop, name: str, directory: str) -> str:
  command = shlex.join(["python", "-m", "p3o_jax.main", *sys.argv[1:]])
  steps = checkpoint.committed_steps(paths.join(directory, "ckpt"))
  saved = f"checkpoint step {steps[-1]} saved in {paths.join(directory, 'ckpt')}" if steps else "nothing saved"
  return (f"\nStopped by {getattr(stop, 'signal_name', None) or 'request'} during stage {name} ({saved}); "
          f"its export was not written.\nTo resume, rerun the same command:\n  {command}")


def run(config, workdir: str, devices_note: str = "") -> dict[str, str]:
  """Runs config.stage in workdir; returns the outputs by name. `devices_note`: how the CPU
  devices and host memory were set up (host_devices.configure, host_memory.configure), for the
  summary.

  Each stage first checks that the stages it reads finished (workdir.check_inputs) and writes
  its completion marker once its export is done. SIGTERM / SIGINT: the running stage saves a
  checkpoint and stops, no export is written, and `Stopped` (exit code 128 + signal) is raised.
  """
  config_checks.validate(config)
  with workdir_lib.Lock(workdir):
    return _run_locked(config, workdir, devices_note)


def config_summary(config, workdir: str, runs, mesh, devices_note: str = "") -> str:
  """The few lines a user needs to recognise the run; the whole config is in config.json."""
  model = config.model.hf or ", ".join(f"{k}={config.model.arch[k]}" for k in ("model_type", "hidden_size", "num_layers")
                                        if k in config.model.arch)
  plan = " -> ".join(_stage_name(stage, algo) for stage, algo in runs)
  rl = config.rl
  return "\n".join([
      f"p3o_jax: task {config.task}, {plan}; workdir {paths.resolve(workdir)} (full config: config.json)",
      f"  model {model} ({config.model.dtype}); sft {config.sft.steps} steps, rm {config.rm.steps} steps, "
      f"rl {rl.iterations} iterations x {rl.prompts_per_rollout} prompts x k={rl.k}",
      f"  {jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"mesh {dict(mesh.shape)}{f' ({devices_note})' if devices_note else ''}; seed {config.seed}"])


def _run_locked(config, workdir: str, devices_note: str = "") -> dict[str, str]:
  logging.info("config:\n%s", config)
  batching.TRUNCATED.clear()
  batching.RESPONSES_CUT.clear()
  mesh = sharding.mesh_from_config(config.mesh)
  stages = pipeline.STAGES if config.stage == "pipeline" else (config.stage,)
  if config.stage == "pipeline" and (config.model.reward_fn or config.model.reward_hf):
    stages = tuple(s for s in stages if s != "rm")  # the reward is given: no reward model to train
  runs = list(_stage_runs(config, stages))
  algo = config.rl.algo
  for stage, run_algo in runs:  # before anything is written: resuming with changed fields fails here
    if stage in workdir_lib.STAGE_FIELDS:
      config.rl.algo = run_algo or algo
      workdir_lib.check_resume(config, workdir_lib.stage_dir(workdir, stage, run_algo), stage)
  config.rl.algo = algo
  workdir_lib.write_config(workdir, config)
  if distributed.is_main():
    print(config_summary(config, workdir, runs, mesh, devices_note), flush=True)
  stop = checkpoint.install_signal_handlers()
  outputs, start = {}, time.time()
  try:
    task = pipeline.load_task(config, workdir)
    for stage, algo in runs:
      if algo is not None:
        config.rl.algo = algo
      directory = workdir_lib.stage_dir(workdir, stage, algo)
      workdir_lib.check_inputs(config, workdir, stage)
      workdir_lib.clear_complete(directory)
      checkpoint.stamp_config(workdir_lib.fingerprint(config))
      compiled_before = compile_cache.snapshot()
      if stage == "sft":
        outputs["sft policy (HF)"] = pipeline.run_sft(config, workdir, task, stop)
      elif stage == "rm":
        outputs["reward model (HF)"] = pipeline.run_rm(config, workdir, task, stop)
      elif stage == "rl":
        outputs[f"{algo} policy (HF)"] = pipeline.run_rl(config, workdir, task, stop)
        outputs[f"{algo} logs"] = paths.join(directory, "metrics.jsonl")
      elif stage == "eval":
        outputs["report"] = pipeline.run_eval(config, workdir, task)
        outputs["plots"] = paths.join(workdir, "eval", "*.png")
      compile_cache.report(_stage_name(stage, algo), compiled_before)
      if stop.requested and stage != "eval":  # eval has no checkpoint: it finishes first
        if distributed.is_main():
          print(_stop_message(stop, _stage_name(stage, algo), directory), file=sys.stderr, flush=True)
        raise Stopped(128 + (stop.signum or signal.SIGTERM))
      workdir_lib.mark_complete(directory, stage=stage)
      if stop.requested:
        print(f"\nStopped by {stop.signal_name} after stage {stage}; rerun the same command to continue.",
              file=sys.stderr, flush=True)
        raise Stopped(128 + (stop.signum or signal.SIGTERM))
  except Stopped:
    raise
  except BaseException:
    checkpoint.finish_pending_saves()  # commit the step being written before the error surfaces
    raise
  finally:
    stop.uninstall()
    checkpoint.stamp_config(None)
  if distributed.is_main():
    print(f"\nDone in {time.time() - start:.0f}s. Outputs under {paths.resolve(workdir)}:")
    for name, path in outputs.items():
      print(f"  {name:<24} {path}")
    for mode, count in sorted(batching.TRUNCATED.items()):
      print(f"  {count} prompt(s) cut to fit (data.truncate_prompts={mode!r})")
    if batching.RESPONSES_CUT["max_new_tokens"]:
      print(f"  {batching.RESPONSES_CUT['max_new_tokens']} response(s) longer than sampler.max_new_tokens cut to it")
  return outputs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # --verbosity wins; else config.log.level (default: warnings)
    logging.set_verbosity(_CONFIG.value.log.get("level", "warning"))
  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICES.value]
  memory_note = host_memory.configure(_CONFIG.value)  # before JAX allocates its first buffers
  devices_note = host_devices.configure(_CONFIG.value, multi_process=_DISTRIBUTED.value)  # before JAX starts
  if _DISTRIBUTED.value:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           None if _LOCAL_DEVICES.value is None else [int(i) for i in _LOCAL_DEVICES.value],
                           timeout_s=_INIT_TIMEOUT.value)
  elif any(v is not None for v in explicit):
    raise app.UsageError("--coordinator_address, --num_processes, --process_id and --local_device_ids "
                         "need --distributed")
  # Every process reads the cache; JAX writes it from process 0 only. A process that misses an
  # entry another one loaded compiles the same program itself, so the job's executables agree.
  compile_cache.enable(_COMPILE_CACHE.value)
  run(_CONFIG.value, _WORKDIR.value, "; ".join(note for note in (devices_note, memory_note) if note))


def entry():
  flags.mark_flags_as_required(["config"])
  # Unknown --config.x keys exit with a "did you mean" line instead of a deep traceback.
  app.run(main, flags_parser=config_checks.flags_parser)


if __name__ == "__main__":
  entry()
