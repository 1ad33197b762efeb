"""Train state and optimizer: optax does the work, this file only wires the config to it."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from p3o_jax.models import lora


class TrainState(NamedTuple):
  step: jax.Array        # int32 scalar: optimizer updates applied so far
  params: Any            # plain dict of arrays (see models.decoder.split), frozen parts included
  opt_state: Any         # over `lora.trainable(params)`: all of them unless a model holds adapters


def make_optimizer(optim, total_steps: int, lr=None) -> optax.GradientTransformation:
  """AdamW with warmup + (constant | cosine | linear) decay and global-norm clipping.

  `optim` is the config's `optim` block: lr, b1, b2, weight_decay, grad_clip,
  warmup_steps, schedule, mu_dtype (the first moment's dtype: 'bfloat16' halves its memory;
  the second moment and the weights stay in their own dtype). `lr` in place of optim.lr may be
  a traced scalar (`rl.update.make_update`'s hyper): the state's structure does not depend on it.
  """
  lr = optim.lr if lr is None else lr
  warmup = min(int(optim.get("warmup_steps", 0)), max(total_steps - 1, 0))
  kind = optim.get("schedule", "constant")
  decay_steps = max(total_steps - warmup, 1)
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, 0.0, decay_steps)
  else:
    raise ValueError(f"optim.schedule={kind!r}; expected constant, cosine or linear")
  schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) if warmup else decay
  parts = []
  if optim.get("grad_clip", 0) and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.get("eps", 1e-8),
                           weight_decay=optim.weight_decay, mu_dtype=optim.get("mu_dtype", "float32")))
  return optax.chain(*parts)


def create(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(lora.trainable(params)))


def create_on_mesh(params, tx: optax.GradientTransformation, params_axes, mesh):
  """(state, its shardings): the optimizer state is born on the mesh, laid out like the params
  (no host copy, no device holding more than its shard)."""
  from p3o_jax import sharding  # the mesh side of the state; the step itself never sees it
  make = lambda p: create(p, tx)
  shardings = sharding.train_state_shardings(jax.eval_shape(make, params), params_axes, mesh)
  return jax.jit(make, out_shardings=shardings)(params), shardings


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation):
  """One optimizer update of the trainable params (`grads` is their gradient); returns the new
  state and grad/update norms for the metrics."""
  train = lora.trainable(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, train)
  params = lora.with_trainable(state.params, optax.apply_updates(train, updates))
  norms = {"optim/grad_norm": optax.tree.norm(grads), "optim/update_norm": optax.tree.norm(updates)}
  return TrainState(state.step + 1, params, opt_state), norms


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, *, micro_batches: int = 1,
              count_fn: Callable | None = None):
  """Turns `loss_fn(params, batch) -> (loss, metrics)` into a pure `(state, batch) -> (state, metrics)`.

  With micro_batches > 1 the batch is cut along its leading axis and the gradients are summed
  over a `lax.scan`, so only one micro-batch's activations are alive at a time. Exactness
  (docs/pitfalls.md, 8): `count_fn(batch)` gives the whole batch's loss normaliser and every
  micro-batch loss is divided by it (`loss_fn(params, micro, normaliser)`), so the summed
  gradient IS the full-batch gradient, whatever the split. Metrics named `loss/*` are summed
  over micro-batches (they share that normaliser); the others are micro-batch means.

  Only `lora.trainable(params)` is differentiated: a model holding adapters keeps its own
  weights out of the gradient (everything trains when none does), and `loss_fn` reads it as
  `lora.adapted` gives it (the model's params, each adapted kernel run as x W + (x A) s B).
  """
  if micro_batches < 1 or (micro_batches > 1 and count_fn is None):
    raise ValueError(f"micro_batches={micro_batches} needs micro_batches >= 1 and, above 1, a count_fn")

  def step(state: TrainState, batch):
    train = lora.trainable(state.params)
    of_trainable = lambda part, *args: loss_fn(lora.adapted(lora.with_trainable(state.params, part)), *args)
    if micro_batches == 1:
      (loss, metrics), grads = jax.value_and_grad(of_trainable, has_aux=True)(train, batch)
    else:
      normaliser = count_fn(batch)
      micro = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)

      def accumulate(total, part):
        (loss, metrics), grads = jax.value_and_grad(of_trainable, has_aux=True)(train, part, normaliser)
        return jax.tree.map(jnp.add, total, grads), (loss, metrics)

      zeros = jax.tree.map(jnp.zeros_like, train)
      grads, (parts, metrics) = jax.lax.scan(accumulate, zeros, micro)
      loss = parts.sum()
      metrics = {k: v.sum(0) if k.startswith("loss/") else v.mean(0) for k, v in metrics.items()}
    state, norms = apply_gradients(state, grads, tx)
    return state, {**metrics, **norms, "loss/total": loss}

  return step
