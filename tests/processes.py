"""Helpers that start p3o_jax.main as N JAX processes on 127.0.0.1 (CPU devices, gloo).

Every process started here is ended by its own pid when the call returns, also on failure
or time-out, so a test never leaves a process behind.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from p3o_jax import host_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  out = dict(os.environ)
  out.update(XLA_FLAGS=host_devices.xla_flags_with_device_count(out.get("XLA_FLAGS", ""), devices), JAX_PLATFORMS="cpu",
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return out


def run_main(workdir: str, *, processes: int, devices: int, args=(), config: str = DEMO + ":runlocal",
             timeout: float = 600, distributed_args=None) -> list[str]:
  """Runs `python -m p3o_jax.main` as `processes` processes of `devices` CPU devices each.

  Returns each process's combined output; raises AssertionError (with the outputs' tails) if
  any exits non-zero or the whole run takes longer than `timeout` seconds.
  """
  port = free_port()
  procs, logs = [], []
  try:
    for i in range(processes):
      cmd = [sys.executable, "-m", "p3o_jax.main", f"--config={config}", f"--workdir={workdir}",
             "--config.log.level=info", *args]  # the tests read the processes' INFO lines
      if distributed_args is not None:
        cmd += distributed_args(i, port)
      elif processes > 1:
        cmd += ["--distributed", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                f"--process_id={i}", "--distributed_timeout=120"]
      log = open(os.path.join(os.path.dirname(workdir) or ".", f"{os.path.basename(workdir)}.{i}.log"), "w+")
      logs.append(log)
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env(devices), stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    for proc in procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc in procs:  # every process by its own pid, whatever happened
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  codes = [proc.returncode for proc in procs]
  if any(codes):
    tails = "\n".join(f"--- process {i} (exit {c}):\n{out[-3000:]}" for i, (c, out) in enumerate(zip(codes, outputs)))
    raise AssertionError(f"exit codes {codes}\n{tails}")
  return outputs


def metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


TIMING = re.compile(r"(time|elapsed|_per_s|steps/s)")


def assert_metrics_close(a_path: str, b_path: str, tol: float = 1e-5) -> int:
  """Same rows, same keys, every numeric metric (timings aside) within tol; returns the row count."""
  a, b = metrics(a_path), metrics(b_path)
  assert [r["step"] for r in a] == [r["step"] for r in b], (a_path, b_path)
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb), (a_path, sorted(set(ra) ^ set(rb)))
    for key, va in ra.items():
      if TIMING.search(key) or not isinstance(va, (int, float)):
        assert TIMING.search(key) or va == rb[key], (a_path, key, va, rb[key])
        continue
      np.testing.assert_allclose(va, rb[key], rtol=tol, atol=tol, err_msg=f"{a_path} step {ra['step']} {key}")
  return len(a)


def assert_exports_close(a_dir: str, b_dir: str, tol: float = 1e-5, outlier_tol: float | None = None) -> None:
  """Every parameter within tol; with outlier_tol, at most 1 in 10,000 elements may be off by up
  to outlier_tol instead (Adam divides by sqrt(v): an element whose gradient is ~0 turns a
  reduction-order rounding into a visible step)."""
  a, b = load_file(os.path.join(a_dir, "model.safetensors")), load_file(os.path.join(b_dir, "model.safetensors"))
  assert set(a) == set(b)
  off, total = 0, 0
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=0, atol=outlier_tol or tol, err_msg=f"{a_dir}: {name}")
    off += int((np.abs(a[name] - b[name]) > tol).sum())
    total += a[name].size
  assert off <= (total // 10_000 if outlier_tol else 0), f"{a_dir}: {off} of {total} elements differ by more than {tol}"


ROWS_READ = re.compile(r"(\w+): process (\d+) of (\d+) (?:read|tokenized) (\d+) (?:examples|prompts): rows ([\d:,]+) of each (\d+)")


def rows_read(output: str) -> dict[str, tuple[int, int, str, int]]:
  """{stage: (process, count, 'a:b', batch)} from a process's log lines."""
  return {m[1]: (int(m[2]), int(m[4]), m[5], int(m[6])) for m in ROWS_READ.finditer(output)}
