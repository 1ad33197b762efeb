"""Sharding on 8 simulated CPU devices: rules, dropped axes, sharded forward == unsharded."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from p3o_jax import sharding
from p3o_jax.models import decoder

CFG = decoder.DecoderConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=1,
                            intermediate_size=32, norm="rmsnorm", mlp="swiglu", activation="silu")


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
  return sharding.make_mesh(data=2, fsdp=2, tensor=2)


def test_make_mesh_fills_and_checks():
  assert dict(sharding.make_mesh(data=-1, fsdp=2, tensor=1).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert dict(sharding.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="needs 12 devices, have 8"):
    sharding.make_mesh(data=3, fsdp=2, tensor=2)
  with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
    sharding.make_mesh(data=-1, fsdp=3)


def test_param_shardings_follow_the_rules(mesh, caplog):
  graph, params = decoder.create(CFG, seed=0)
  with caplog.at_level(logging.INFO, logger="p3o_jax.sharding"):
    shardings = sharding.logical_to_mesh(decoder.logical_axes(graph), mesh, shapes=params)
  layer = shardings["layers"][1]
  assert shardings["embed"].spec == P("tensor", "fsdp")          # (vocab, embed)
  assert shardings["lm_head"].spec == P("fsdp", "tensor")        # (embed, vocab)
  assert layer["attn"]["q_kernel"].spec == P("fsdp", "tensor", None)   # (embed, heads, head_dim)
  assert layer["attn"]["o_kernel"].spec == P("tensor", None, "fsdp")   # (heads, head_dim, embed)
  assert layer["mlp"]["gate_kernel"].spec == P("fsdp", "tensor")       # (embed, mlp)
  assert layer["mlp"]["down_kernel"].spec == P("tensor", "fsdp")       # (mlp, embed)
  assert layer["attn_norm"]["scale"].spec == P(None)
  # One kv head cannot be split 2 ways: the tensor axis is dropped for that dim, and logged.
  assert layer["attn"]["k_kernel"].spec == P("fsdp", None, None)
  assert "['layers'][1]['attn']['k_kernel']: dim 1 (kv_heads, size 1) is not divisible by mesh axis 'tensor'" in caplog.text
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_replicate_onto_keeps_the_held_buffer_and_copies_to_the_others():
  """One device's arrays replicated over a per-core mesh: the same values on every device, the
  source device's buffer reused, not copied; arrays split over several devices go through
  jax.device_put."""
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  three = sharding.make_mesh(-1, 1, 1, devices=jax.devices()[:3])
  tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": {"x": jnp.ones((5,), jnp.int32)}}
  tree = jax.device_put(tree, sharding.replicated(one))
  out = sharding.replicate_onto(tree, three)
  for before, after in zip(jax.tree.leaves(tree), jax.tree.leaves(out)):
    assert after.sharding == sharding.replicated(three)
    assert [s.device for s in after.addressable_shards] == list(three.devices.flat)
    for shard in after.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(before))
    assert after.addressable_shards[0].data.unsafe_buffer_pointer() == before.unsafe_buffer_pointer()
    assert after.addressable_shards[1].data.unsafe_buffer_pointer() != before.unsafe_buffer_pointer()
  split = jax.device_put(jnp.arange(4.0), sharding.batch_sharding(sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])))
  again = sharding.replicate_onto(split, three)
  assert again.sharding == sharding.replicated(three)
  np.testing.assert_array_equal(np.asarray(again), np.arange(4.0))


def test_batch_axis_drops_to_what_divides(mesh):
  # batch 2 is divisible by data (2) but not by data x fsdp (4).
  assert sharding.logical_to_spec(("batch", "length"), mesh, shape=(2, 5)) == P("data", None)
  assert sharding.logical_to_spec(("batch", "length"), mesh, shape=(8, 5)) == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="2 logical axes"):
    sharding.logical_to_spec(("batch", "length"), mesh, shape=(8,))


def test_sharded_forward_matches_unsharded(mesh):
  graph, params = decoder.create(CFG, seed=1)
  B, T = 4, 6
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, CFG.vocab_size)
  padding = jnp.array([[0, 0, 1, 1, 1, 1]] * 2 + [[1] * T] * 2, dtype=jnp.int32)  # left padding

  def logits(p, tok, pad):
    model, hidden = decoder.forward(graph, p, tok, pad)
    return model.logits(hidden)

  expected = jax.jit(logits)(params, tokens, padding)
  sharded, shardings = sharding.shard_params(params, decoder.logical_axes(graph), mesh)
  batch = jax.device_put((tokens, padding), sharding.batch_sharding(mesh))
  q = sharded["layers"][0]["attn"]["q_kernel"]
  assert q.sharding == shardings["layers"][0]["attn"]["q_kernel"]
  assert q.addressable_shards[0].data.shape == (8, 2, 4)  # (16/fsdp, 4/tensor, head_dim)
  out = jax.jit(logits)(sharded, *batch)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_scan_layers_params_are_split_like_unrolled_ones(mesh):
  """Stacked blocks: the leading `layers` axis is never split, the others as per layer."""
  cfg = CFG.replace(scan_layers=True)
  graph, _ = decoder.abstract(cfg)
  params = decoder.stack_layers(decoder.create(CFG, seed=1)[1])
  sharded, shardings = sharding.shard_params(params, decoder.logical_axes(graph), mesh)
  layers = shardings["layers"]
  assert layers["attn"]["q_kernel"].spec == P(None, "fsdp", "tensor", None)
  assert layers["mlp"]["down_kernel"].spec == P(None, "tensor", "fsdp")
  assert sharded["layers"]["attn"]["q_kernel"].addressable_shards[0].data.shape == (2, 8, 2, 4)
  tokens = jax.random.randint(jax.random.key(0), (4, 6), 0, CFG.vocab_size)
  padding = jnp.array([[0, 0, 1, 1, 1, 1]] * 2 + [[1] * 6] * 2, dtype=jnp.int32)
  run = lambda g: jax.jit(lambda p, tok, pad: decoder.token_logprobs(g, p, tok, pad))
  unrolled_graph, unrolled = decoder.create(CFG, seed=1)
  np.testing.assert_allclose(np.asarray(run(graph)(sharded, tokens, padding)),
                             np.asarray(run(unrolled_graph)(unrolled, tokens, padding)), atol=1e-5, rtol=1e-5)


def test_optimizer_state_and_replicated_fraction(mesh, caplog):
  graph, params = decoder.create(CFG, seed=0)
  shardings = sharding.logical_to_mesh(decoder.logical_axes(graph), mesh, shapes=params)
  opt_state = optax.adamw(1e-3).init(params)
  opt_shardings = sharding.like_params(opt_state, params, shardings, mesh)
  adam = opt_shardings[0]
  assert adam.mu["embed"] == shardings["embed"] and adam.nu["layers"][0] == shardings["layers"][0]
  assert adam.count.spec == P()
  # Independent count: bytes of arrays whose every dim is unsplit.
  leaves, specs = jax.tree.leaves(params), jax.tree.leaves(shardings)
  repl = sum(x.nbytes for x, s in zip(leaves, specs) if all(a is None for a in s.spec))
  fraction = sharding.replicated_fraction(shardings, params)
  assert fraction == pytest.approx(repl / sum(x.nbytes for x in leaves))
  assert 0 < fraction < 0.5
  everything_replicated = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  with caplog.at_level(logging.WARNING, logger="p3o_jax.sharding"):
    assert sharding.replicated_fraction(everything_replicated, params) == 1.0
  assert "100% of parameter bytes are replicated" in caplog.text and "['embed']" in caplog.text
