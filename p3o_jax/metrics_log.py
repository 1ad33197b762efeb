"""Run metrics: JSONL always, TensorBoard by default, wandb on request, tqdm progress.

    logger = MetricsLogger(workdir, config=config)         # writes <workdir>/metrics.jsonl
    with logger.progress(total=num_steps, desc="rl") as bar:
      for step in range(num_steps):
        state, metrics = train_step(state, batch)
        bar.advance(tokens=num_response_tokens)            # steps/s and tokens/s postfix
        if step % log_every == 0:
          logger.log(step, metrics)                        # jax / numpy scalars are fine
    logger.summary("rl", final_metrics)                     # short table on stdout
    logger.close()

JSONL format: one object per `log` call, `{"step": int, "time": unix seconds, "elapsed":
seconds since the logger started, <metric>: value, ...}`. Float metrics are Python floats,
integer metrics Python ints, strings pass through. Non-finite floats are written as the
strings "nan", "inf" and "-inf" (JSON has no NaN, and null would hide which one it was);
`read_jsonl` turns them back into floats. TensorBoard receives every numeric metric as a
scalar (NaN included). Only process 0 writes, so the same calls work on every host.

Crash safety: each row is one `os.write` on an O_APPEND descriptor, so rows never interleave
or land half-buffered; a last line cut by a crash is moved to `metrics.jsonl.cut` when the
logger opens the file again, and readers (`read_jsonl`, `eval.frontier.load_frontier`) skip
and count malformed lines instead of failing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def scalar(name: str, value) -> int | float | str | bool:
  """A metric value as a plain Python scalar; arrays must hold exactly one element."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
      raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {array.shape}")
    return array.reshape(()).item()
  raise TypeError(f"metric {name!r} has unsupported type {type(value).__name__}; log numbers or strings")


def _json_value(value):
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


def read_records(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[int]]:
  """((line number, object) for each JSON object line, numbers of the malformed lines) of a
  JSONL file. Malformed lines (a cut last line, garbage) are skipped and logged with a count,
  never fatal: a log must stay readable after a crash."""
  records, bad = [], []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        bad.append(number)
        continue
      if isinstance(record, dict):
        records.append((number, record))
      else:
        bad.append(number)
  if bad:
    log.warning("%s: skipped %d malformed line(s): %s", os.fspath(path), len(bad),
                ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
  return records, bad


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Rows of a metrics.jsonl file, with "nan" / "inf" / "-inf" strings back as floats;
  malformed lines are skipped and counted (`read_records`)."""
  rows = [row for _, row in read_records(path)[0]]
  return [{k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]


def repair_cut_line(path: str | os.PathLike) -> int:
  """Moves a last line without its newline (a crash mid-write) to `<path>.cut` so appends start
  on a fresh line; returns the number of bytes moved (0: the file was whole)."""
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return 0
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return 0
    f.seek(0)
    data = f.read()
    keep = data.rfind(b"\n") + 1
    with open(os.fspath(path) + ".cut", "ab") as cut:
      cut.write(data[keep:] + b"\n")
    f.truncate(keep)
  moved = len(data) - keep
  log.warning("%s ended in a cut line (%d bytes, a crash mid-write); moved it to %s.cut", os.fspath(path), moved,
              os.fspath(path))
  return moved


class MetricsLogger:
  """Writes metrics to `<workdir>/metrics.jsonl`, TensorBoard (`<workdir>/tb`) and wandb."""

  def __init__(self, workdir: str | os.PathLike, *, use_tensorboard: bool = True, use_wandb: bool = False,
               wandb_project: str | None = None, config: Any = None):
    self.workdir = os.fspath(workdir)
    self.is_writer = jax.process_index() == 0
    self.start_time = time.time()
    self._jsonl = self._tb = self._wandb_run = None
    self._bars: list[Progress] = []
    if not self.is_writer:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self.jsonl_path = os.path.join(self.workdir, JSONL_NAME)
    repair_cut_line(self.jsonl_path)
    # One os.write per row on an O_APPEND descriptor: each row lands whole, at the end, unbuffered.
    self._jsonl = os.open(self.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if use_tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"))
    if use_wandb:
      try:
        import wandb
      except ImportError as e:
        raise ImportError("use_wandb=True but the 'wandb' package is not installed; "
                          "`pip install wandb` or set config.log.wandb=False") from e
      config_dict = config.to_dict() if hasattr(config, "to_dict") else config
      self._wandb_run = wandb.init(project=wandb_project, config=config_dict, dir=self.workdir)

  def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Writes one row; returns it (plain Python values) for printing or tests."""
    row = {name: scalar(name, value) for name, value in metrics.items()}
    if not self.is_writer:
      return row
    now = time.time()
    record = {"step": int(step), "time": now, "elapsed": now - self.start_time}
    record.update({name: _json_value(value) for name, value in row.items()})
    data = (json.dumps(record) + "\n").encode()
    while data:  # a regular file takes the row in one write; loop only for a short write
      data = data[os.write(self._jsonl, data):]
    numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if self._tb is not None:
      for name, value in numeric.items():
        self._tb.add_scalar(name, value, global_step=int(step))
    if self._wandb_run is not None:
      self._wandb_run.log(numeric, step=int(step))
    return row

  def summary(self, stage: str, metrics: Mapping[str, Any], file=None) -> str:
    """Prints (and returns) a two-column table of end-of-stage metrics."""
    row = {name: scalar(name, value) for name, value in metrics.items()}
    width = max([len(name) for name in row] + [6])
    lines = [f"== {stage} summary ==", f"{'metric':<{width}}  value"]
    for name in sorted(row):
      value = row[name]
      text = f"{value:.6g}" if isinstance(value, float) else str(value)
      lines.append(f"{name:<{width}}  {text}")
    table = "\n".join(lines)
    if self.is_writer:
      print(table, file=file or sys.stdout, flush=True)
    return table

  def progress(self, total: int, desc: str = "", initial: int = 0) -> "Progress":
    """A bar closed with the logger at the latest, so an error raised mid-stage is printed
    after the bar's last line, not before it."""
    bar = Progress(total, desc, initial=initial, disable=not self.is_writer)
    self._bars.append(bar)
    return bar

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    for bar in self._bars:
      bar.close()
    self._bars.clear()
    if self._jsonl is not None:
      os.close(self._jsonl)
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb_run is not None:
      self._wandb_run.finish()
      self._wandb_run = None

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Progress:
  """A tqdm bar whose postfix shows steps/s and tokens/s since the bar started.

  `advance(n=1, tokens=0, **postfix)` moves the bar by n steps; extra keyword values (e.g.
  reward=0.3) are shown beside the rates. `bar` is the underlying tqdm object.
  """

  def __init__(self, total: int, desc: str = "", *, initial: int = 0, disable: bool = False,
               clock=time.perf_counter):
    self.bar = tqdm.tqdm(total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True)
    self.clock = clock
    self.start = clock()
    self.steps = 0
    self.tokens = 0

  def rates(self) -> dict[str, float]:
    seconds = max(self.clock() - self.start, 1e-9)
    return {"steps/s": self.steps / seconds, "tokens/s": self.tokens / seconds}

  def advance(self, n: int = 1, tokens: int = 0, **postfix) -> None:
    self.steps += n
    self.tokens += int(tokens)
    shown = {k: f"{v:.3g}" for k, v in self.rates().items()}
    shown.update({k: f"{scalar(k, v):.4g}" if not isinstance(v, str) else v for k, v in postfix.items()})
    self.bar.set_postfix(shown, refresh=False)
    self.bar.update(n)

  def close(self) -> None:
    self.bar.close()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(total: int, desc: str = "", initial: int = 0) -> Progress:
  """A Progress bar without a logger (silent on processes other than 0)."""
  return Progress(total, desc, initial=initial, disable=jax.process_index() != 0)
