"""The study: does P3O's KL-reward frontier beat the baselines? Every registered algorithm on the
demo task (configs/demo.py), several seeds and KL coefficients, scored by the gold reward.

    python bench/frontier.py --out runs/study --jobs 2               # the full study
    python bench/frontier.py --out /tmp/fq --quick                   # 2 algorithms x 2 seeds, tiny
    python bench/frontier.py --out runs/study --tasks sort,reverse   # a second task, its own rows

Not run by `make test` (tests/test_study.py runs --quick). One SFT policy and one reward model per
task, trained once with seed 0 and shared by every run (bench/study_runs.py); each RL run is its own
workdir and process, seeded by config.seed (rollout keys, prompt order, held-out sampling keys:
p3o_jax/rl/loop.py) while the task's prompts stay fixed (data.demo.seed). A rerun skips finished
runs and only recomputes the outputs.

The KL coefficient each algorithm sweeps (`--betas`): rl.beta (in the reward for P3O, RLOO and
REINFORCE++, on the k3 loss term for GRPO and GSPO), PPO's initial coefficient with the adaptive
controller off (a fixed beta per run, as the other methods have), dpo_beta for online DPO, DPO and
KTO.

Outputs in --out:
  frontier.png         gold and proxy reward against KL per algorithm: the frontier of each seed
                       (its best run over beta at each KL, p3o_jax/eval/study.py) averaged over
                       seeds, with a Student-t 95% band
  table.md, table.csv  gold reward at three KLs every run reaches, the frontier's area over that
                       range, bootstrap 95% intervals over seeds; P3O minus every other algorithm
  overoptimisation.png gold and proxy reward against sqrt(KL) along training (Gao et al. 2022),
                       mean over seeds per (algorithm, beta), the gold peak starred
  status.json          every run and whether it finished
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_runs  # noqa: E402
from study_runs import Run  # noqa: E402

from p3o_jax.eval import study  # noqa: E402
from p3o_jax.eval.plots import save_figure  # noqa: E402

# label -> (run-name slug, rl.algo, extra rl options); every algorithm in p3o_jax/rl/algorithms/ with a
# KL coefficient to sweep (SimPO has none: nothing in its loss refers to the reference).
ALGORITHMS = {
    "P3O-V2": ("p3o_v2", "p3o", {"variant": "v2"}),
    "P3O-V1": ("p3o_v1", "p3o", {"variant": "v1"}),
    "PPO": ("ppo", "ppo", {}),
    "online DPO": ("online_dpo", "online_dpo", {}),
    "DPO": ("dpo", "dpo", {}),
    "KTO": ("kto", "kto", {}),
    "RLOO": ("rloo", "rloo", {}),
    "GRPO": ("grpo", "grpo", {"loss_type": "grpo"}),
    "Dr. GRPO": ("dr_grpo", "grpo", {"loss_type": "dr_grpo"}),
    "DAPO": ("dapo", "grpo", {"loss_type": "dapo"}),
    "GSPO": ("gspo", "gspo", {}),
    "REINFORCE++": ("reinforce_pp", "reinforce_pp", {}),
}
REFERENCE = "P3O-V2"  # the pairwise differences are REFERENCE minus each other algorithm
# --quick: the demo's runlocal sizes, with enough RL steps and held-out prompts (cheap next to
# starting and compiling) for the policies to move measurably away from the SFT policy.
QUICK = dict(algorithms=["P3O-V2", "PPO"], seeds=[0, 1], betas=[0.1], config_arg=":runlocal",
             extra=("--config.rl.iterations=6", "--config.optim.lr=2e-3", "--config.data.demo.n_eval_prompts=64",
                    "--config.eval.num_prompts=64"))
FULL = dict(algorithms=list(ALGORITHMS), seeds=[0, 1, 2, 3, 4], betas=[0.03, 0.1, 0.3], config_arg="", extra=())
KL_LEVELS = 3


def beta_options(algo: str, beta: float) -> dict:
  if algo == "ppo":
    return {"kl_init": beta, "adaptive_kl": False}
  if algo in ("online_dpo", "dpo", "kto"):
    return {"dpo_beta": beta}
  return {"beta": beta}


def make_runs(algorithms, seeds, betas, tasks) -> list[Run]:
  runs = []
  for task in tasks:
    for seed in seeds:  # seed-major: runs of one program start apart and reuse its cached compile
      for beta in betas:
        for label in algorithms:
          slug, algo, options = ALGORITHMS[label]
          rl = {"algo": algo, **options, **beta_options(algo, beta)}
          args = tuple(f"--config.rl.{k}={v}" for k, v in rl.items()) + (f"--config.seed={seed}",)
          prefix = "" if task == "sort" else f"{task}-"
          runs.append(Run(f"{prefix}{slug}-beta{beta:g}-seed{seed}", task, label, beta, seed, algo, args))
  return runs


# ----------------------------------------------------------------------------- analysis

def curves(out: str, runs: list[Run]) -> dict:
  """{(task, label): {seed: [(beta, points along training)]}} for the finished runs."""
  found: dict = {}
  for run in runs:
    if study_runs.is_finished(out, run):
      found.setdefault((run.task, run.label), {}).setdefault(run.seed, []).append(
          (run.beta, study_runs.eval_points(out, run)))
  return found


def _curve(points, metric: str):
  return np.array([p.kl for p in points]), np.array([getattr(p, metric) for p in points])


def seed_statistics(per_seed: dict, levels, lo, hi) -> dict:
  """Per seed: gold at each KL level and the gold and proxy frontier areas over [lo, hi]."""
  out = {"gold_at": [], "gold_area": [], "proxy_area": []}
  for runs in per_seed.values():
    gold = [_curve(points, "gold_reward") for _, points in runs]
    proxy = [_curve(points, "reward") for _, points in runs]
    out["gold_at"].append(study.envelope_at(gold, levels))
    out["gold_area"].append(study.area_under(lambda x: study.envelope_at(gold, x), lo, hi))
    out["proxy_area"].append(study.area_under(lambda x: study.envelope_at(proxy, x), lo, hi))
  return {k: np.array(v) for k, v in out.items()}


def analyse(found: dict) -> tuple[list[dict], dict]:
  """Table rows (one per algorithm and task, then REFERENCE minus each other) and the KL levels
  per task."""
  rows, levels_of = [], {}
  for task in sorted({t for t, _ in found}):
    groups = {label: per_seed for (t, label), per_seed in found.items() if t == task}
    ranges = [study.kl_range([_curve(points, "gold_reward") for _, points in runs])
              for per_seed in groups.values() for runs in per_seed.values()]
    lo, hi = study.common_range(ranges)
    levels = np.linspace(lo, hi, KL_LEVELS + 1)[1:] if np.isfinite(lo) else np.full(KL_LEVELS, np.nan)
    levels_of[task] = (lo, hi, levels)
    stats = {label: seed_statistics(per_seed, levels, lo, hi) for label, per_seed in groups.items()}
    for label, s in stats.items():
      row = {"row": "algorithm", "task": task, "name": label, "seeds": len(groups[label]),
             "betas": " ".join(f"{b:g}" for b in sorted({b for runs in groups[label].values() for b, _ in runs}))}
      for i in range(KL_LEVELS):
        row[f"gold@KL{i + 1}"] = study.bootstrap_ci(s["gold_at"][:, i])
      row["gold_area"] = study.bootstrap_ci(s["gold_area"])
      row["proxy_area"] = study.bootstrap_ci(s["proxy_area"])
      rows.append(row)
    if REFERENCE in stats:
      ref = stats[REFERENCE]
      for label, s in stats.items():
        if label == REFERENCE:
          continue
        row = {"row": "difference", "task": task, "name": f"{REFERENCE} − {label}",
               "seeds": f"{len(groups[REFERENCE])} vs {len(groups[label])}", "betas": ""}
        for i in range(KL_LEVELS):
          row[f"gold@KL{i + 1}"] = study.bootstrap_diff_ci(ref["gold_at"][:, i], s["gold_at"][:, i])
        row["gold_area"] = study.bootstrap_diff_ci(ref["gold_area"], s["gold_area"])
        row["proxy_area"] = study.bootstrap_diff_ci(ref["proxy_area"], s["proxy_area"])
        rows.append(row)
  return rows, levels_of


METRICS = [f"gold@KL{i + 1}" for i in range(KL_LEVELS)] + ["gold_area", "proxy_area"]


def write_tables(out: str, rows: list[dict], levels_of: dict):
  with open(os.path.join(out, "table.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["row", "task", "name", "seeds", "betas", "kl_low", "kl_high"]
                    + [f"{m}_{part}" for m in METRICS for part in ("mean", "low", "high")])
    for row in rows:
      lo, hi, _ = levels_of[row["task"]]
      writer.writerow([row["row"], row["task"], row["name"], row["seeds"], row["betas"], f"{lo:.6g}", f"{hi:.6g}"]
                      + [f"{v:.6g}" for m in METRICS for v in row[m]])
  lines = ["# P3O study: gold reward at matched KL", "",
           "Mean over seeds [bootstrap 95% interval]. gold@KLi: the gold reward of each seed's frontier "
           "(its best run over beta) at the i-th KL level; area: the integral of the frontier over the KL "
           "range every run reaches (gold·nats, proxy·nats). Differences resample each side's seeds.", ""]
  for task in levels_of:
    lo, hi, levels = levels_of[task]
    lines += [f"## task `{task}`: KL range every run reaches [{lo:.3g}, {hi:.3g}] nats; levels "
              + ", ".join(f"KL{i + 1} = {v:.3g}" for i, v in enumerate(levels)), ""]
    header = ["algorithm", "seeds", "betas"] + [f"gold @ KL{i + 1}" for i in range(KL_LEVELS)] + ["gold area", "proxy area"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in (r for r in rows if r["task"] == task):
      name = row["name"] if row["row"] == "algorithm" else f"*{row['name']}*"
      lines.append("| " + " | ".join([name, str(row["seeds"]), row["betas"]]
                                      + [study.format_interval(*row[m]) for m in METRICS]) + " |")
    lines.append("")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines))


# ----------------------------------------------------------------------------- plots

def plot_frontiers(out: str, found: dict):
  tasks = sorted({t for t, _ in found})
  fig = Figure(figsize=(12, 4.5 * len(tasks)))
  axes = fig.subplots(len(tasks), 2, squeeze=False)
  for row, task in enumerate(tasks):
    labels = [label for t, label in found if t == task]
    for col, (metric, name) in enumerate((("gold_reward", "gold reward"), ("reward", "proxy reward (RM)"))):
      ax = axes[row, col]
      for index, label in enumerate(sorted(labels, key=list(ALGORITHMS).index)):
        color = f"C{index % 10}"
        per_seed = found[(task, label)]
        seed_curves = [[_curve(points, metric) for _, points in runs] for runs in per_seed.values()]
        for runs in per_seed.values():
          for _, points in runs:
            ax.plot(*_curve(points, metric), ".", color=color, alpha=0.25, ms=3)
        lo, hi = study.common_range([study.kl_range(c) for c in seed_curves])
        if not np.isfinite(lo):
          continue
        grid = np.linspace(lo, hi, 60)
        values = np.stack([study.envelope_at(c, grid) for c in seed_curves])  # [S, G]
        band = np.array([study.t_interval(values[:, g]) for g in range(grid.size)])  # [G, 3]
        ax.plot(grid, band[:, 0], "-", color=color, label=f"{label} ({len(seed_curves)} seeds)")
        if np.isfinite(band[:, 1]).any():
          ax.fill_between(grid, band[:, 1], band[:, 2], color=color, alpha=0.2, linewidth=0)
      ax.set_xlabel("KL(π_θ || π_SFT), nats per response")
      ax.set_ylabel(name)
      ax.set_title(f"{task}: {name}, mean over seeds ± 95% t-interval", fontsize=10)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, os.path.join(out, "frontier.png"))


def plot_overoptimisation(out: str, found: dict):
  tasks = sorted({t for t, _ in found})
  fig = Figure(figsize=(12, 4.5 * len(tasks)))
  axes = fig.subplots(len(tasks), 2, squeeze=False)
  styles = ["-", "--", ":", "-."]
  for row, task in enumerate(tasks):
    labels = sorted((label for t, label in found if t == task), key=list(ALGORITHMS).index)
    for col, (metric, name) in enumerate((("gold_reward", "gold reward"), ("reward", "proxy reward (RM)"))):
      ax = axes[row, col]
      for index, label in enumerate(labels):
        by_beta: dict = {}
        for runs in found[(task, label)].values():
          for beta, points in runs:
            by_beta.setdefault(beta, []).append(points)
        for b_index, (beta, seeds) in enumerate(sorted(by_beta.items())):
          steps = sorted(set.intersection(*({p.step for p in points} for points in seeds)))
          kl = np.array([[p.kl for p in points if p.step in steps] for points in seeds]).mean(0)
          y = np.array([[getattr(p, metric) for p in points if p.step in steps] for points in seeds]).mean(0)
          x = np.sqrt(np.maximum(kl, 0.0))
          color = f"C{index % 10}"
          ax.plot(x, y, styles[b_index % len(styles)], marker="o", ms=3, color=color,
                  label=f"{label} β={beta:g}")
          if metric == "gold_reward":
            peak = int(np.argmax(y))
            ax.plot(x[peak], y[peak], "*", ms=12, color=color, markeredgecolor="black")
      ax.set_xlabel("√KL(π_θ || π_SFT) along training")
      ax.set_ylabel(name)
      ax.set_title(f"{task}: {name} along training" + (" (★ peak)" if metric == "gold_reward" else ""), fontsize=10)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  save_figure(fig, os.path.join(out, "overoptimisation.png"))


# ----------------------------------------------------------------------------- main

def parse_list(text: str, kind=str) -> list:
  return [kind(x) for x in text.split(",") if x.strip()]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--quick", action="store_true", help="2 algorithms x 2 seeds x 1 beta, runlocal sizes")
  parser.add_argument("--algorithms", help=f"comma list of {list(ALGORITHMS)}")
  parser.add_argument("--seeds", help="comma list of RL seeds")
  parser.add_argument("--betas", help="comma list of KL coefficients")
  parser.add_argument("--tasks", default="sort", help=f"comma list of {list(study_runs.TASK_OPS)}")
  parser.add_argument("--iterations", type=int, help="rl.iterations (default: the demo config's)")
  parser.add_argument("--jobs", type=int, default=1, help="RL runs in parallel processes")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per stage (default 180 quick, 1200)")
  parser.add_argument("--no-compile-cache", action="store_true", help="children compile everything (P3O_JAX_COMPILE_CACHE=off)")
  args = parser.parse_args(argv)
  preset = QUICK if args.quick else FULL
  algorithms = parse_list(args.algorithms) if args.algorithms else preset["algorithms"]
  unknown = [a for a in algorithms if a not in ALGORITHMS]
  if unknown:
    parser.error(f"unknown algorithms {unknown}; known: {list(ALGORITHMS)}")
  seeds = parse_list(args.seeds, int) if args.seeds else preset["seeds"]
  betas = parse_list(args.betas, float) if args.betas else preset["betas"]
  tasks = parse_list(args.tasks)
  timeout = args.timeout or (180 if args.quick else 1200)
  extra = preset["extra"] + ((f"--config.rl.iterations={args.iterations}",) if args.iterations else ())
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  env = study_runs.child_env("off" if args.no_compile_cache else None)
  start = time.time()

  runs = make_runs(algorithms, seeds, betas, tasks)
  status = {}
  todo = [r for r in runs if not study_runs.is_finished(out, r)]
  for task in sorted({r.task for r in todo}):
    study_runs.train_base(out, task, study_runs.common_args(preset["config_arg"], task, extra), env, timeout)
  if todo:
    base_args = {t: study_runs.common_args(preset["config_arg"], t, extra) for t in tasks}
    status = study_runs.run_all(out, runs, lambda r: base_args[r.task] + list(r.args), env, args.jobs, timeout)
  else:
    print(f"{len(runs)} runs: all finished; recomputing the outputs", flush=True)
    status = {r.name: "skipped" for r in runs}
  with open(os.path.join(out, "status.json"), "w") as f:
    json.dump(status, f, indent=1)

  found = curves(out, runs)
  if not found:
    raise SystemExit("no finished run to analyse")
  rows, levels_of = analyse(found)
  write_tables(out, rows, levels_of)
  plot_frontiers(out, found)
  plot_overoptimisation(out, found)
  failed = sorted(n for n, s in status.items() if s.startswith("failed"))
  print(open(os.path.join(out, "table.md")).read())
  print(f"{len(runs)} runs ({len(failed)} failed{': ' + ', '.join(failed) if failed else ''}); "
        f"outputs in {out}; {time.time() - start:.0f}s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
