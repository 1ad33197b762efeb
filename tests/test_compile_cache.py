"""The persistent compilation cache: a second process loads what the first compiled, and each
stage logs how many programs it compiled and how many it loaded."""

import re

import processes as mp


def test_second_run_loads_every_program_from_the_cache(tmp_path):
  args = ["--config.stage=sft", "--config.sft.steps=2", f"--compile_cache={tmp_path / 'cache'}"]
  first = mp.run_main(str(tmp_path / "a"), processes=1, devices=1, args=args, timeout=300)[0]
  second = mp.run_main(str(tmp_path / "b"), processes=1, devices=1, args=args, timeout=300)[0]
  counts = lambda out: tuple(int(x) for x in re.search(r"sft: (\d+) programs compiled, (\d+) loaded", out).groups())
  compiled, loaded = counts(first)
  assert compiled >= 3 and loaded == 0, (compiled, loaded)
  assert counts(second) == (0, compiled)
