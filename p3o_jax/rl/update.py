"""The one jitted RL update every algorithm shares: inner epochs x minibatches as nested
`lax.scan`s, each scan step the pure `(state, batch) -> (state, metrics)` of
`train_state.make_step` over the algorithm's loss."""

from __future__ import annotations

import functools

import jax

from p3o_jax import sharding, train_state


def make_update(loss_fn, tx, *, epochs: int, num_minibatches: int, state_shardings=None,
                micro_batches: int = 1, count_fn=None):
  """(state, batch of G groups, rng[, hyper]) -> (state, metrics[epochs, num_minibatches]), jitted once.

  Every epoch reshuffles the groups; G must divide evenly into minibatches (config checks it).
  With `state_shardings` the new state keeps the old one's layout on the mesh, so the donated
  buffers are reused and the next call hits the same compiled program. `micro_batches` and
  `count_fn` accumulate each minibatch's gradient exactly (see train_state.make_step).

  `hyper` passes the run's numeric hyperparameters as inputs rather than compiling them in, so
  runs that differ only in them (a sweep over rl.beta or optim.lr) share one program, in the
  process and in the persistent compilation cache: hyper["loss"] goes to `loss_fn(..., hp=)`, and
  hyper["lr"] to `tx` when `tx` is a function lr -> optax transformation (its state must not
  depend on lr; `train_state.make_optimizer`'s does not).
  """
  mesh = None if state_shardings is None else jax.tree.leaves(state_shardings)[0].mesh

  def update(state, batch, rng, hyper=None):
    hyper = hyper or {}
    loss = functools.partial(loss_fn, hp=hyper["loss"]) if "loss" in hyper else loss_fn
    optimizer = tx(hyper["lr"]) if "lr" in hyper else tx
    step = train_state.make_step(loss, optimizer, micro_batches=micro_batches, count_fn=count_fn)
    G = next(iter(batch.values())).shape[0]
    size = G // num_minibatches
    # A minibatch gathered by random indices would otherwise come out replicated, and every
    # device would run the whole minibatch (measured: the 2-device update twice as slow as one).
    split = None if mesh is None else sharding.RowSplit(size, mesh).sharding
    pick = lambda x, idx: x[idx] if split is None else jax.lax.with_sharding_constraint(x[idx], split)

    def epoch(state, key):
      order = jax.random.permutation(key, G)[: size * num_minibatches].reshape(num_minibatches, size)
      return jax.lax.scan(lambda s, idx: step(s, jax.tree.map(lambda x: pick(x, idx), batch)), state, order)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, epochs))
    return state, metrics

  if state_shardings is None:
    return jax.jit(update, donate_argnums=0)
  return jax.jit(update, donate_argnums=0,  # metrics replicated: every process reads them
                 out_shardings=(state_shardings, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))


def for_run(algo, optim, total_steps: int, **options):
  """(update, hyper) of an RL run of `algo`: its loss and count under `train_state.make_optimizer`
  (built inside the program around the lr it is given), and the `hyper` to call it with, the
  algorithm's Hyper and optim.lr. `options` are make_update's."""
  update = make_update(algo.loss, lambda lr: train_state.make_optimizer(optim, total_steps, lr),
                       count_fn=algo.count, **options)
  return update, {"loss": algo.hp, "lr": float(optim.lr)}
