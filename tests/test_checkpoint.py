"""Checkpointer: exact round trip, fallback past unreadable steps, NaN guard, signals."""
import glob
import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p3o_jax import checkpoint
from p3o_jax.checkpoint import Checkpointer, NonFiniteError, NoReadableCheckpointError
from p3o_jax.models import decoder

CFG = decoder.DecoderConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)


@pytest.fixture(scope="module")
def train_state():
  """Params from the real decoder (int-keyed layers), adamw state after one update, typed and raw keys."""
  _, params = decoder.create(CFG, seed=0)
  opt = optax.adamw(1e-3)
  opt_state = opt.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, opt_state = opt.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {
      "params": params,
      "opt_state": opt_state,
      "rng": jax.random.key(7),                 # typed key
      "sample_rng": jax.random.PRNGKey(3),      # raw uint32 key
      "step": jnp.int32(10),
  }


def meta_for(step):
  return {"consumed_prompts": 64 * step, "epoch": 1, "kl_coef": np.float32(0.05),
          "reward_stats": {"count": 3, "mean": 0.25, "var": 1.5}, "config": {"rl": {"k": 2, "algo": "p3o"}}}


def save_steps(directory, state, steps, keep=3):
  with Checkpointer(directory, keep=keep) as ckpt:
    for step in steps:
      ckpt.save(step, dict(state, step=jnp.int32(step)), meta_for(step))


def assert_bitwise_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_int_layer_keys(tmp_path, train_state):
  save_steps(tmp_path, train_state, [10])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train_state)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 10
    restored = ckpt.restore(abstract)
  assert restored.step == 10 and restored.skipped == []
  assert sorted(restored.state["params"]["layers"]) == [0, 1]  # int keys, not '0', '1'
  assert_bitwise_equal(restored.state, train_state)
  assert restored.meta == checkpoint.to_jsonable(meta_for(10))
  # The restored key draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.normal(restored.state["rng"], (3,)), jax.random.normal(train_state["rng"], (3,)))


def test_keeps_last_n_and_skips_a_step_saved_twice(tmp_path, train_state):
  save_steps(tmp_path, train_state, [1, 2, 3, 4], keep=2)
  with Checkpointer(tmp_path, keep=2) as ckpt:
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.save(4, train_state) is False   # e.g. periodic save, then preemption save
    assert ckpt.save(5, train_state) is True
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [4, 5]


def abstract_of(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_falls_back_past_a_corrupt_latest_step(tmp_path, train_state, caplog):
  save_steps(tmp_path, train_state, [10, 20, 30])
  for f in glob.glob(str(tmp_path / "30" / "state" / "**" / "d" / "*"), recursive=True):
    open(f, "wb").close()  # truncate every data file of the newest step
  with caplog.at_level(logging.WARNING, logger="p3o_jax.checkpoint"):
    with Checkpointer(tmp_path) as ckpt:
      restored = ckpt.restore(abstract_of(train_state))
      assert ckpt.all_steps() == [10, 20]  # 30 moved aside
      assert int(restored.state["step"]) == 20
      # The moved-aside step number can be written again.
      ckpt.save(30, train_state, meta_for(30))
      ckpt.wait_until_finished()
      assert ckpt.latest_step() == 30
  assert restored.step == 20 and [s for s, _ in restored.skipped] == [30]
  assert "checkpoint step 30 is unreadable (" in caplog.text
  assert "falling back to step 20" in caplog.text
  assert restored.meta["consumed_prompts"] == 64 * 20


def test_falls_back_past_garbled_meta_and_empty_step(tmp_path, train_state, caplog):
  save_steps(tmp_path, train_state, [10, 20])
  with open(tmp_path / "20" / "meta" / "metadata", "w") as f:
    f.write("{not json")
  os.makedirs(tmp_path / "30")  # a step directory with nothing inside it
  with caplog.at_level(logging.WARNING, logger="p3o_jax.checkpoint"):
    with Checkpointer(tmp_path) as ckpt:
      restored = ckpt.restore(abstract_of(train_state))
  assert restored.step == 10 and [s for s, _ in restored.skipped] == [30, 20]
  assert "checkpoint step 30 is unreadable" in caplog.text and "checkpoint step 20 is unreadable" in caplog.text
  assert "falling back to step 10" in caplog.text


def test_half_written_temp_dir_is_ignored(tmp_path, train_state, caplog):
  save_steps(tmp_path, train_state, [10, 20])
  # What a crash during the save of step 30 leaves: orbax's temporary directory, partly filled.
  half = tmp_path / "30.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(tmp_path / "20", half)
  shutil.rmtree(half / "meta")
  with caplog.at_level(logging.WARNING, logger="p3o_jax.checkpoint"):
    with Checkpointer(tmp_path) as ckpt:
      assert ckpt.latest_step() == 20
      restored = ckpt.restore(abstract_of(train_state))
  assert restored.step == 20 and restored.skipped == []
  assert "30.orbax-checkpoint-tmp-1700000000 is half-written" in caplog.text


def test_no_readable_step_raises_and_moves_nothing(tmp_path, train_state):
  save_steps(tmp_path, train_state, [10])
  shutil.rmtree(tmp_path / "10" / "state")
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(NoReadableCheckpointError, match="tried steps \\[10\\]"):
      ckpt.restore(abstract_of(train_state))
    assert ckpt.all_steps() == [10]


def test_refuses_non_finite_params(tmp_path, train_state):
  params = train_state["params"]
  bad = dict(params, layers={0: params["layers"][0], 1: dict(params["layers"][1])})
  bad["layers"][1]["mlp"] = {"down_kernel": params["layers"][1]["mlp"]["down_kernel"].at[0, 0].set(jnp.nan),
                             "up_kernel": params["layers"][1]["mlp"]["up_kernel"]}
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(NonFiniteError, match="params/layers/1/mlp/down_kernel"):
      ckpt.save(5, dict(train_state, params=bad))
    assert ckpt.all_steps() == []


def test_signal_sets_stop_flag_and_handlers_are_restored():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  stop = checkpoint.install_signal_handlers()
  try:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
    os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM keeps the flag, does not kill
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):  # second Ctrl-C after a stop request is a hard stop
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    stop.uninstall()
  assert {s: signal.getsignal(s) for s in before} == before


def test_restore_onto_a_mesh(tmp_path, train_state):
  """Saved from one device, restored straight into (data, fsdp, tensor) shardings."""
  from p3o_jax import sharding
  save_steps(tmp_path, train_state, [10])
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  graph, _ = decoder.abstract(CFG)
  param_shardings = sharding.logical_to_mesh(decoder.logical_axes(graph), mesh, shapes=train_state["params"])
  abstract = abstract_of(train_state)
  abstract["params"] = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    abstract["params"], param_shardings)
  with Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(abstract)
  q = restored.state["params"]["layers"][0]["attn"]["q_kernel"]
  assert q.sharding == param_shardings["layers"][0]["attn"]["q_kernel"] and len(q.addressable_shards) == 8
  assert_bitwise_equal(restored.state, train_state)


def test_each_step_has_a_checksum_manifest_and_a_corrupt_one_is_moved_aside(tmp_path, train_state, caplog):
  save_steps(tmp_path, train_state, [10, 20])
  for step in (10, 20):
    manifest = json.loads((tmp_path / str(step) / checkpoint.MANIFEST_NAME).read_text())["sha256"]
    assert any(name.startswith("state/") for name in manifest) and "meta/metadata" in manifest
  meta = tmp_path / "20" / "meta" / "metadata"  # a changed byte orbax itself would read happily
  meta.write_text(meta.read_text().replace('"consumed_prompts": 1280', '"consumed_prompts": 1281'))
  with caplog.at_level(logging.WARNING, logger="p3o_jax.checkpoint"):
    with Checkpointer(tmp_path) as ckpt:
      restored = ckpt.restore(abstract_of(train_state))
      assert ckpt.all_steps() == [10]
  assert restored.step == 10 and restored.meta["consumed_prompts"] == 640
  assert "checkpoint step 20 is unreadable (ChecksumError: meta/metadata: checksum mismatch" in caplog.text
  moved = [p for p in os.listdir(tmp_path) if p.startswith("20.unreadable")]
  assert len(moved) == 1 and os.path.isfile(tmp_path / moved[0] / "meta" / "metadata")  # kept, not deleted


def test_a_step_restoring_non_finite_values_is_moved_aside(tmp_path, train_state, monkeypatch, caplog):
  save_steps(tmp_path, train_state, [10])
  bad = dict(train_state, params=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), train_state["params"]))
  monkeypatch.setattr(checkpoint, "first_non_finite", lambda tree: None)  # what a bug in the guard would let by
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(20, bad, meta_for(20))
  monkeypatch.undo()
  with caplog.at_level(logging.WARNING, logger="p3o_jax.checkpoint"):
    with Checkpointer(tmp_path) as ckpt:
      restored = ckpt.restore(abstract_of(train_state))
  assert restored.step == 10
  assert "checkpoint step 20 is unreadable (NonFiniteError: leaf 'params/" in caplog.text
  assert any(p.startswith("20.unreadable") for p in os.listdir(tmp_path))
