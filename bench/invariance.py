"""The reward-translation experiment: does adding a per-prompt offset delta(x) to the reward change
training? P3O sees only reward differences within a prompt, so it should not; PPO's critic and
advantages see the offset. Each algorithm trains from the same SFT policy with the same seed on

  none     r(x, y)               the gold reward, rounded to 2^-10 (p3o_jax/data/shifted_gold.py)
  normal   r(x, y) + delta(x)    delta ~ N(0, 10^2) rounded to an integer, fixed per prompt
  length   r(x, y) + delta(x)    delta = 20 * (digits in the prompt) - 90: -30 .. +30

and the exported weights and held-out curves (gold reward, KL) of each shifted run are compared
with the unshifted run: bitwise equality, the largest weight difference, the largest curve gap.

    python bench/invariance.py --out runs/invariance --jobs 2
    python bench/invariance.py --out /tmp/inv --quick            # runlocal sizes, 6 iterations

Reward clipping (rl.reward_clip, set to 1e6) and running-std scaling (rl.reward_scaling) are off in
every arm.
Both act on the shifted reward: a clip at +-10 flattens most prompts' rewards when delta has std
10, and the running std grows from ~0.3 to ~10, dividing every reward difference by ~30. Either
changes the reward differences themselves, which no algorithm is meant to be invariant to, so
with them on the experiment would measure the preprocessing, not the algorithm. With both off,
every arm sees exactly r or r + delta (exact float32 arithmetic: p3o_jax/data/shifted_gold.py).

Outputs in --out: invariance.md / invariance.csv (one row per algorithm and offset) and
invariance.png (gold reward and KL along training, the three arms overlaid per algorithm).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np
from matplotlib.figure import Figure
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_runs  # noqa: E402
from frontier import ALGORITHMS, beta_options  # noqa: E402
from study_runs import Run  # noqa: E402

from p3o_jax.eval.plots import save_figure  # noqa: E402

OFFSETS = {"none": "gold", "normal": "gold_plus_normal_offset", "length": "gold_plus_length_offset"}
DEFAULT_ALGORITHMS = ["P3O-V2", "PPO", "RLOO", "GRPO", "online DPO"]
QUICK = dict(config_arg=":runlocal", iterations=6,
             extra=("--config.optim.lr=2e-3", "--config.data.demo.n_eval_prompts=64", "--config.eval.num_prompts=64"))
FULL = dict(config_arg="", iterations=20, extra=())
NO_CLIP = 1e6  # rl.reward_clip must be > 0 (config_checks); no shifted reward comes near it


def make_runs(algorithms, offsets, seed: int, beta: float) -> list[Run]:
  runs = []
  for label in algorithms:
    slug, algo, options = ALGORITHMS[label]
    for offset in offsets:
      rl = {"algo": algo, **options, **beta_options(algo, beta), "reward_clip": NO_CLIP, "reward_scaling": False}
      args = tuple(f"--config.rl.{k}={v}" for k, v in rl.items()) + (
          f"--config.model.reward_fn=p3o_jax.data.shifted_gold:{OFFSETS[offset]}", f"--config.seed={seed}")
      runs.append(Run(f"{slug}-{offset}", "sort", label, beta, seed, algo, args))
  return runs


def weights(out: str, run: Run) -> dict:
  folder = os.path.join(study_runs.run_dir(out, run), "rl", run.algo, "hf")
  tensors = {}
  for name in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
    tensors.update(load_file(os.path.join(folder, name)))
  return tensors


def compare(out: str, base: Run, shifted: Run) -> dict:
  """Weights and curves of a shifted run against the unshifted one."""
  a, b = weights(out, base), weights(out, shifted)
  bitwise = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  max_weight = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)
  pa, pb = study_runs.eval_points(out, base), study_runs.eval_points(out, shifted)
  gap = lambda metric: max(abs(getattr(x, metric) - getattr(y, metric)) for x, y in zip(pa, pb))
  return {"algorithm": base.label, "offset": shifted.name.rsplit("-", 1)[1], "bitwise": bitwise,
          "max_weight_diff": max_weight, "max_gold_gap": gap("gold_reward"), "max_kl_gap": gap("kl"),
          "final_gold": pa[-1].gold_reward, "final_gold_shifted": pb[-1].gold_reward,
          "final_kl": pa[-1].kl, "final_kl_shifted": pb[-1].kl}


def write_tables(out: str, rows: list[dict], iterations: int):
  keys = list(rows[0])
  with open(os.path.join(out, "invariance.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, keys)
    writer.writeheader()
    writer.writerows(rows)
  lines = ["# Reward translation: r versus r + delta(x)", "",
           f"Same SFT policy, seed and {iterations} RL iterations per arm; reward clipping and scaling off. "
           "Weights: the exported policy; curves: held-out gold reward and KL at every evaluation.", "",
           "| algorithm | offset | weights bitwise equal | max abs weight diff | max gold gap | max KL gap "
           "| final gold: r | final gold: r + δ | final KL: r | final KL: r + δ |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['algorithm']} | {r['offset']} | {'yes' if r['bitwise'] else 'no'} | {r['max_weight_diff']:.3g} "
                 f"| {r['max_gold_gap']:.3g} | {r['max_kl_gap']:.3g} | {r['final_gold']:.3f} | "
                 f"{r['final_gold_shifted']:.3f} | {r['final_kl']:.3f} | {r['final_kl_shifted']:.3f} |")
  with open(os.path.join(out, "invariance.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(out: str, runs: list[Run], algorithms, offsets):
  fig = Figure(figsize=(3.6 * len(algorithms), 6.5))
  axes = fig.subplots(2, len(algorithms), squeeze=False)
  styles = {"none": ("-", 2.5), "normal": ("--", 1.5), "length": (":", 1.5)}
  for col, label in enumerate(algorithms):
    for run in (r for r in runs if r.label == label):
      offset = run.name.rsplit("-", 1)[1]
      points = study_runs.eval_points(out, run)
      style, width = styles[offset]
      for row, metric in enumerate(("gold_reward", "kl")):
        axes[row, col].plot([p.step for p in points], [getattr(p, metric) for p in points], style, lw=width,
                            marker="o", ms=3, label="r" if offset == "none" else f"r + δ ({offset})")
    axes[0, col].set_title(label)
    axes[0, col].set_ylabel("held-out gold reward")
    axes[1, col].set_ylabel("KL to SFT (nats)")
    axes[1, col].set_xlabel("RL iteration")
    for ax in axes[:, col]:
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
  fig.suptitle("reward translation: identical curves mean the offset changed nothing")
  fig.tight_layout()
  save_figure(fig, os.path.join(out, "invariance.png"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--algorithms", help=f"comma list of {list(ALGORITHMS)}")
  parser.add_argument("--offsets", default="none,normal,length", help=f"comma list of {list(OFFSETS)}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--iterations", type=int)
  parser.add_argument("--jobs", type=int, default=1)
  parser.add_argument("--timeout", type=float, default=None, help="seconds per stage (default 180 quick, 1200)")
  args = parser.parse_args(argv)
  preset = QUICK if args.quick else FULL
  algorithms = args.algorithms.split(",") if args.algorithms else DEFAULT_ALGORITHMS
  offsets = args.offsets.split(",")
  if "none" not in offsets or any(o not in OFFSETS for o in offsets) or any(a not in ALGORITHMS for a in algorithms):
    parser.error(f"offsets: 'none' plus some of {list(OFFSETS)}; algorithms: some of {list(ALGORITHMS)}")
  iterations = args.iterations or preset["iterations"]
  extra = preset["extra"] + (f"--config.rl.iterations={iterations}",)
  timeout = args.timeout or (180 if args.quick else 1200)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  env = study_runs.child_env()
  start = time.time()
  common = study_runs.common_args(preset["config_arg"], "sort", extra)
  runs = make_runs(algorithms, offsets, args.seed, args.beta)
  if any(not study_runs.is_finished(out, r) for r in runs):
    study_runs.train_base(out, "sort", common, env, timeout, stages=("sft",))  # the reward is a function
  status = study_runs.run_all(out, runs, lambda r: common + list(r.args), env, args.jobs, timeout)
  failed = sorted(n for n, s in status.items() if s.startswith("failed"))
  if failed:
    raise SystemExit(f"failed runs: {failed}; logs under {out}/runs/<name>/log.txt")
  rows = []
  for label in algorithms:
    base = next(r for r in runs if r.label == label and r.name.endswith("-none"))
    rows += [compare(out, base, r) for r in runs if r.label == label and r is not base]
  write_tables(out, rows, iterations)
  plot(out, runs, algorithms, offsets)
  print(open(os.path.join(out, "invariance.md")).read())
  print(f"{len(runs)} runs; outputs in {out}; {time.time() - start:.0f}s")


if __name__ == "__main__":
  main()
