"""Evaluation layer: frontier statistics and fits, win rates, judge order, plots, report."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from p3o_jax.eval import frontier, winrate
from p3o_jax.eval.plots import plot_frontier, plot_win_matrix
from p3o_jax.eval.report import main as report_main
from p3o_jax.eval.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- frontier


def test_frontier_point_mean_and_stderr_match_scipy():
  rng = np.random.default_rng(0)
  kl, reward, gold = rng.gamma(2.0, 1.5, 37), rng.normal(0.3, 1.0, 37), rng.normal(size=37)
  point = frontier.frontier_point("p3o", 120, kl, reward, gold)
  np.testing.assert_allclose(point.kl, kl.sum() / kl.size, rtol=1e-12)
  np.testing.assert_allclose(point.kl_stderr, stats.sem(kl), rtol=1e-12)
  np.testing.assert_allclose(point.reward, reward.sum() / reward.size, rtol=1e-12)
  np.testing.assert_allclose(point.reward_stderr, stats.sem(reward), rtol=1e-12)
  np.testing.assert_allclose(point.gold_reward, gold.sum() / gold.size, rtol=1e-12)
  np.testing.assert_allclose(point.gold_reward_stderr, stats.sem(gold), rtol=1e-12)
  assert (point.algo, point.step) == ("p3o", 120)
  assert frontier.frontier_point("ppo", 0, kl, reward).gold_reward is None


def test_frontier_point_rejects_bad_input():
  with pytest.raises(ValueError, match="rewards shape"):
    frontier.frontier_point("a", 0, np.ones(4), np.ones(5))
  with pytest.raises(ValueError, match="non-finite values at rows \\[2\\]"):
    frontier.frontier_point("a", 0, np.ones(4), np.array([0.0, 1.0, np.nan, 2.0]))
  with pytest.raises(ValueError, match="1-D"):
    frontier.frontier_point("a", 0, np.ones((2, 3)), np.ones((2, 3)))


def _points_on_line(algo, intercept, slope, kls, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  return [frontier.FrontierPoint(algo, step, kl, 0.1, intercept + slope * kl
                                 + noise * rng.normal(), 0.05)
          for step, kl in enumerate(kls)]


def test_fit_line_recovers_known_line_and_matches_polyfit():
  exact = _points_on_line("p3o", 0.25, 0.8, [0.5, 1.0, 2.0, 4.0, 7.0])
  noisy = _points_on_line("ppo", -0.1, 0.3, np.linspace(0.2, 9.0, 12), noise=0.2)
  lines = frontier.fit_line(exact + noisy)
  np.testing.assert_allclose([lines["p3o"].intercept, lines["p3o"].slope], [0.25, 0.8],
                             atol=1e-10)
  slope, intercept = np.polyfit([p.kl for p in noisy], [p.reward for p in noisy], 1)
  np.testing.assert_allclose([lines["ppo"].intercept, lines["ppo"].slope],
                             [intercept, slope], rtol=1e-9)
  assert (lines["p3o"].kl_min, lines["p3o"].kl_max, lines["p3o"].num_points) == (0.5, 7.0, 5)
  with pytest.raises(ValueError, match="2 distinct KL"):
    frontier.fit_line(_points_on_line("dpo", 0.0, 1.0, [3.0, 3.0]))


def test_dominates_over_shared_range():
  high = _points_on_line("p3o", 0.5, 0.3, [0.0, 2.0, 6.0])
  low = _points_on_line("ppo", 0.2, 0.3, [1.0, 4.0, 10.0])
  assert frontier.dominates(high, low, kl_grid=20)
  assert not frontier.dominates(low, high, kl_grid=20)
  # Lines crossing at KL = 3: neither dominates on [1, 6], each does on its side.
  steep = _points_on_line("dpo", 0.2, 0.4, [1.0, 6.0])
  flat = _points_on_line("sft", 0.5, 0.3, [1.0, 6.0])
  assert not frontier.dominates(steep, flat) and not frontier.dominates(flat, steep)
  assert frontier.dominates(steep, flat, kl_grid=[4.0, 5.0, 6.0])
  assert frontier.dominates(flat, steep, kl_grid=[1.0, 2.0, 99.0])  # 99 is out of range
  kl, gap = frontier.frontier_gap(steep, flat, kl_grid=6)
  np.testing.assert_allclose(gap, 0.1 * (kl - 3.0), atol=1e-12)
  with pytest.raises(ValueError, match="do not overlap"):
    frontier.dominates(_points_on_line("a", 0, 1, [0.0, 1.0]),
                       _points_on_line("b", 0, 1, [2.0, 3.0]))


def test_load_frontier_reads_eval_records_from_training_logs(tmp_path, caplog):
  rng = np.random.default_rng(1)
  written = [frontier.frontier_point("p3o", step, rng.gamma(2, size=8), rng.normal(size=8),
                                     rng.normal(size=8)) for step in (0, 10, 20)]
  log = tmp_path / "p3o.jsonl"
  with open(log, "w") as f:
    for point in written:
      f.write(json.dumps({"step": point.step, "loss": 1.0, "objective/kl": 0.1}) + "\n")
      f.write(json.dumps(frontier.eval_record(point)) + "\n")
    stale = dict(frontier.eval_record(written[1]), **{frontier.REWARD_KEY: -99.0})
    f.write(json.dumps(stale) + "\n")          # resumed run re-logs step 10
    f.write(json.dumps(frontier.eval_record(written[1])) + "\n")
    f.write('{"step": 30, "eval/kl": 1.')      # crash mid-write
  # A minimal record from another run: no stderr, no algo key, no gold.
  other = tmp_path / "ppo.jsonl"
  other.write_text(json.dumps({"step": 5, "eval/kl": 2.0, "eval/reward": 0.5}) + "\n")

  points = frontier.load_frontier([log])
  assert points == written
  both = frontier.load_frontier([other, str(log)], algo="ppo")
  assert [p.algo for p in both] == ["p3o"] * 3 + ["ppo"]
  assert both[-1].kl == 2.0 and np.isnan(both[-1].kl_stderr) and both[-1].gold_reward is None
  with pytest.raises(ValueError, match="no 'algo'"):
    frontier.load_frontier(other)
  bad = tmp_path / "bad.jsonl"  # a garbled line mid-file is skipped and counted, not fatal
  bad.write_text("{not json\n" + json.dumps(frontier.eval_record(written[0])) + "\n[1, 2]\n")
  with caplog.at_level("WARNING", logger="p3o_jax.metrics_log"):
    assert frontier.load_frontier(bad) == written[:1]
  assert "bad.jsonl: skipped 2 malformed line(s): 1, 3" in caplog.text


# ----------------------------------------------------------------------------- win rates


def test_win_rate_counts_ties_as_half_against_brute_force():
  rng = np.random.default_rng(2)
  a, b = rng.integers(0, 4, 301).astype(float), rng.integers(0, 4, 301).astype(float)
  wins = sum(1 for x, y in zip(a, b) if x > y)
  ties = sum(1 for x, y in zip(a, b) if x == y)
  result = winrate.win_rate(a, b)
  assert (result.wins, result.ties, result.losses) == (wins, ties, 301 - wins - ties)
  assert ties > 0
  np.testing.assert_allclose(result.rate, (wins + 0.5 * ties) / 301, rtol=1e-12)
  scores = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
  np.testing.assert_allclose(result.stderr, stats.sem(scores), rtol=1e-12)
  boot = winrate.win_rate(a, b, stderr="bootstrap")
  assert boot.rate == result.rate
  np.testing.assert_allclose(boot.stderr, result.stderr, rtol=0.15)


def test_win_rate_stderr_is_binomial_without_ties():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=500), rng.normal(0.3, 1.0, size=500)
  result = winrate.win_rate(a, b)
  p, n = result.rate, result.n
  assert result.ties == 0
  np.testing.assert_allclose(result.stderr, np.sqrt(p * (1 - p) / (n - 1)), rtol=1e-12)
  np.testing.assert_allclose(winrate.win_rate(b, a).rate, 1 - p, rtol=1e-12)
  with pytest.raises(ValueError, match="same prompts"):
    winrate.win_rate(a, b[:-1])


def test_win_rate_matrix_properties_on_random_data():
  rng = np.random.default_rng(4)
  rewards = {"sft": rng.normal(0.0, 1, 200), "ppo": rng.normal(0.3, 1, 200),
             "p3o": rng.normal(0.5, 1, 200), "dpo": np.round(rng.normal(0.5, 1, 200), 1)}
  rewards["tied"] = rewards["dpo"].copy()
  names, matrix = winrate.win_rate_matrix(rewards)
  assert names == list(rewards)
  np.testing.assert_allclose(np.diag(matrix), 0.5)
  np.testing.assert_allclose(matrix + matrix.T, 1.0, atol=1e-12)
  assert matrix[names.index("dpo"), names.index("tied")] == 0.5
  for i, x in enumerate(names):
    for j, y in enumerate(names):
      if i != j:
        np.testing.assert_allclose(matrix[i, j], winrate.win_rate(rewards[x], rewards[y]).rate)
  with pytest.raises(ValueError, match="share prompts"):
    winrate.win_rate_matrix({"a": np.ones(3), "b": np.ones(4)})


def _judge_setup(num_prompts=200, seed=5):
  rng = np.random.default_rng(seed)
  prompts = [f"prompt {n}" for n in range(num_prompts)]
  lengths = {"sft": rng.integers(1, 20, num_prompts), "ppo": rng.integers(3, 22, num_prompts),
             "p3o": rng.integers(5, 24, num_prompts)}
  responses = {name: [f"{name}:" + "x" * int(k) for k in ks] for name, ks in lengths.items()}
  return prompts, responses, lengths


def test_judge_matrix_randomises_order_and_corrects_for_it():
  prompts, responses, lengths = _judge_setup()
  shown = []  # (first policy, second policy) per call

  def longer_wins(prompt, first, second):
    assert prompt.startswith("prompt ")
    shown.append((first.split(":")[0], second.split(":")[0]))
    size_first, size_second = len(first.split(":")[1]), len(second.split(":")[1])
    return 0.5 if size_first == size_second else float(size_first > size_second)

  names, matrix = winrate.win_rate_matrix_by_judge(responses, prompts, longer_wins, seed=0)
  # An order-independent judge must give exactly the order-free truth.
  _, truth = winrate.win_rate_matrix({k: v.astype(float) for k, v in lengths.items()})
  np.testing.assert_allclose(matrix, truth, atol=1e-12)
  for i, x in enumerate(names):
    for y in names[i + 1:]:
      first_x = sum(1 for pair in shown if pair == (x, y))
      first_y = sum(1 for pair in shown if pair == (y, x))
      assert first_x + first_y == len(prompts)
      assert 0.35 * len(prompts) < first_x < 0.65 * len(prompts)


def test_judge_position_bias_is_neutralised():
  prompts, responses, _ = _judge_setup()
  shown = []

  def always_first(prompt, first, second):
    shown.append(first.split(":")[0])
    return 1

  names, matrix = winrate.win_rate_matrix_by_judge(responses, prompts, always_first, seed=7)
  # Policy i "wins" exactly when it was shown first; the coin makes that about half.
  calls = iter(shown)
  for i, x in enumerate(names):
    for j in range(i + 1, len(names)):
      firsts = [next(calls) for _ in prompts]
      np.testing.assert_allclose(matrix[i, j], np.mean([f == x for f in firsts]), atol=1e-12)
      assert abs(matrix[i, j] - 0.5) < 4 * 0.5 / np.sqrt(len(prompts))
  np.testing.assert_allclose(matrix + matrix.T, 1.0)
  _, again = winrate.win_rate_matrix_by_judge(responses, prompts, always_first, seed=7)
  np.testing.assert_array_equal(matrix, again)
  with pytest.raises(ValueError, match="expected 1, 0 or 0.5"):
    winrate.win_rate_matrix_by_judge(responses, prompts, lambda p, a, b: 2)


# ----------------------------------------------------------------------------- plots, report


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  return head == PNG_SIGNATURE and os.path.getsize(path) > 1000


def _sample_points():
  rng = np.random.default_rng(6)
  points = []
  for algo, slope in (("p3o", 0.5), ("ppo", 0.3), ("dpo", 0.4)):
    for step in (0, 100, 200, 300):
      kl = rng.gamma(2.0, 0.5 + step / 100, 16)
      reward = slope * kl + rng.normal(0, 0.2, 16)
      points.append(frontier.frontier_point(algo, step, kl, reward, reward - 0.1))
  return points


def test_plots_write_png_files_atomically(tmp_path):
  points = _sample_points()
  assert _is_png(plot_frontier(points, tmp_path / "frontier.png"))
  no_gold = [frontier.FrontierPoint(p.algo, p.step, p.kl, float("nan"), p.reward, 0.1)
             for p in points] + [frontier.FrontierPoint("single", 0, 1.0, 0.1, 0.2, 0.1)]
  assert _is_png(plot_frontier(no_gold, tmp_path / "sub" / "frontier_no_gold.png"))
  names, matrix = winrate.win_rate_matrix(
      {"a": np.arange(5.0), "b": np.arange(5.0)[::-1], "c": np.full(5, 2.0)})
  assert _is_png(plot_win_matrix(names, matrix, tmp_path / "win.png"))
  leftovers = [name for _, _, files in os.walk(tmp_path) for name in files
               if name.startswith(".tmp")]
  assert leftovers == []
  with pytest.raises(ValueError, match="does not match"):
    plot_win_matrix(["a"], matrix, tmp_path / "bad.png")


def test_report_contains_the_numbers(tmp_path):
  points = _sample_points()
  rng = np.random.default_rng(8)
  names, matrix = winrate.win_rate_matrix({n: rng.normal(size=50) for n in ("sft", "ppo", "p3o")})
  judge = 1.0 - matrix
  path = write_report(tmp_path / "eval", points, names, matrix, judge_matrix=judge)
  text = open(path).read()
  for algo, group in frontier.by_algo(points).items():
    final = group[-1]
    line = frontier.fit_line(group)[algo]
    row = next(r for r in text.splitlines() if r.startswith(f"| {algo} |"))
    for number in (final.kl, final.kl_stderr, final.reward, final.gold_reward,
                   line.intercept, line.slope):
      assert f"{number:.4f}" in row
  for i, name in enumerate(names):
    rows = [r for r in text.splitlines() if r.startswith(f"| **{name}** |")]
    assert rows[0].endswith(" | ".join(f"{v:.3f}" for v in matrix[i]) + " |")
    assert rows[1].endswith(" | ".join(f"{v:.3f}" for v in judge[i]) + " |")
  for plot in ("frontier.png", "win_rate.png", "win_rate_judge.png"):
    assert f"]({plot})" in text and _is_png(tmp_path / "eval" / plot)


def test_report_cli_from_logs(tmp_path, capsys):
  log = tmp_path / "log.jsonl"
  log.write_text("".join(json.dumps(frontier.eval_record(p)) + "\n" for p in _sample_points()))
  path = report_main([str(tmp_path / "out"), str(log)])
  assert capsys.readouterr().out.strip() == path
  assert "| p3o | 300 |" in open(path).read()
  with pytest.raises(ValueError, match="nothing to report"):
    write_report(tmp_path / "empty", [])
