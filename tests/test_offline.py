"""Offline preference optimisation (rl.algo dpo / simpo; p3o_jax/preference.py) against
independent references: each pair's log-probs from a forward on its UNPADDED tokens
(`test_rl.unpadded_logprobs`), the losses' NumPy transcriptions (`reference_losses`), and the
reward model's own training pairs read back from disk."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import demo_base
import reference_losses as ref
from demo_base import fresh
from p3o_jax import config_checks, pipeline, preference, train_state
from p3o_jax.data import hub
from p3o_jax.rl import algorithms
from test_pipeline import iteration_rows, run_rl, tiny_config
from test_rl import ROTARY, padded_rows, rl_config, tiny, unpadded_logprobs

B = 6  # pairs


def preference_batch(seed):
  """B pairs in the layout `batching.preference_batch` gives: a query [B, P] and two responses
  [B, 2, N] each, with random padding ids only the masks can tell apart."""
  query, query_mask, response, response_mask = padded_rows(seed, n=2 * B)
  return {"query": query[::2], "query_mask": query_mask[::2],
          "response": response.reshape(B, 2, -1), "response_mask": response_mask.reshape(B, 2, -1)}


def unpadded_pair_logprobs(graph, params, batch):
  """[B, 2] sequence log-probs, each response on its own unpadded row (query, then response)."""
  query = np.repeat(batch["query"], 2, axis=0)
  query_mask = np.repeat(batch["query_mask"], 2, axis=0)
  response, response_mask = batch["response"].reshape(2 * B, -1), batch["response_mask"].reshape(2 * B, -1)
  token = unpadded_logprobs(graph, params, query, query_mask, response, response_mask)
  return (token * response_mask).sum(-1).reshape(B, 2).astype(np.float64)


@pytest.mark.parametrize("rl", [dict(algo="dpo"), dict(algo="dpo", dpo_loss="ipo"),
                                dict(algo="dpo", dpo_label_smoothing=0.1), dict(algo="dpo", rpo_alpha=0.5),
                                dict(algo="simpo"), dict(algo="orpo"), dict(algo="kto"),
                                dict(algo="kto", kto_desirable_weight=1.3, dpo_beta=0.5)],
                         ids=["dpo", "ipo", "cdpo", "rpo", "simpo", "orpo", "kto", "kto-weighted"])
def test_loss_on_a_batch_is_the_formula_of_unpadded_logprobs(rl):
  graph, params = tiny(ROTARY, 0)
  # for KTO a reference below the policy on the mismatched responses (z0 > 0, not clamped to 0)
  _, ref_params = tiny(ROTARY, 2 if rl["algo"] == "kto" else 1)
  batch = preference_batch(30)
  algo = algorithms.create(rl_config(**rl), graph, 1.0)
  policy = unpadded_pair_logprobs(graph, params, batch)
  if rl["algo"] == "kto":  # slot 0 the labelled responses, slot 1 the mismatched ones
    reference = unpadded_pair_logprobs(graph, ref_params, batch)
    batch["ref_logp"], batch["label"] = reference.astype(np.float32), (np.arange(B) % 3 > 0).astype(np.float32)
    want = ref.kto(policy[:, 0], reference[:, 0], batch["label"] > 0, policy[:, 1], reference[:, 1],
                   beta=rl.get("dpo_beta", 0.1), desirable_weight=rl.get("kto_desirable_weight", 1.0))
    assert want["kl"] > 0
  elif rl["algo"] == "dpo":
    reference = unpadded_pair_logprobs(graph, ref_params, batch)
    batch["ref_logp"] = reference.astype(np.float32)
    want = ref.dpo(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=0.1,
                   loss_type=rl.get("dpo_loss", "sigmoid"), label_smoothing=rl.get("dpo_label_smoothing", 0.0))
    want["loss"] += rl.get("rpo_alpha", 0.0) * ref.chosen_nll(policy[:, 0], batch["response_mask"][:, 0].sum(-1))
  elif rl["algo"] == "simpo":
    length = batch["response_mask"].sum(-1)
    want = ref.simpo(policy[:, 0], policy[:, 1], length[:, 0], length[:, 1], beta=2.0, gamma=1.0)
  else:
    length = batch["response_mask"].sum(-1)
    want = ref.orpo(policy[:, 0], policy[:, 1], length[:, 0], length[:, 1], lam=0.1)
  loss, metrics = jax.jit(algo.loss)(params, batch)
  np.testing.assert_allclose(loss, want["loss"], rtol=2e-5)
  for name in ("rewards/margins", "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(metrics[name], want[name], rtol=2e-5, atol=1e-5, err_msg=name)
  if "kl" in want:
    np.testing.assert_allclose(metrics["kl"], want["kl"], rtol=2e-5)
  else:
    assert 0 < want["rewards/accuracies"] < 1  # the pairs are not all ordered one way already
  np.testing.assert_allclose(algo.count(batch), B)


def adam_steps(graph, params, algo, batch, steps=8):
  """`steps` Adam steps of the algorithm's loss on one batch whose reference is the starting
  policy; returns the final params and each step's metrics."""
  batch["ref_logp"] = np.asarray(jax.jit(algo.sequence_logprobs)(params, batch))
  tx = optax.adam(1e-2)
  state = train_state.create(jax.tree.map(jnp.copy, params), tx)
  step = jax.jit(train_state.make_step(lambda p, b: algo.loss(p, b), tx))
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  return state.params, history


def test_dpo_steps_raise_the_chosen_margin():
  """A few Adam steps on one batch: the policy's log-ratio margin of the chosen response over the
  rejected one grows from 0 and the loss falls below log 2."""
  graph, params = tiny(ROTARY, 0)
  batch = preference_batch(31)
  algo = algorithms.create(rl_config(algo="dpo", dpo_beta=0.5), graph, 1.0)
  params, history = adam_steps(graph, params, algo, batch)
  losses = [m["loss/total"] for m in history]
  np.testing.assert_allclose(losses[0], np.log(2), atol=1e-6)  # the reference is the starting policy
  after = unpadded_pair_logprobs(graph, params, batch) - batch["ref_logp"]
  assert losses[-1] < 0.5 * np.log(2), losses
  assert np.all(after[:, 0] - after[:, 1] > 0), after


def test_kto_steps_separate_desirable_from_undesirable():
  """KTO from the reference itself: every response's loss is 1 - sigma(0) = 0.5 and the KL
  reference point 0; a few Adam steps raise every desirable response's log-ratio above every
  undesirable one's, which fall."""
  graph, params = tiny(ROTARY, 0)
  batch = preference_batch(31)
  batch["label"] = (np.arange(B) % 2).astype(np.float32)
  algo = algorithms.create(rl_config(algo="kto", dpo_beta=0.5), graph, 1.0)
  params, history = adam_steps(graph, params, algo, batch)
  np.testing.assert_allclose((history[0]["loss/total"], history[0]["kl"]), (0.5, 0.0), atol=1e-6)
  assert history[-1]["loss/total"] < 0.4, history
  ratio = (unpadded_pair_logprobs(graph, params, batch) - batch["ref_logp"])[:, 0]
  good = batch["label"] > 0
  assert ratio[good].min() > 0 > ratio[~good].max(), ratio


def test_unpair_labels_each_response_and_mismatches_prompts():
  pairs = {"prompt": ["a", "a", "b", "b", "c", "c"], "chosen": [f"w{i}" for i in range(6)],
           "rejected": [f"l{i}" for i in range(6)]}
  examples = preference.unpair(pairs)
  assert examples["completion"] == pairs["chosen"] + pairs["rejected"]
  assert examples["prompt"] == pairs["prompt"] * 2 and examples["label"] == [1.0] * 6 + [0.0] * 6
  source = dict(zip(examples["completion"], examples["prompt"]))
  assert all(source[m] != p for m, p in zip(examples["mismatched"], examples["prompt"]))
  assert examples["mismatched"][:3] == ["w2", "w2", "w4"] and examples["mismatched"][-1] == "w0"
  with pytest.raises(ValueError, match="at least two prompts; all 4 responses answer the prompt 'a'"):
    preference.unpair({"prompt": ["a", "a"], "chosen": ["x", "y"], "rejected": ["z", "u"]})


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  return demo_base.train_base(tmp_path_factory)


def test_rm_saves_its_sampled_pairs_and_dpo_reads_them(base_workdir):
  """The demo's rm stage writes the pairs it trained on, and rm.pairs_per_prompt for each held-out
  prompt, in the hub's preference schema; offline algorithms read them back, and they are the
  pairs a fresh sampling gives."""
  config = demo_base.tiny_config()  # as the base was trained
  task = pipeline.load_task(config, base_workdir)
  pairs, held_out = pipeline.preference_pairs(config, base_workdir, task)
  assert len(pairs["prompt"]) == config.rm.num_prompts * config.rm.pairs_per_prompt
  per_prompt = config.rm.pairs_per_prompt  # every held-out prompt's pairs (eval.num_prompts < eval.num_pairs)
  assert held_out["prompt"] == [p for p in task.eval_prompts for _ in range(per_prompt)]
  for name, got in ((pipeline.PAIRS_FILE, pairs), (pipeline.HELD_OUT_PAIRS_FILE, held_out)):
    as_dataset = hub.load_preferences(os.path.join(base_workdir, "rm", name), "train")  # usable as data.preference
    assert list(as_dataset["chosen"]) == got["chosen"] and list(as_dataset["rejected"]) == got["rejected"]
  assert (pairs, held_out) == pipeline.sample_preferences(config, base_workdir, task)


def test_reward_model_held_out_accuracy_is_what_its_scores_give(base_workdir):
  """The rm stage's last held-out record against the exported reward model's own scores of the
  held-out pairs, computed by the rollout's reward path (`rollout.reference_rewards`)."""
  from p3o_jax.data import batching
  from p3o_jax.metrics_log import read_jsonl
  from p3o_jax.models import policy as models
  from p3o_jax.rl.rollout import ModelReward, reference_rewards
  config = demo_base.tiny_config()  # as the base was trained
  task = pipeline.load_task(config, base_workdir)
  _, held_out = pipeline.preference_pairs(config, base_workdir, task)
  rm = models.load(os.path.join(base_workdir, "rm", "hf"), pipeline._placement(config), head="score")
  query, query_mask = batching.tokenize_prompts(task.tokenizer, held_out["prompt"], config.data.max_prompt_len,
                                                config.data.truncate_prompts)
  scores = []
  for side in ("chosen", "rejected"):
    response, response_mask = batching.tokenize_responses(task.tokenizer, held_out[side], config.sampler.max_new_tokens)
    scores.append(reference_rewards(ModelReward(rm.graph, rm.params), query, query_mask, response, response_mask))
  last = [r for r in read_jsonl(os.path.join(base_workdir, "rm", "metrics.jsonl")) if "rm/held_out/rm/accuracy" in r][-1]
  assert last["step"] == config.rm.steps
  np.testing.assert_allclose(last["rm/held_out/rm/accuracy"], np.mean(scores[0] > scores[1]), atol=1e-6)
  np.testing.assert_allclose(last["rm/held_out/rm/margin"], np.mean(scores[0] - scores[1]), rtol=1e-4, atol=1e-5)


def test_dpo_with_lora_trains_only_the_targeted_kernels(base_workdir, tmp_path):
  workdir = fresh(base_workdir, tmp_path)
  config = tiny_config(algo="dpo")
  config.lora.rank, config.lora.alpha, config.lora.targets = 4, 8.0, "q,v"
  export = run_rl(config, workdir)
  rows = iteration_rows(workdir, "dpo")
  np.testing.assert_allclose(rows[0]["loss/total"], np.log(2), atol=1e-6)  # B = 0: the reference
  sft = load_file(os.path.join(workdir, "sft", "hf", "model.safetensors"))
  trained = load_file(os.path.join(export, "model.safetensors"))
  changed = sorted(name for name in sft if not np.array_equal(sft[name], trained[name]))
  assert changed and all("q_proj" in name or "v_proj" in name for name in changed), changed
  assert os.path.isfile(os.path.join(workdir, "rl", "dpo", "adapter", "adapter_model.safetensors"))


def test_offline_settings_are_checked_by_name(base_workdir, tmp_path):
  config = tiny_config(algo="dpo", dpo_loss="kto")
  config.dpo.batch_size = 0
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.validate(config)
  assert "rl.dpo_loss must be one of 'sigmoid', 'ipo', 'hinge'; got 'kto'" in str(info.value)
  assert "dpo.batch_size" in str(info.value)
  config = tiny_config(algo="kto", kto_undesirable_weight=-1.0)
  with pytest.raises(config_checks.ConfigError, match="rl.kto_undesirable_weight"):
    config_checks.validate(config)
  workdir = fresh(base_workdir, tmp_path)
  config = tiny_config(algo="dpo")
  config.dpo.batch_size = 64
  with pytest.raises(ValueError, match=r"32 preference pairs, fewer than dpo.batch_size=64"):
    run_rl(config, workdir)


def test_a_beta_sweep_compiles_the_step_once():
  """rl.dpo_beta and optim.lr are inputs of the offline step (`supervised.make_train_step`), not
  constants compiled into it: one program serves every value, each giving bitwise what a step
  with the value as a constant gives; the loss form (a string) still chooses the program."""
  from p3o_jax import supervised
  graph, params = tiny(ROTARY, 0)
  batch = preference_batch(32)
  batch["ref_logp"] = np.asarray(jax.jit(algorithms.create(rl_config(algo="dpo"), graph, 1.0).sequence_logprobs)(
      params, batch))
  stage = tiny_config().dpo
  swept = supervised.make_train_step(lambda p, b, hp: algo.loss(p, b, hp=hp), stage)
  results = []
  for lr, beta in ((1e-2, 0.1), (3e-3, 0.5)):
    algo = algorithms.create(rl_config(algo="dpo", dpo_beta=beta), graph, 1.0)
    tx = train_state.make_optimizer(stage.optim, stage.steps, lr)
    state, metrics = swept(train_state.create(jax.tree.map(jnp.copy, params), tx), batch, lr, algo.hp)
    constant = jax.jit(train_state.make_step(lambda p, b: algo.loss(p, b), tx))
    expected, expected_metrics = constant(train_state.create(jax.tree.map(jnp.copy, params), tx), batch)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params)):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(metrics["loss/total"], expected_metrics["loss/total"])
    results.append(state.params)
  assert swept._cache_size() == 1
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])))
  ipo = algorithms.create(rl_config(algo="dpo", dpo_loss="ipo"), graph, 1.0)
  tx = train_state.make_optimizer(stage.optim, stage.steps, 1e-2)
  swept(train_state.create(jax.tree.map(jnp.copy, params), tx), batch, 1e-2, ipo.hp)
  assert swept._cache_size() == 2


def test_without_preference_data_the_error_names_the_field(tmp_path):
  """A hub task without data.preference and without an rm stage that sampled pairs."""
  task = pipeline.Task(tokenizer=None, sft_prompts=[], sft_completions=[], rl_prompts=["a"], eval_prompts=["b"])
  with pytest.raises(ValueError, match=r"rl.algo='dpo' trains on preference pairs: set data.preference"):
    pipeline.preference_pairs(tiny_config(algo="dpo"), str(tmp_path), task)
