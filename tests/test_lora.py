"""LoRA: the merge against a NumPy transcription of W + (alpha / r) A B, the adapter gradient
against the full kernel's gradient projected by hand, a train step that moves the adapters alone,
and RL runs whose exports differ from the SFT policy only in the targeted kernels."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import demo_base
from demo_base import fresh
from p3o_jax import config_checks, train_state
from p3o_jax.models import decoder, lora
from test_pipeline import StopAfter, assert_finite_iterations, iteration_rows, run_rl, tiny_config


def small_model(scan_layers=False, mlp="swiglu"):
  cfg = decoder.DecoderConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp=mlp,
                              norm="rmsnorm", scan_layers=scan_layers)
  graph, params = decoder.create(cfg, seed=3)
  return cfg, graph, params


def with_random_b(params, seed=1):
  """Adapters as after some training: B nonzero (it starts at zero)."""
  leaves, tree = jax.tree.flatten(params[lora.KEY])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [jax.random.normal(k, x.shape) * 0.1 for k, x in zip(keys, leaves)]
  return {**params, lora.KEY: jax.tree.unflatten(tree, leaves)}


def numpy_merged_kernel(w, a, b, scale, n_in, layer_axes):
  """W + s A B with A [lead, in..., r], B [lead, r, out...], in float64."""
  w, a, b = (np.asarray(x, np.float64) for x in (w, a, b))
  lead = w.shape[:layer_axes]
  ins, outs = w.shape[layer_axes:layer_axes + n_in], w.shape[layer_axes + n_in:]
  a2 = a.reshape(*lead, int(np.prod(ins)), a.shape[-1])
  b2 = b.reshape(*lead, b.shape[layer_axes], int(np.prod(outs)))
  return w + scale * np.einsum("...ir,...ro->...io", a2, b2).reshape(w.shape)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per-layer", "scan_layers"])
def test_merge_is_w_plus_scaled_a_b(scan_layers):
  cfg, graph, params = small_model(scan_layers)
  with_adapters, axes = lora.attach(params, decoder.logical_axes(graph), rank=3, alpha=12.0, targets=lora.ALL)
  np.testing.assert_array_equal(with_adapters[lora.SCALE], 4.0)
  # B starts at zero: the model is unchanged.
  start = lora.merged(with_adapters)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(start)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  trained = with_random_b(with_adapters)
  out = lora.merged(trained)
  layer_axes = 1 if scan_layers else 0
  blocks = [(out["layers"], params["layers"], trained[lora.KEY]["layers"])] if scan_layers else [
      (out["layers"][i], params["layers"][i], trained[lora.KEY]["layers"][i]) for i in range(cfg.num_layers)]
  seen = 0
  for got, base, adapters in blocks:
    for name, (module, kernel, n_in, _) in lora.KERNELS.items():
      ab = adapters[module][kernel]
      want = numpy_merged_kernel(base[module][kernel], ab["a"], ab["b"], 4.0, n_in, layer_axes)
      np.testing.assert_allclose(got[module][kernel], want, rtol=1e-5, atol=1e-6, err_msg=name)
      assert not np.allclose(got[module][kernel], base[module][kernel]), name
      seen += 1
    for norm in ("attn_norm", "mlp_norm"):
      np.testing.assert_array_equal(got[norm]["scale"], base[norm]["scale"])
  assert seen == len(lora.KERNELS) * len(blocks)
  np.testing.assert_array_equal(out["embed"], params["embed"])
  # The axes tree matches the params tree, and each adapter takes its kernel's sharded axes.
  assert jax.tree.structure(trained, is_leaf=lambda x: isinstance(x, tuple)) is not None
  q_axes = (axes[lora.KEY]["layers"] if scan_layers else axes[lora.KEY]["layers"][0])["attn"]["q_kernel"]
  assert q_axes == ({"a": ("layers", "embed", None), "b": ("layers", None, "heads", "head_dim")} if scan_layers else
                    {"a": ("embed", None), "b": (None, "heads", "head_dim")})


def test_targets_select_kernels_and_bad_names_are_refused():
  cfg, graph, params = small_model(mlp="gelu")  # no gate kernel
  out, _ = lora.attach(params, decoder.logical_axes(graph), rank=2, alpha=2.0, targets=lora.parse_targets("q, v,gate"))
  assert sorted(out[lora.KEY]["layers"][0]["attn"]) == ["q_kernel", "v_kernel"]
  assert "mlp" not in out[lora.KEY]["layers"][0]
  with pytest.raises(ValueError, match=r"lora.targets='q,qq'.*\['qq'\]"):
    lora.parse_targets("q,qq")
  with pytest.raises(ValueError, match="none of these kernels"):
    lora.attach(params, decoder.logical_axes(graph), rank=2, alpha=2.0, targets=("gate",))
  problems = config_checks.problems(_config(rank=-1, targets="q,x"))
  assert any(p.startswith("lora.rank") for p in problems) and any("lora.targets" in p and "'x'" in p for p in problems)


def _config(**lora_fields):
  c = demo_base.tiny_config()
  c.lora.update(lora_fields)
  return c


def test_adapter_gradient_is_the_kernel_gradient_projected():
  """d loss / d B = s A^T (d loss / d W) and d loss / d A = s (d loss / d W) B^T, with the kernel
  gradient taken from the plain model at the merged weights."""
  cfg, graph, params = small_model()
  params, _ = lora.attach(params, decoder.logical_axes(graph), rank=3, alpha=6.0, targets=lora.ALL)
  params = with_random_b(params)
  tokens = jax.random.randint(jax.random.key(5), (3, 7), 0, cfg.vocab_size)
  mask = jnp.ones((3, 7), jnp.int32)

  def loss_of_model(model_params):
    return decoder.token_logprobs(graph, model_params, tokens, mask).sum()

  adapter_grads = jax.grad(lambda p: loss_of_model(lora.merged({**params, lora.KEY: p})))(params[lora.KEY])
  kernel_grads = jax.grad(loss_of_model)(lora.merged(params))
  for i in range(cfg.num_layers):
    for name, (module, kernel, n_in, _) in lora.KERNELS.items():
      g_w = np.asarray(kernel_grads["layers"][i][module][kernel], np.float64)
      ab = params[lora.KEY]["layers"][i][module][kernel]
      a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
      g_w2 = g_w.reshape(int(np.prod(g_w.shape[:n_in])), -1)
      a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)
      got = adapter_grads["layers"][i][module][kernel]
      np.testing.assert_allclose(np.asarray(got["b"]).reshape(b2.shape), 2.0 * a2.T @ g_w2, rtol=2e-4, atol=1e-5,
                                 err_msg=f"{name} B")
      np.testing.assert_allclose(np.asarray(got["a"]).reshape(a2.shape), 2.0 * g_w2 @ b2.T, rtol=2e-4, atol=1e-5,
                                 err_msg=f"{name} A")


def test_train_step_moves_the_adapters_alone():
  cfg, graph, params = small_model()
  params, _ = lora.attach(params, decoder.logical_axes(graph), rank=2, alpha=4.0, targets=lora.ALL)
  critic = {"kernel": jnp.ones((cfg.hidden_size, 1)), "bias": jnp.zeros((1,))}
  tree = {"policy": params, "critic": critic}  # a critic beside the policy trains whole
  tokens = jax.random.randint(jax.random.key(5), (2, 6), 0, cfg.vocab_size)

  def loss_fn(p, batch):
    model = lora.merged(p)
    logp = decoder.token_logprobs(graph, model["policy"], batch, jnp.ones_like(batch)).sum()
    return -logp + (model["critic"]["kernel"] ** 2).sum(), {}

  tx = optax.adam(1e-2)
  state = train_state.create(jax.tree.map(jnp.copy, tree), tx)
  # Adam's moments cover the adapters and the critic, not the model's weights.
  moment_leaves = jax.tree.leaves(state.opt_state[0].mu)
  assert lora.count(state.opt_state[0].mu) == lora.count(params[lora.KEY]) + lora.count(critic)
  assert len(moment_leaves) == len(jax.tree.leaves(params[lora.KEY])) + 2
  step = jax.jit(train_state.make_step(loss_fn, tx))
  for _ in range(3):
    state, metrics = step(state, tokens)
  after = state.params
  frozen = {k: v for k, v in params.items() if k != lora.KEY}
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(frozen),
                          jax.tree.leaves({k: v for k, v in after["policy"].items() if k != lora.KEY})):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(after["critic"]["kernel"], critic["kernel"])
  b_before = jax.tree.leaves({k: v for k, v in params[lora.KEY]["layers"][0]["attn"]["q_kernel"].items()})
  b_after = jax.tree.leaves(after["policy"][lora.KEY]["layers"][0]["attn"]["q_kernel"])
  assert not np.allclose(b_before[1], b_after[1])  # B moved from zero
  assert np.isfinite(metrics["optim/grad_norm"])


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  return demo_base.train_base(tmp_path_factory)


def lora_config(**rl):
  c = tiny_config(**rl)
  c.lora.rank, c.lora.alpha, c.lora.targets = 4, 8.0, "q,v,down"
  return c


@pytest.mark.parametrize("algo", ["p3o", "ppo"])
def test_rl_with_lora_trains_only_the_targeted_kernels_and_resumes_bitwise(base_workdir, tmp_path, algo, monkeypatch):
  from p3o_jax.models import policy as models
  def no_copy(*args, **kwargs):
    raise AssertionError("a LoRA run reads its reference from the policy's frozen model, not a copy")
  monkeypatch.setattr(models, "frozen_copy", no_copy)
  straight = fresh(base_workdir, tmp_path / "straight")
  export = run_rl(lora_config(algo=algo), straight)
  rows = assert_finite_iterations(straight, algo, [1, 2, 3])
  # The reference is the policy's frozen model itself: before the first update (B = 0) the
  # policy's samples have no KL to it; after it they do.
  assert abs(rows[0]["objective/kl"]) < 1e-6 and abs(rows[2]["objective/kl"]) > 1e-6, rows[0]["objective/kl"]
  sft = load_file(os.path.join(straight, "sft", "hf", "model.safetensors"))
  rl = load_file(os.path.join(export, "model.safetensors"))
  assert sft.keys() == rl.keys()
  changed = sorted(name for name in sft if not np.array_equal(sft[name], rl[name]))
  targeted = ("q_proj", "v_proj", "down_proj")
  assert changed and all(any(t in name for t in targeted) for name in changed), changed
  assert {t for name in changed for t in targeted if t in name} == set(targeted)

  if algo == "p3o":
    config = json.load(open(os.path.join(straight, "rl", algo, "adapter", "adapter_config.json")))
    assert sorted(config["target_modules"]) == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    _peft_loads_the_adapter(os.path.join(straight, "sft", "hf"), os.path.join(straight, "rl", algo, "adapter"), export)

  resumed = fresh(base_workdir, tmp_path / "resumed")
  run_rl(lora_config(algo=algo), resumed, stop=StopAfter(2))
  export_b = run_rl(lora_config(algo=algo), resumed)
  assert [r["step"] for r in iteration_rows(resumed, algo)] == [1, 2, 3]
  rl_b = load_file(os.path.join(export_b, "model.safetensors"))
  for name in rl:
    np.testing.assert_array_equal(rl[name], rl_b[name], err_msg=name)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per-layer", "scan_layers"])
@pytest.mark.parametrize("matmul_dtype", ["", "bfloat16"], ids=["fp32", "bf16-matmuls"])
def test_adapted_kernels_compute_the_merged_model(scan_layers, matmul_dtype):
  """The loss's view (x W + (x A) s B in each matmul) gives the merged model's log-probs and the
  same adapter gradients, with no gradient of the frozen weights."""
  cfg, graph, params = small_model(scan_layers)
  graph = decoder.with_matmul_dtype(graph, matmul_dtype)
  params, _ = lora.attach(params, decoder.logical_axes(graph), rank=3, alpha=6.0, targets=lora.ALL)
  params = with_random_b(params)
  tokens = jax.random.randint(jax.random.key(5), (3, 7), 0, cfg.vocab_size)
  mask = jnp.ones((3, 7), jnp.int32)
  logp = lambda view, adapters: decoder.token_logprobs(graph, view({**params, lora.KEY: adapters}), tokens, mask)
  tol = dict(rtol=1e-5, atol=1e-5) if not matmul_dtype else dict(rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(logp(lora.adapted, params[lora.KEY]), logp(lora.merged, params[lora.KEY]), **tol)
  grads = [jax.grad(lambda p: logp(view, p).sum())(params[lora.KEY]) for view in (lora.adapted, lora.merged)]
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(got, want, err_msg=jax.tree_util.keystr(path),
                               **(dict(rtol=1e-4, atol=1e-5) if not matmul_dtype else dict(rtol=0.1, atol=2e-2)))
  # No [in, out] product of the frozen kernels in the compiled backward pass: only A's and B's
  # gradients are formed (a weight gradient here would be a dot whose output is a kernel's shape).
  hlo = jax.jit(jax.grad(lambda p: logp(lora.adapted, p).sum())).lower(params[lora.KEY]).compile().as_text()
  dot_shapes = {tuple(int(n) for n in m.group(1).split(",") if n)
                for m in re.finditer(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* dot\(", hlo)}
  assert dot_shapes, "no dot found in the compiled program"
  kernel_shapes = set()
  for module, kernel, n_in, _ in lora.KERNELS.values():
    block = params["layers"] if scan_layers else params["layers"][0]
    if kernel in block.get(module, {}):
      shape = block[module][kernel].shape[1 if scan_layers else 0:]
      flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
      kernel_shapes |= {shape, flat, flat[::-1]}
  assert not dot_shapes & kernel_shapes, dot_shapes & kernel_shapes
  merged_hlo = jax.jit(jax.grad(lambda p: logp(lora.merged, p).sum())).lower(params[lora.KEY]).compile().as_text()
  merged_dots = {tuple(int(n) for n in m.group(1).split(",") if n)
                 for m in re.finditer(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* dot\(", merged_hlo)}
  assert merged_dots & kernel_shapes  # the check sees weight gradients where they are formed


def _peft_loads_the_adapter(sft_dir, adapter_dir, merged_dir, expect=None):
  """peft's PeftModel on the SFT policy with the written adapter computes the merged export's logits."""
  peft = pytest.importorskip("peft")
  import torch
  import transformers
  config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
  assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (expect or (4, 8.0, sft_dir))
  tokens = torch.tensor([[1, 5, 7, 9, 4, 2, 8, 3]])
  with torch.no_grad():
    base = transformers.AutoModelForCausalLM.from_pretrained(sft_dir, torch_dtype=torch.float32)
    plain = base(tokens).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, adapter_dir)(tokens).logits.numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32)(tokens).logits.numpy()
  np.testing.assert_allclose(adapted, merged, rtol=1e-4, atol=1e-5)
  assert np.abs(adapted - plain).max() > 1e-4  # the adapter changes the model: the check can fail


@pytest.mark.parametrize("kind,targets", [("llama", "all"), ("gpt2", "q,v,o,down"), ("gpt_neox", "k,o,up"),
                                          ("qwen3", "q,k,gate")])
def test_peft_loads_the_adapter_of_every_layout(tmp_path, kind, targets):
  """Separate projections (Llama, Qwen3), GPT-2's Conv1D with q, k, v fused in c_attn, GPT-NeoX's
  query_key_value fused per head: peft's model with the written adapter computes the merged model."""
  import hf_fixtures
  from p3o_jax.models import hf
  peft = pytest.importorskip("peft")
  import torch
  import transformers
  base_dir = tmp_path / "base"
  hf_fixtures.build(kind, base_dir)
  cfg, graph, params = hf.load(str(base_dir))
  params, _ = lora.attach(params, decoder.logical_axes(graph), rank=3, alpha=5.0, targets=lora.parse_targets(targets))
  params = with_random_b(params)
  hf.save(str(tmp_path / "merged"), cfg, lora.merged(params, cast=True))
  hf.save_adapter(str(tmp_path / "adapter"), cfg, params, alpha=5.0, base_model=str(base_dir))
  tokens = torch.tensor([[3, 5, 7, 9, 4, 2, 8, 3, 11]])
  with torch.no_grad():
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    plain = base(tokens).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))(tokens).logits.numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    want = merged(tokens).logits.numpy()
  np.testing.assert_allclose(adapted, want, rtol=1e-4, atol=1e-4)
  assert np.abs(adapted - plain).max() > 1e-2
  # Read back: the adapter folder loads as its base with the adapter merged in.
  _, _, reread = hf.load(str(tmp_path / "adapter"))
  for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(reread), jax.tree.leaves(lora.merged(params))):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


PEFT_MODULES = {"llama": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"],
                "gpt_neox": ["query_key_value", "dense_4h_to_h"], "qwen3": ["k_proj", "up_proj"]}


@pytest.mark.parametrize("kind", sorted(PEFT_MODULES))
def test_a_peft_adapter_loads_as_its_base_with_the_adapter_merged(tmp_path, kind):
  """An adapter made by peft itself (random B, one module at another rank and alpha, rsLoRA on
  Llama; GPT-2's fused Conv1D c_attn, GPT-NeoX's fused query_key_value) gives, read by hf.load,
  the logits of peft's model."""
  import hf_fixtures
  from p3o_jax.models import hf
  peft = pytest.importorskip("peft")
  import torch
  base_dir = tmp_path / "base"
  model = hf_fixtures.build(kind, base_dir)
  modules = PEFT_MODULES[kind]
  config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=modules, init_lora_weights=False,
                           rank_pattern={modules[-1]: 2}, alpha_pattern={modules[-1]: 5},
                           use_rslora=kind == "llama", fan_in_fan_out=kind == "gpt2")
  with torch.no_grad():
    adapted = peft.get_peft_model(model, config)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    want = adapted(torch.tensor([[3, 5, 7, 9, 4, 2, 8, 3, 11]])).logits.numpy()
  saved = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
  saved["base_model_name_or_path"] = str(base_dir)
  json.dump(saved, open(tmp_path / "adapter" / "adapter_config.json", "w"))
  cfg, graph, params = hf.load(str(tmp_path / "adapter"))
  tokens = jnp.asarray([[3, 5, 7, 9, 4, 2, 8, 3, 11]])
  model_out = decoder.forward(graph, params, tokens, jnp.ones_like(tokens))
  got = np.asarray(model_out[0].logits(model_out[1]))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  _, _, base_params = hf.load(str(base_dir))
  base_out = decoder.forward(graph, base_params, tokens, jnp.ones_like(tokens))
  assert np.abs(np.asarray(base_out[0].logits(base_out[1])) - want).max() > 1e-2


def test_a_peft_reward_model_adapter_loads_with_its_score_head(tmp_path):
  """peft's sequence-classification adapter on a causal LM checkpoint: its LoRA weights and the
  score head it trains whole (modules_to_save) give, read with head='score', peft's rewards."""
  import hf_fixtures
  import transformers
  from p3o_jax.models import hf
  from p3o_jax.rl import sequences
  peft = pytest.importorskip("peft")
  import torch
  base_dir = tmp_path / "base"
  hf_fixtures.build("llama", base_dir)
  with torch.no_grad():
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    model.config.pad_token_id = hf_fixtures.PAD_ID
    adapted = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "down_proj"],
                                                         init_lora_weights=False))
    adapted.base_model.model.score.modules_to_save["default"].weight.normal_(0, 0.5)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    tokens = torch.tensor([[3, 5, 7, 9, 4, 2, 8, 3, 11], [6, 2, 9, 4, 4, 7, 1, 5, 10]])
    want = adapted(tokens).logits[:, 0].numpy()
  saved = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
  assert saved["modules_to_save"]
  saved["base_model_name_or_path"] = str(base_dir)
  json.dump(saved, open(tmp_path / "adapter" / "adapter_config.json", "w"))
  cfg, graph, params = hf.load(str(tmp_path / "adapter"), head="score")
  ids = jnp.asarray(tokens.numpy())
  got = np.asarray(sequences.sequence_scores(graph, params, ids, jnp.ones_like(ids)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_adapters_that_are_not_weight_changes_are_refused(tmp_path):
  from p3o_jax.models import hf
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  for change, match in ((dict(use_dora=True), "use_dora=True"), (dict(peft_type="IA3"), "peft_type='IA3'"),
                        (dict(bias="all"), "bias='all'")):
    json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": "x", **change},
              open(adapter / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=match):
      hf.load(str(adapter))


def test_sft_and_reward_model_stages_with_lora(base_workdir, tmp_path):
  """SFT from a hub-format policy and the reward model from it, both with adapters: each export
  differs from its start only in the targeted kernels (and the reward model's new score head),
  and peft loads the SFT adapter onto the starting policy with the merged export's logits."""
  from p3o_jax import pipeline
  start = os.path.join(base_workdir, "sft", "hf")
  c = demo_base.tiny_config()
  c.model.hf = start
  c.lora.update(rank=2, alpha=4.0, targets="o,up", stages="sft,rm")
  workdir = str(tmp_path)
  task = pipeline.load_task(c, workdir)
  sft_export = pipeline.run_sft(c, workdir, task)
  rm_export = pipeline.run_rm(c, workdir, task)
  before = load_file(os.path.join(start, "model.safetensors"))
  sft = load_file(os.path.join(sft_export, "model.safetensors"))
  rm = load_file(os.path.join(rm_export, "model.safetensors"))
  targeted = ("self_attn.o_proj", "mlp.up_proj")
  for name, trained, base in (("sft", sft, before), ("rm", rm, sft)):
    changed = sorted(n for n in trained if n in base and not np.array_equal(trained[n], base[n]))
    assert changed and all(any(t in n for t in targeted) for n in changed), (name, changed)
  assert np.abs(rm["score.weight"]).max() > 0  # the new head trained beside the adapters
  assert not os.path.exists(os.path.join(workdir, "rm", "adapter"))
  config = json.load(open(os.path.join(workdir, "sft", "adapter", "adapter_config.json")))
  assert sorted(config["target_modules"]) == sorted(targeted)
  _peft_loads_the_adapter(start, os.path.join(workdir, "sft", "adapter"), sft_export, expect=(2, 4.0, start))


def test_sampler_decodes_adapted_kernels_as_the_merged_model():
  """The rollout reads adapted params: the sampler's tokens and log-probs are the merged model's."""
  from p3o_jax import sampling
  cfg, graph, params = small_model()
  cfg_mha = cfg.replace(num_kv_heads=None)  # q, k and v stacked for decoding when merged
  for config in (cfg, cfg_mha):
    graph, params = decoder.create(config, seed=3)
    params, _ = lora.attach(params, decoder.logical_axes(graph), rank=3, alpha=6.0, targets=lora.ALL)
    params = with_random_b(params)
    prompts = jnp.asarray([[0, 5, 7, 9], [3, 4, 2, 8]])
    mask = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 1]])
    outs = [sampling.generate(graph, view(params), prompts, mask, jax.random.key(1), max_new_tokens=6,
                              num_samples=2, eos_id=1, pad_id=0) for view in (lora.adapted, lora.merged)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, rtol=1e-5, atol=1e-5)
