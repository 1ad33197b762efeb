"""MetricsLogger: JSONL rows, TensorBoard events, wandb error, summary table, progress rates."""
import glob
import io
import json
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from p3o_jax import metrics_log
from p3o_jax.metrics_log import MetricsLogger


def test_jsonl_rows_and_tensorboard_events(tmp_path):
  with MetricsLogger(tmp_path) as logger:
    logger.log(1, {"objective/kl": jnp.float32(0.5), "count": np.int64(7), "note": "warmup"})
    logger.log(2, {"loss": float("nan"), "policy/clipfrac_avg": jnp.array([0.25]), "big": -math.inf})
  lines = (tmp_path / metrics_log.JSONL_NAME).read_text().splitlines()
  raw = [json.loads(line) for line in lines]  # strict JSON: no bare NaN
  assert raw[0]["step"] == 1 and raw[0]["objective/kl"] == 0.5 and raw[0]["count"] == 7 and raw[0]["note"] == "warmup"
  assert isinstance(raw[0]["count"], int) and raw[0]["elapsed"] >= 0 and raw[0]["time"] > 1e9
  assert raw[1]["loss"] == "nan" and raw[1]["big"] == "-inf" and raw[1]["policy/clipfrac_avg"] == 0.25
  rows = metrics_log.read_jsonl(tmp_path / metrics_log.JSONL_NAME)
  assert math.isnan(rows[1]["loss"]) and rows[1]["big"] == -math.inf
  events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert len(events) == 1
  assert b"objective/kl" in open(events[0], "rb").read()


def test_rejects_non_scalar_metric(tmp_path):
  with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
    with pytest.raises(ValueError, match="'hist' must be a scalar.*shape \\(3,\\)"):
      logger.log(0, {"hist": np.zeros(3)})


def test_wandb_requested_but_missing_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
  with pytest.raises(ImportError, match="use_wandb=True but the 'wandb' package is not installed"):
    MetricsLogger(tmp_path, use_tensorboard=False, use_wandb=True)


def test_summary_table(tmp_path):
  with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
    out = io.StringIO()
    table = logger.summary("rl", {"objective/rlhf_reward": jnp.float32(1.25), "steps": 10}, file=out)
  assert out.getvalue().strip() == table
  lines = table.splitlines()
  assert lines[0] == "== rl summary ==" and lines[2].split() == ["objective/rlhf_reward", "1.25"]
  assert lines[3].split() == ["steps", "10"]


def test_progress_rates():
  clock = iter([100.0, 102.0, 102.0])
  with metrics_log.Progress(total=4, desc="rl", clock=lambda: next(clock)) as bar:
    bar.advance(2, tokens=300, reward=0.5)
    assert bar.rates() == {"steps/s": 1.0, "tokens/s": 150.0}
    assert bar.bar.n == 2


def test_a_cut_last_line_is_moved_aside_on_open_and_readers_skip_malformed_lines(tmp_path, caplog):
  path = tmp_path / metrics_log.JSONL_NAME
  with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
    logger.log(1, {"loss": 1.0})
  with open(path, "a") as f:
    f.write("not json at all\n")           # garbage mid-file
    f.write('{"step": 2, "loss": 0.')      # a crash mid-write: no newline
  with caplog.at_level("WARNING", logger="p3o_jax.metrics_log"):
    assert [r["step"] for r in metrics_log.read_jsonl(path)] == [1]  # readers skip, count, go on
    assert "skipped 2 malformed line(s): 2, 3" in caplog.text
    caplog.clear()
    with MetricsLogger(tmp_path, use_tensorboard=False) as logger:  # a resumed run appends
      logger.log(2, {"loss": 0.5})
  assert "ended in a cut line (22 bytes, a crash mid-write); moved it to" in caplog.text
  assert (tmp_path / "metrics.jsonl.cut").read_text() == '{"step": 2, "loss": 0.\n'  # kept, not lost
  lines = path.read_text().splitlines()
  assert lines[1] == "not json at all" and json.loads(lines[2])["loss"] == 0.5 and len(lines) == 3
  assert [r["step"] for r in metrics_log.read_jsonl(path)] == [1, 2]


def test_rows_are_appended_with_one_write_each(tmp_path, monkeypatch):
  writes = []
  real_write = metrics_log.os.write
  monkeypatch.setattr(metrics_log.os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
  with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
    logger.log(1, {"loss": 1.0, "note": "x" * 5000})
    logger.log(2, {"loss": 2.0})
  assert len(writes) == 2 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
  assert (tmp_path / metrics_log.JSONL_NAME).read_bytes() == b"".join(writes)
