"""Gradient accumulation is exact (docs/pitfalls.md, 8): splitting a minibatch into micro-batches
gives the same loss and gradient as the whole minibatch, for every registered algorithm (P3O with
pair and token normalisers at K=2 and 4, each GRPO loss type), with ragged masks."""

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p3o_jax import config_base, train_state
from p3o_jax.models import decoder
from p3o_jax.rl import algorithms, sequences
from p3o_jax.rl.update import make_update

CFG = decoder.DecoderConfig(vocab_size=24, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, norm="rmsnorm", mlp="swiglu", activation="silu",
                            init_std=0.2)
G, P, R = 8, 5, 6  # prompts (groups) in the minibatch, prompt and response lengths


def make_algo(graph, name="p3o", **overrides):
  rl = config_base.base_config().rl
  rl.update(algo=name, **overrides)
  return algorithms.create(rl, graph, 1.0)


def group_batch(graph, params, k, seed):
  """G groups of k responses to one query each (the query [G, P] once per group, as `group`
  gives it), ragged on both sides, with old = current log-probs shifted so that clipping is
  active. The log-probs come from a forward on every row's own repeated query."""
  rng = np.random.default_rng(seed)
  n = G * k
  query = rng.integers(2, CFG.vocab_size, (G, P)).astype(np.int32)
  response = rng.integers(2, CFG.vocab_size, (n, R)).astype(np.int32)
  q_len, r_len = rng.integers(1, P + 1, G), rng.integers(1, R + 1, n)
  query_mask = (np.arange(P)[None] >= P - q_len[:, None]).astype(np.int32)
  response_mask = (np.arange(R)[None] < r_len[:, None]).astype(np.int32)
  logp = np.asarray(sequences.response_logprobs(graph, params, np.repeat(query, k, 0), np.repeat(query_mask, k, 0),
                                                response, response_mask))
  old = (logp + 0.3 * rng.standard_normal(logp.shape) * response_mask).astype(np.float32)
  ref = (logp + 0.2 * rng.standard_normal(logp.shape) * response_mask).astype(np.float32)
  rows = dict(response=response, response_mask=response_mask, logp_old=old, logp_ref=ref)
  return {"query": jnp.asarray(query), "query_mask": jnp.asarray(query_mask),
          **{name: jnp.asarray(v).reshape(G, k, *v.shape[1:]) for name, v in rows.items()}}, rng


def one_step(loss_fn, params, batch, micro, count_fn):
  """The gradient the step applied: SGD with lr 1 makes the update exactly -grad (Adam would
  amplify float-rounding differences of near-zero gradients into visible ones)."""
  tx = optax.sgd(1.0)
  step = jax.jit(train_state.make_step(loss_fn, tx, micro_batches=micro, count_fn=count_fn))
  state, metrics = step(train_state.create(jax.tree.map(jnp.copy, params), tx), batch)
  return jax.tree.map(lambda before, after: before - after, params, state.params), jax.device_get(metrics)


def assert_same_update(loss_fn, params, batch, count_fn):
  whole, m1 = one_step(loss_fn, params, batch, 1, count_fn)
  for micro in (2, 4):
    split, m = one_step(loss_fn, params, batch, micro, count_fn)
    np.testing.assert_allclose(m["loss/total"], m1["loss/total"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["optim/grad_norm"], m1["optim/grad_norm"], rtol=1e-5)
    # Float32 summation order: within 1e-5 of each leaf's largest entry.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()), split, whole)
  assert m1["optim/grad_norm"] > 0


@pytest.mark.parametrize("k,normalise", [(2, "pair"), (2, "token"), (4, "token")])
def test_p3o_micro_batches_equal_the_whole_minibatch(k, normalise):
  graph, params = decoder.create(CFG, seed=1)
  batch, rng = group_batch(graph, params, k, seed=k)
  batch["rewards"] = jnp.asarray(rng.standard_normal((G, k)), jnp.float32)
  algo = make_algo(graph, normalise=normalise)
  assert_same_update(algo.loss, params, batch, algo.count)


def test_ppo_micro_batches_equal_the_whole_minibatch():
  graph, params = decoder.create(CFG, seed=2)
  batch, rng = group_batch(graph, params, 2, seed=7)
  mask = batch["response_mask"]
  for name in ("values", "advantages", "returns"):
    batch[name] = jnp.asarray(rng.standard_normal(mask.shape), jnp.float32) * mask
  params = {"policy": params, "critic": {"kernel": jnp.asarray(0.1 * rng.standard_normal((CFG.hidden_size, 1)),
                                                               jnp.float32), "bias": jnp.zeros((1,))}}
  algo = make_algo(graph, "ppo")
  assert_same_update(algo.loss, params, batch, algo.count)


def test_online_dpo_micro_batches_equal_the_whole_minibatch():
  graph, params = decoder.create(CFG, seed=3)
  batch, rng = group_batch(graph, params, 2, seed=9)
  batch["chosen"] = jnp.asarray(rng.integers(0, 2, G), jnp.int32)
  algo = make_algo(graph, "online_dpo")
  assert_same_update(algo.loss, params, batch, algo.count)


@pytest.mark.parametrize("name,overrides", [
    ("rloo", {}), ("grpo", {"loss_type": "grpo"}), ("grpo", {"loss_type": "dr_grpo"}),
    ("grpo", {"loss_type": "dapo"}), ("gspo", {"seq_eps_low": 0.05, "seq_eps_high": 0.08}),
    ("reinforce_pp", {})], ids=["rloo", "grpo", "dr_grpo", "dapo", "gspo", "reinforce_pp"])
def test_baseline_micro_batches_equal_the_whole_minibatch(name, overrides):
  graph, params = decoder.create(CFG, seed=5)
  batch, rng = group_batch(graph, params, 4, seed=13)
  batch["rewards"] = jnp.asarray(rng.standard_normal((G, 4)), jnp.float32)
  batch["advantages"] = jnp.asarray(rng.standard_normal(batch["response_mask"].shape), jnp.float32)
  algo = make_algo(graph, name, beta=0.1, **overrides)
  assert_same_update(algo.loss, params, batch, algo.count)


def test_micro_batches_need_a_count():
  with pytest.raises(ValueError, match="count_fn"):
    train_state.make_step(lambda p, b: (0.0, {}), None, micro_batches=2)


def test_sharded_update_matches_one_device():
  """The same P3O update on a (data=2, fsdp=2, tensor=2) mesh of 8 simulated devices: params split
  by the logical-axis rules, the batch over data x fsdp; only reduction order may differ."""
  from p3o_jax import sharding
  graph, params = decoder.create(CFG, seed=4)
  batch, rng = group_batch(graph, params, 2, seed=11)
  batch["rewards"] = jnp.asarray(rng.standard_normal((G, 2)), jnp.float32)
  tx = optax.adamw(1e-2)
  loss_fn = make_algo(graph).loss

  single = make_update(loss_fn, tx, epochs=2, num_minibatches=2)
  state_a, metrics_a = single(train_state.create(jax.tree.map(jnp.copy, params), tx), batch, jax.random.key(0))

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  state = train_state.create(jax.tree.map(jnp.copy, params), tx)
  shardings = sharding.train_state_shardings(state, decoder.logical_axes(graph), mesh)
  assert not all(s.is_fully_replicated for s in jax.tree.leaves(shardings.params))
  sharded = make_update(loss_fn, tx, epochs=2, num_minibatches=2, state_shardings=shardings)
  state_b, metrics_b = sharded(jax.device_put(state, shardings), sharding.shard_batch(batch, mesh),
                               jax.random.key(0))
  np.testing.assert_allclose(metrics_b["loss/total"], metrics_a["loss/total"], rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5), state_a.params, state_b.params)
  assert jax.tree.leaves(state_b.params)[0].sharding.mesh.shape == mesh.shape


def test_data_parallel_update_splits_every_minibatch():
  """On a data-parallel mesh each device runs its share of every minibatch: the groups a
  minibatch gathers by random indices stay split over the devices (measured: left replicated,
  every device ran the whole minibatch and a 2-device update took twice as long as one)."""
  from p3o_jax import sharding
  graph, params = decoder.create(CFG, seed=4)
  batch, rng = group_batch(graph, params, 2, seed=11)
  batch["rewards"] = jnp.asarray(rng.standard_normal((G, 2)), jnp.float32)
  tx = optax.adamw(1e-2)
  loss_fn = make_algo(graph).loss
  state = train_state.create(jax.tree.map(jnp.copy, params), tx)
  flops = {}
  for devices in (1, 2):
    mesh = sharding.make_mesh(data=devices, devices=jax.devices()[:devices])
    shardings = sharding.train_state_shardings(state, decoder.logical_axes(graph), mesh)
    update = make_update(loss_fn, tx, epochs=2, num_minibatches=2, state_shardings=shardings)
    compiled = update.lower(jax.device_put(state, shardings), sharding.shard_batch(batch, mesh),
                            jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    flops[devices] = (cost[0] if isinstance(cost, list) else cost)["flops"]  # per device
  assert 0.45 <= flops[2] / flops[1] <= 0.65, flops


def test_remat_saves_fewer_residuals_and_keeps_the_gradient():
  """model.remat (gradient checkpointing): each block is wrapped for recomputation (one remat
  per block), so the backward pass keeps far fewer forward residuals; the gradient is the
  plain one."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 9)), jnp.int32)
  mask = jnp.asarray((np.arange(9)[None] >= np.array([[0], [2], [5]])).astype(np.int32))
  cfg = CFG.replace(num_layers=3)
  grads, residuals = {}, {}
  for remat in (False, True):
    graph, params = decoder.create(cfg.replace(remat=remat), seed=1)
    loss = lambda p: decoder.token_logprobs(graph, p, tokens, mask).sum()
    remats = lambda jaxpr: [e for e in jaxpr.eqns if e.primitive.name == "remat2"]
    # A block's remat holds its attention's own (decoder.attend recomputes the scores either way).
    blocks = [e for e in remats(jax.make_jaxpr(loss)(params).jaxpr) if remats(e.params["jaxpr"])]
    assert len(blocks) == (cfg.num_layers if remat else 0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      jax.ad_checkpoint.print_saved_residuals(loss, params)
    residuals[remat] = len(printed.getvalue().splitlines())
    grads[remat] = jax.jit(jax.grad(loss))(params)
  assert 0 < residuals[True] < residuals[False] / 2, residuals
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads[True], grads[False])
