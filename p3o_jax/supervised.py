"""SFT and Bradley-Terry reward-model training: one plain loop, two pure losses. The loop also
trains the offline preference algorithms (DPO, SimPO, ORPO) for `p3o_jax/preference.py`.

    loss_fn(params, batch) -> (loss, metrics)     pure, knows the model only through `graph`
    fit(...)                                      jitted step, data order, logging, checkpoints,
                                                  evaluations every eval_every steps
    held_out_metrics(...)                         a loss's metrics over held-out examples

Batches are built on the host by a `make_batch(indices) -> dict of arrays` callable, so the
loop knows nothing of tokenizers or datasets. The data order comes from `EpochIterator`,
whose position is checkpointed with the state: a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import losses, resume, sharding, train_state
from p3o_jax.data.batching import EpochIterator
from p3o_jax.models import decoder, lora
from p3o_jax.rl import algorithms, sequences

log = logging.getLogger(__name__)


def sft_loss_fn(graph):
  """batch: tokens [B, T], mask [B, T] (attention), loss_mask [B, T] (completion tokens), and for
  packed rows segments [B, T] (`batching.pack_sft`)."""
  def loss_fn(params, batch):
    logp = decoder.token_logprobs(graph, params, batch["tokens"], batch["mask"], segments=batch.get("segments"))
    return losses.sft(logp, batch["loss_mask"][:, 1:])
  return loss_fn


def reward_loss_fn(graph):
  """batch: query / query_mask [B, P], response / response_mask [B, 2, N] (chosen, rejected:
  `batching.preference_batch`); each prompt runs once for its two responses."""
  def loss_fn(params, batch):
    scores = sequences.response_scores(graph, params, *algorithms.base.group_rows(batch)).reshape(-1, 2)
    return losses.bradley_terry(scores[:, 0], scores[:, 1])
  return loss_fn


def held_out_metrics(loss_fn: Callable, make_batch: Callable[[np.ndarray], dict], num_examples: int,
                     batch_size: int, mesh) -> Callable[[dict], dict]:
  """fn(params) -> `loss_fn`'s metrics averaged over `num_examples` held-out examples, weighted
  by rows: the batches are built once (batch_size examples each, each process its rows), and a
  model holding LoRA adapters is read as the train step reads it (`lora.adapted`)."""
  score = jax.jit(lambda params, batch: loss_fn(lora.adapted(params), batch)[1])
  batches = []
  for start in range(0, num_examples, batch_size):
    rows = np.arange(start, min(start + batch_size, num_examples))
    split = sharding.RowSplit(len(rows), mesh)
    batches.append((len(rows), split.to_global(make_batch(rows[split.rows]))))

  def evaluate(params) -> dict:
    totals = {}
    for count, batch in batches:
      for name, value in jax.device_get(score(params, batch)).items():
        totals[name] = totals.get(name, 0.0) + float(value) * count
    return {name: total / num_examples for name, total in totals.items()}
  return evaluate


@jax.jit
def _count_tokens(batch):
  """Real tokens of a global batch (attention masks, not loss masks), summed on the devices."""
  return sum(v.astype(jnp.int32).sum() for k, v in batch.items() if k.endswith("mask") and "loss" not in k)


def make_train_step(loss_fn: Callable, stage_cfg, out_shardings=None) -> Callable:
  """The jitted step (state, batch, lr, hyper) -> (state, metrics) of `loss_fn` under the
  stage's optimizer; the state is donated. The learning rate and `hyper` (None, or the loss's
  third argument) are inputs of the step, not constants in it: runs that differ only in them
  share one compiled program (and its entry in the compilation cache)."""
  def learn(state, batch, lr, hyper):
    loss = loss_fn if hyper is None else (lambda p, b: loss_fn(p, b, hyper))
    return train_state.make_step(loss, train_state.make_optimizer(stage_cfg.optim, stage_cfg.steps, lr))(state, batch)
  return jax.jit(learn, donate_argnums=0, out_shardings=out_shardings)


def fit(name: str, loss_fn: Callable, params, make_batch: Callable[[np.ndarray], dict], num_examples: int, *,
        params_axes, mesh_cfg, stage_cfg, seed: int, workdir: str, logger, ckpt_cfg, log_every: int = 1,
        stop=None, evaluate: Callable[[int, dict], None] | None = None, eval_every: int = 0,
        metric_prefix: str | None = None, hyper=None) -> tuple[dict, dict]:
  """Train `params` for stage_cfg.steps steps of stage_cfg.batch_size examples.

  Resumes from `<workdir>/ckpt` when it holds a checkpoint (`resume.start`). `evaluate(step,
  params)`, when given, runs before the first step of a fresh run, every `eval_every` steps and
  after the last. Metrics are logged as `<metric_prefix><name>` (default prefix: `<name>/`).
  `hyper`, when given, is passed to the loss as `loss_fn(params, batch, hyper)`, an input of the
  step (`make_train_step`). Returns (params, last metrics).
  """
  prefix = f"{name}/" if metric_prefix is None else metric_prefix
  tx = train_state.make_optimizer(stage_cfg.optim, stage_cfg.steps)
  order = EpochIterator(num_examples, stage_cfg.batch_size, seed=seed)
  run = resume.start(name, params, tx, params_axes, mesh_cfg=mesh_cfg, workdir=workdir, ckpt_cfg=ckpt_cfg,
                     order=order)
  step_fn = make_train_step(loss_fn, stage_cfg, out_shardings=(run.shardings, sharding.replicated(run.mesh)))
  lr = float(stage_cfg.optim.lr)
  split = sharding.RowSplit(stage_cfg.batch_size, run.mesh)  # the rows of each batch this process feeds

  t0, tokens, rows_read, postfix = time.time(), 0, 0, {}
  bar = logger.progress(stage_cfg.steps, desc=name, initial=run.start)

  def record(done, metrics, batch_tokens) -> dict:
    """Reads a dispatched step's outputs (waiting for it): the loss check, the log, the bar."""
    nonlocal tokens, postfix
    batch_tokens = int(batch_tokens)
    tokens += batch_tokens
    if done % log_every == 0 or done == stage_cfg.steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      if not np.isfinite(metrics["loss/total"]):
        raise FloatingPointError(f"{name}: non-finite loss at step {done}: {metrics}")
      elapsed = time.time() - t0
      logger.log(done, {f"{prefix}{k}": v for k, v in metrics.items()} | {f"{prefix}tokens_per_s": tokens / elapsed})
      postfix = {"loss": metrics["loss/total"]}
    bar.advance(1, tokens=batch_tokens, **postfix)
    return metrics

  metrics, pending = {}, None
  if evaluate is not None and run.start == 0:
    evaluate(0, run.state.params)
  for step in range(run.start, stage_cfg.steps):
    rows = next(order)[split.rows]
    rows_read += len(rows)
    batch = split.to_global(make_batch(rows))
    batch_tokens = _count_tokens(batch)
    run.state, step_metrics = step_fn(run.state, batch, lr, hyper)
    done = step + 1
    # A step is read once the next one is queued, so the host builds the next batch while the
    # device runs this one; a step is read before its checkpoint is written, so no saved step
    # goes unchecked or unlogged.
    if pending is not None:
      metrics = record(*pending)
    pending = (done, step_metrics, batch_tokens)
    if evaluate is not None and (done % eval_every == 0 or done == stage_cfg.steps):
      metrics, pending = record(*pending), None
      evaluate(done, run.state.params)  # read back before the next step donates these params
    if pending is not None and run.saves_at(done, stage_cfg.steps, stop):
      metrics, pending = record(*pending), None
    if run.checkpoint(done, stage_cfg.steps, stop):
      break
  if pending is not None:
    metrics = record(*pending)
  bar.close()
  run.close()
  log.info("%s: process %d of %d read %d examples: rows %s of each %d-row batch", name, jax.process_index(),
           jax.process_count(), rows_read, sharding.row_ranges(split.rows), stage_cfg.batch_size)
  return run.state.params, {k: float(v) for k, v in metrics.items()}
