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


def test_every_process_of_a_job_uses_the_cache_and_counts_its_programs(tmp_path):
  """Two processes x 1 device, twice with one cache folder. Process 0 writes the entries (JAX's
  rule) and loads every program the second time. On CPU, JAX keys an entry by the process's own
  devices, so process 1 compiles its programs again; its count still adds up to process 0's.
  Both runs log the same metrics."""
  args = ["--config.stage=sft", "--config.sft.steps=2", f"--compile_cache={tmp_path / 'cache'}"]
  first = mp.run_main(str(tmp_path / "a"), processes=2, devices=1, args=args, timeout=300)
  second = mp.run_main(str(tmp_path / "b"), processes=2, devices=1, args=args, timeout=300)
  counts = lambda out: tuple(int(x) for x in re.search(r"sft: (\d+) programs compiled, (\d+) loaded", out).groups())
  compiled, loaded = counts(first[0])
  assert compiled >= 3 and loaded == 0, (compiled, loaded)
  assert counts(second[0]) == (0, compiled)
  assert sum(counts(first[1])) == sum(counts(second[1])) == compiled, (counts(first[1]), counts(second[1]))
  assert mp.assert_metrics_close(str(tmp_path / "a" / "sft" / "metrics.jsonl"),
                                 str(tmp_path / "b" / "sft" / "metrics.jsonl"), tol=0) == 2


def test_a_folder_that_cannot_be_made_leaves_the_cache_off_with_a_warning(tmp_path, caplog):
  import importlib.util

  import jax

  from p3o_jax import compile_cache
  before = jax.config.jax_compilation_cache_dir
  (tmp_path / "file").write_text("")
  bad = [str(tmp_path / "file" / "cache")]  # under a file: mkdir fails
  if importlib.util.find_spec("gcsfs") is None:
    bad.append("gs://some-bucket/jax_cache")  # a bucket needs gcsfs
  for folder in bad:
    with caplog.at_level("WARNING", logger="p3o_jax.compile_cache"):
      assert compile_cache.enable(folder) is None
    assert f"compilation cache off: cannot create {folder}" in caplog.text
    assert jax.config.jax_compilation_cache_dir == before
