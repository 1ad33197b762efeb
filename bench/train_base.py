"""The study's shared stages in one process (sft, then rm): `bench/study_runs.py` calls it with the
same flags as `python -m p3o_jax.main`, which would start, import and compile once per stage.

    python bench/train_base.py --config=configs/demo.py --workdir=<dir> --stages=sft,rm
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from p3o_jax import compile_cache, config_checks, host_memory, main as entry  # noqa: E402

_STAGES = flags.DEFINE_list("stages", ["sft", "rm"], "Stages to run, in order.")


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = entry._CONFIG.value
  host_memory.configure(config)  # as p3o_jax.main does
  compile_cache.enable(entry._COMPILE_CACHE.value)
  for stage in _STAGES.value:
    config.stage = stage
    entry.run(config, entry._WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(run, flags_parser=config_checks.flags_parser)
