"""The study (bench/frontier.py, p3o_jax/eval/study.py): its statistics against known answers,
and --quick end to end: outputs well-formed, a rerun skips finished runs, seeds change runs and
the same seed twice gives the same numbers."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from p3o_jax.eval import study
from p3o_jax.metrics_log import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- statistics


def test_t_interval_known_answer():
  # mean 2, sd 1, n 3: half width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051
  mean, low, high = study.t_interval([1.0, 2.0, 3.0])
  np.testing.assert_allclose([mean, low, high], [2.0, 2.0 - 2.484138, 2.0 + 2.484138], atol=1e-6)
  assert np.isnan(study.t_interval([5.0])[1]) and study.t_interval([5.0])[0] == 5.0


def test_bootstrap_known_answers():
  # Two seeds 0 and 1: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the
  # 95% percentile interval is [0, 1].
  assert study.bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)
  assert study.bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))
  assert study.bootstrap_diff_ci([1.0, 1.0], [0.25, 0.25]) == (0.75, 0.75, 0.75)
  # Many normal samples: the bootstrap interval of the mean approaches mean +- 1.96 sd / sqrt(n).
  x = np.random.default_rng(0).normal(3.0, 2.0, 2000)
  mean, low, high = study.bootstrap_ci(x, n_boot=4000)
  half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)
  np.testing.assert_allclose([low, high], [mean - half, mean + half], atol=0.15 * half)
  assert np.isnan(study.bootstrap_ci([np.nan])[0])


def test_curves_interpolation_envelope_and_area():
  kl, y = np.array([2.0, 0.0, 1.0, 1.0]), np.array([0.0, 1.0, 2.0, 4.0])  # equal KLs averaged: (1, 3)
  np.testing.assert_allclose(study.curve_at(kl, y, [0.5, 1.0, 1.5]), [2.0, 3.0, 1.5])
  assert np.isnan(study.curve_at(kl, y, [-0.1, 2.5])).all()
  low, high = (np.array([0.0, 1.0]), np.array([0.0, 1.0])), (np.array([0.5, 2.0]), np.array([0.6, 0.6]))
  np.testing.assert_allclose(study.envelope_at([low, high], [0.25, 0.75, 1.5]), [0.25, 0.75, 0.6])
  assert study.kl_range([low, high]) == (0.0, 2.0)
  assert study.common_range([(0.0, 2.0), (0.5, 3.0)]) == (0.5, 2.0)
  assert np.isnan(study.common_range([(0.0, 1.0), (1.0, 3.0)])[0])
  # y = 1 + 2 kl over [0.5, 1.5]: 1 + (1.5^2 - 0.5^2) = 3
  assert study.area_under(lambda x: 1 + 2 * x, 0.5, 1.5) == pytest.approx(3.0, abs=1e-12)
  assert np.isnan(study.area_under(lambda x: x, 1.0, 1.0))
  assert study.format_interval(0.5, 0.25, 0.75) == "0.500 [0.250, 0.750]"


# ----------------------------------------------------------------------------- --quick end to end


def bench(out, timeout=400):
  done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "frontier.py"), "--quick", "--jobs", "2",
                         "--out", out], cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout


def run_files(out) -> dict:
  """Every file the runs wrote, with its modification time."""
  found = {}
  for root, _, names in os.walk(os.path.join(out, "runs")):
    for name in names:
      path = os.path.join(root, name)
      found[path] = os.stat(path).st_mtime_ns
  return found


def eval_records(out, run, algo):
  return [r for r in read_jsonl(os.path.join(out, "runs", run, "rl", algo, "metrics.jsonl")) if "eval/kl" in r]


def test_quick_study(tmp_path):
  out = str(tmp_path / "study")
  log = bench(out)
  for name in ("frontier.png", "overoptimisation.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
  with open(os.path.join(out, "table.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["row"], r["name"]) for r in rows] == [("algorithm", "P3O-V2"), ("algorithm", "PPO"),
                                                   ("difference", "P3O-V2 − PPO")]
  for row in rows:
    for metric in ("gold@KL1", "gold@KL2", "gold@KL3", "gold_area", "proxy_area"):
      mean, low, high = (float(row[f"{metric}_{part}"]) for part in ("mean", "low", "high"))
      assert np.isfinite([mean, low, high]).all(), (row["name"], metric)
      assert low <= mean <= high, (row["name"], metric)
  assert 0 <= float(rows[0]["kl_low"]) < float(rows[0]["kl_high"])
  table = open(os.path.join(out, "table.md")).read()
  assert "| P3O-V2 | 2 | 0.1 |" in table and "*P3O-V2 − PPO*" in table
  assert set(json.load(open(os.path.join(out, "status.json"))).values()) == {"done"}

  # Seeds change the RL run: other rollouts from the first iteration, other final weights.
  def first_rollout(run):
    rows = read_jsonl(os.path.join(out, "runs", run, "rl", "p3o", "metrics.jsonl"))
    return next(r for r in rows if "loss/total" in r)

  # (not the KL: at the first iteration the policy is the reference, so it is 0 for every seed)
  first = [first_rollout(f"p3o_v2-beta0.1-seed{s}") for s in (0, 1)]
  assert [first[0][k] for k in ("objective/scores", "objective/entropy")] != \
      [first[1][k] for k in ("objective/scores", "objective/entropy")]
  weights = [load_file(os.path.join(out, "runs", f"p3o_v2-beta0.1-seed{s}", "rl", "p3o", "hf", "model.safetensors"))
             for s in (0, 1)]
  assert any(not np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])

  # A rerun skips every finished run and only rewrites the outputs.
  os.remove(os.path.join(out, "table.csv"))
  written = run_files(out)
  log = bench(out)
  assert "all finished" in log and os.path.exists(os.path.join(out, "table.csv"))
  assert run_files(out) == written  # no run wrote anything again

  # The same seed twice gives the same numbers: one run's RL output removed and rerun.
  before = eval_records(out, "ppo-beta0.1-seed1", "ppo")
  shutil.rmtree(os.path.join(out, "runs", "ppo-beta0.1-seed1", "rl"))
  log = bench(out)
  assert "3 finished, 1 to run" in log
  after = eval_records(out, "ppo-beta0.1-seed1", "ppo")
  assert [{k: r[k] for k in r if k.startswith("eval/")} for r in after] == \
      [{k: r[k] for k in r if k.startswith("eval/")} for r in before]
