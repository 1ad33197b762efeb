"""`--devices N` of a benchmark, put into XLA_FLAGS before jax is imported (default: one host
device per core). Import this module before jax."""

import os
import sys


def devices_from_argv(argv=None) -> int:
  argv = sys.argv if argv is None else argv
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return os.cpu_count()


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices_from_argv()}")
