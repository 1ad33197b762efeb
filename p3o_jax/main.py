"""Entry point.

  python -m p3o_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m p3o_jax.main --config=configs/tldr.py --workdir=gs://... --config.rl.algo=ppo --config.rl.beta=0.1
  python -m p3o_jax.main --config=configs/demo.py --workdir=runs/demo --config.stage=rl

config.stage picks sft | rm | rl | eval | pipeline (all four in order, RL once per algorithm
in config.pipeline.algos). Each stage reads the previous stage's output from the workdir;
a stage that finds its own checkpoint there resumes from it.
"""

from __future__ import annotations

import logging as pylogging
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from p3o_jax import checkpoint, config_checks, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file: configs/<name>.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, logs, exports and plots go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                 "(multi-host TPU pods and SLURM GPU jobs; it reads the cluster itself).")


def run(config, workdir: str) -> dict[str, str]:
  """Runs config.stage in workdir; returns the outputs by name."""
  config_checks.validate(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  logging.info("config:\n%s", config)
  stages = pipeline.STAGES if config.stage == "pipeline" else (config.stage,)
  if config.stage == "pipeline" and (config.model.reward_fn or config.model.reward_hf):
    stages = tuple(s for s in stages if s != "rm")  # the reward is given: no reward model to train
  stop = checkpoint.install_signal_handlers()
  outputs, start = {}, time.time()
  try:
    task = pipeline.load_task(config, workdir)
    for stage in stages:
      if stage == "sft":
        outputs["sft policy (HF)"] = pipeline.run_sft(config, workdir, task, stop)
      elif stage == "rm":
        outputs["reward model (HF)"] = pipeline.run_rm(config, workdir, task, stop)
      elif stage == "rl":
        algos = config.pipeline.algos if config.stage == "pipeline" else (config.rl.algo,)
        for algo in algos:
          config.rl.algo = algo
          outputs[f"{algo} policy (HF)"] = pipeline.run_rl(config, workdir, task, stop)
          outputs[f"{algo} logs"] = os.path.join(workdir, "rl", algo, "metrics.jsonl")
          if stop.requested:
            break
      elif stage == "eval":
        report = pipeline.run_eval(config, workdir, task)
        outputs["report"] = report
        outputs["plots"] = os.path.join(os.path.dirname(report), "*.png")
      if stop.requested:
        logging.warning("stopped by signal after stage %s; rerun the same command to resume", stage)
        break
  finally:
    stop.uninstall()
  print(f"\nDone in {time.time() - start:.0f}s. Outputs under {os.path.abspath(workdir)}:")
  for name, path in outputs.items():
    print(f"  {name:<24} {path}")
  return outputs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  pylogging.getLogger("absl").setLevel(pylogging.INFO)
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  run(_CONFIG.value, _WORKDIR.value)


def entry():
  flags.mark_flags_as_required(["config"])
  # Unknown --config.x keys exit with a "did you mean" line instead of a deep traceback.
  app.run(main, flags_parser=config_checks.flags_parser)


if __name__ == "__main__":
  entry()
