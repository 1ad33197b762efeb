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
