"""The TL;DR and HH configs end to end on files in the hub datasets' own schemas (tests/data)
and tiny Hugging Face models made on the fly: what a user runs, minus the download."""

import os

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import models, pre_tokenizers, trainers

from configs import gsm8k, hh, tldr, ultrafeedback
from p3o_jax import main, pipeline
from p3o_jax.data import hub
from p3o_jax.models import hf
from p3o_jax.rl.rollout import TextReward
from p3o_jax.metrics_log import read_jsonl

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def train_tokenizer(texts, specials=()) -> transformers.PreTrainedTokenizerFast:
  """A small byte-level BPE tokenizer trained on the fixture texts, with GPT-NeoX's specials."""
  core = tokenizers.Tokenizer(models.BPE(unk_token=None))
  core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  core.decoder = tokenizers.decoders.ByteLevel()
  core.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>", *specials],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                              pad_token="<|padding|>", padding_side="left",
                                              additional_special_tokens=list(specials))


def save_neox(directory, tokenizer, seq_cls=False):
  config = transformers.GPTNeoXConfig(
      vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, rotary_pct=0.25, max_position_embeddings=128, tie_word_embeddings=False,
      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id, num_labels=1)
  torch.manual_seed(0)
  cls = transformers.GPTNeoXForSequenceClassification if seq_cls else transformers.GPTNeoXForCausalLM
  cls(config).save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return str(directory)


def fixture_texts(source, split="train"):
  ds = hub.load_split(source, split)
  return [str(v) for row in ds for v in row.values() if isinstance(v, str)]


def shrink(c, tmp_path):
  c.sft.steps = c.rm.steps = 2
  c.sft.batch_size = c.rm.batch_size = 4
  c.rl.iterations, c.rl.prompts_per_rollout, c.rl.num_minibatches, c.rl.inner_epochs = 2, 4, 2, 1
  c.rl.rollout_chunk = min(c.rl.rollout_chunk, 2)  # a config that chunks its rollouts still does
  c.eval.every, c.eval.num_prompts = 2, 2
  c.data.max_prompt_len, c.sampler.max_new_tokens = 48, 8
  c.mesh.data, c.mesh.fsdp = 1, 1
  c.log.tensorboard = False
  return c


def given_models(c, tmp_path, tokenizer, source):
  """The policy and reward model as given HF checkpoints (tiny, made here); every dataset `source`."""
  c.model.hf = save_neox(tmp_path / "policy", tokenizer)
  c.model.reward_hf = save_neox(tmp_path / "rm", tokenizer, seq_cls=True)
  c.data.sft = c.data.preference = c.data.prompts = source


def test_tldr_pipeline_on_hub_schema_files(tmp_path):
  """sft on trl-lib/tldr rows, reward model on trl-lib/tldr-preference rows, P3O on the prompts,
  eval on the validation split; activations in bfloat16 as the config ships."""
  sft_dir, pref_dir = os.path.join(DATA, "tldr"), os.path.join(DATA, "tldr_preference")
  tokenizer = train_tokenizer(fixture_texts(sft_dir) + fixture_texts(pref_dir))
  c = shrink(tldr.get_config(), tmp_path)
  assert c.model.dtype == "bfloat16"
  c.model.hf = save_neox(tmp_path / "base", tokenizer)
  c.data.sft, c.data.preference, c.data.prompts = sft_dir, pref_dir, sft_dir
  workdir = str(tmp_path / "run")
  outputs = main.run(c, workdir)
  rows = [r for r in read_jsonl(os.path.join(workdir, "rl", "p3o", "metrics.jsonl")) if "loss/total" in r]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss/total"]) and np.isfinite(r["objective/scores"]) for r in rows)
  rm = [r for r in read_jsonl(os.path.join(workdir, "rm", "metrics.jsonl")) if "rm/loss/total" in r]
  assert rm and np.isfinite(rm[-1]["rm/loss/total"])
  # The exports are what transformers loads: the policy as a causal LM, the RM as seq-cls.
  transformers.AutoModelForCausalLM.from_pretrained(outputs["p3o policy (HF)"])
  transformers.AutoModelForSequenceClassification.from_pretrained(outputs["reward model (HF)"])
  assert os.path.isfile(outputs["report"])


def test_hh_rl_from_given_policy_and_reward_model(tmp_path):
  """configs/hh.py runs RL only: policy and reward model come from HF checkpoints (here tiny
  local ones), prompts from Dahoas/rm-static parquet shards."""
  source = os.path.join(DATA, "rm_static")
  tokenizer = train_tokenizer(fixture_texts(source) + fixture_texts(source, "test"))
  c = shrink(hh.get_config(), tmp_path)
  assert c.stage == "rl"
  given_models(c, tmp_path, tokenizer, source)
  c.rl.algo = "ppo"
  c.rl.critic = "separate"  # critic initialised from the reward model
  workdir = str(tmp_path / "run")
  main.run(c, workdir)
  rows = [r for r in read_jsonl(os.path.join(workdir, "rl", "ppo", "metrics.jsonl")) if "loss/total" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for name in ("loss/value_avg", "policy/clipfrac_avg", "objective/kl", "objective/kl_coef"):
    assert np.isfinite(rows[-1][name]), name
  with pytest.raises(FileNotFoundError, match="rm_missing"):
    c.model.reward_hf = str(tmp_path / "rm_missing")
    main.run(c, str(tmp_path / "run2"))


def test_hh_offline_dpo_on_the_preference_dataset(tmp_path):
  """rl.algo=dpo on configs/hh.py trains on Dahoas/rm-static's own pairs (prompt, chosen,
  rejected) from the given SFT policy, and is evaluated with the given reward model."""
  source = os.path.join(DATA, "rm_static")
  tokenizer = train_tokenizer(fixture_texts(source) + fixture_texts(source, "test"))
  c = shrink(hh.get_config(), tmp_path)
  given_models(c, tmp_path, tokenizer, source)
  c.rl.algo, c.dpo.steps, c.dpo.batch_size = "dpo", 2, 4
  workdir = str(tmp_path / "run")
  outputs = main.run(c, workdir)
  log = read_jsonl(os.path.join(workdir, "rl", "dpo", "metrics.jsonl"))
  rows = [r for r in log if "loss/total" in r]
  assert [r["step"] for r in rows] == [1, 2]
  np.testing.assert_allclose(rows[0]["loss/total"], np.log(2), atol=1e-6)  # the reference is the given policy
  assert [r["step"] for r in log if "eval/kl" in r] == [0, 2]
  transformers.AutoModelForCausalLM.from_pretrained(outputs["dpo policy (HF)"])


def test_tldr_kto_on_unpaired_responses(tmp_path):
  """rl.algo=kto on configs/tldr.py trains on a dataset of single labelled responses (TRL's
  unpaired format), evaluated on its validation split; the reward model and DPO refuse it by name."""
  source = os.path.join(DATA, "tldr_unpaired")
  tokenizer = train_tokenizer(fixture_texts(source) + fixture_texts(source, "validation"))
  c = shrink(tldr.get_config(), tmp_path)
  c.stage = "rl"
  given_models(c, tmp_path, tokenizer, source)
  c.rl.algo, c.dpo.steps, c.dpo.batch_size = "kto", 2, 4
  workdir = str(tmp_path / "run")
  outputs = main.run(c, workdir)
  log = read_jsonl(os.path.join(workdir, "rl", "kto", "metrics.jsonl"))
  rows = [r for r in log if "loss/total" in r]
  assert [r["step"] for r in rows] == [1, 2]
  np.testing.assert_allclose((rows[0]["loss/total"], rows[0]["kl"]), (0.5, 0.0), atol=1e-6)  # from the reference
  evals = [r for r in log if "eval/kl" in r]
  assert [r["step"] for r in evals] == [0, 2]
  np.testing.assert_allclose(evals[0]["held_out/loss/kto"], 0.5, atol=1e-6)  # the 4 validation responses
  transformers.AutoModelForCausalLM.from_pretrained(outputs["kto policy (HF)"])
  task = pipeline.load_task(c, workdir)
  with pytest.raises(ValueError, match="data.preference=.*tldr_unpaired.* holds unpaired responses"):
    pipeline.run_rm(c, workdir, task)
  c.rl.algo = "dpo"
  with pytest.raises(ValueError, match="rl.algo='dpo' trains on pairs; data.preference=.*unpaired"):
    pipeline.run_rl(c, workdir, task)


def test_chat_preferences_train_and_every_export_carries_the_template(tmp_path):
  """configs/ultrafeedback.py with a base model that has no chat template, on
  HuggingFaceH4/ultrafeedback_binarized's layout: data.chat_template (a file) renders its
  conversations; SFT on the chosen replies, then offline DPO; each exported policy's tokenizer
  renders a conversation as the training data were."""
  source = os.path.join(DATA, "ultrafeedback_binarized")
  raw = hub.load_split(source, "train_prefs")
  tokenizer = train_tokenizer([m["content"] for r in raw for m in r["chosen"] + r["rejected"]],
                              specials=("<|im_start|>", "<|im_end|>"))
  template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
  (tmp_path / "chatml.jinja").write_text(template)
  c = shrink(ultrafeedback.get_config(), tmp_path)
  given_models(c, tmp_path, tokenizer, source)
  c.model.reward_hf = ""  # the reward is the reply's length, not a model's
  c.model.reward_fn = "test_hub_pipeline:reply_length"
  c.data.chat_template = str(tmp_path / "chatml.jinja")
  c.data.max_prompt_len = 96
  c.pipeline.algos, c.dpo.steps, c.dpo.batch_size = ("dpo",), 2, 4
  workdir = str(tmp_path / "run")
  outputs = main.run(c, workdir)
  rows = [r for r in read_jsonl(os.path.join(workdir, "rl", "dpo", "metrics.jsonl")) if "loss/total" in r]
  assert [r["step"] for r in rows] == [1, 2]
  np.testing.assert_allclose(rows[0]["loss/total"], np.log(2), atol=1e-6)  # the reference is the SFT policy
  conversation = raw[4]["chosen"][:-1]
  rendered = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
              "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
  task = pipeline.load_task(c, workdir)
  assert task.rl_prompts[4] == rendered
  # SFT trained on both replies of the two-turn conversations (sft.assistant_turns='all'), the
  # earlier one in place inside the prompt; under 'last' on the last reply alone.
  assert task.sft_prompts[4] == rendered and [rendered[a:b] for a, b in task.sft_reply_spans[4]] == ["Paris.<|im_end|>\n"]
  assert sum(map(bool, task.sft_reply_spans)) == 2
  batch = pipeline.sft_batches(c, task)[0]([4])
  targets = task.tokenizer.decode(batch["tokens"][0][batch["loss_mask"][0]])
  assert targets == "Paris.<|im_end|>\nRome is the capital of Italy.<|im_end|>\n" + task.tokenizer.eos_token
  c.sft.assistant_turns = "last"
  task = pipeline.load_task(c, workdir)
  assert task.sft_reply_spans is None
  batch = pipeline.sft_batches(c, task)[0]([4])
  assert task.tokenizer.decode(batch["tokens"][0][batch["loss_mask"][0]]).startswith("Rome")
  for name in ("sft policy (HF)", "dpo policy (HF)"):
    exported = transformers.AutoTokenizer.from_pretrained(outputs[name])
    assert exported.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == rendered, name
  c.data.chat_template = str(tmp_path / "missing.jinja")
  with pytest.raises(FileNotFoundError, match="data.chat_template=.*missing.jinja.: no such file"):
    pipeline.load_task(c, workdir)


def reply_length(prompts, responses):
  return [float(len(r)) for r in responses]


def test_gsm8k_rl_reward_reads_each_prompts_answer(tmp_path):
  """configs/gsm8k.py on openai/gsm8k's layout (subset main): SFT on the worked answers, RL with
  a Python reward that gets each row's question and answer columns; that reward checks every
  row's question against its prompt's text, in training and in the evaluations."""
  source = os.path.join(DATA, "gsm8k")
  raw = hub.load_split(source, "train", data_dir="main")
  tokenizer = train_tokenizer(list(raw["question"]) + list(raw["answer"]))
  c = shrink(gsm8k.get_config(), tmp_path)
  assert c.model.reward_fn == "p3o_jax.rewards:gsm8k_correct" and c.rl.k == 4
  c.model.hf = save_neox(tmp_path / "base", tokenizer)
  c.data.sft = c.data.prompts = source
  c.model.reward_fn = "test_hub_pipeline:question_in_prompt"
  c.sft.packing = True  # the answers several to a row where they fit
  workdir = str(tmp_path / "run")
  main.run(c, workdir)
  sft = [r for r in read_jsonl(os.path.join(workdir, "sft", "metrics.jsonl")) if "sft/sft/nll" in r]
  assert [r["step"] for r in sft] == [1, 2] and all(np.isfinite(r["sft/sft/nll"]) for r in sft)
  make_batch, rows = pipeline.sft_batches(c, pipeline.load_task(c, workdir))
  assert rows <= len(raw) and make_batch(np.arange(rows))["segments"].max() >= 1
  log = read_jsonl(os.path.join(workdir, "rl", "p3o", "metrics.jsonl"))
  rows = [r for r in log if "loss/total" in r]
  assert [r["step"] for r in rows] == [1, 2] and all(r["objective/scores"] == 1.0 for r in rows)
  assert [r["eval/reward"] for r in log if "eval/reward" in r] == [1.0, 1.0]
  assert [r["eval/greedy_reward"] for r in log if "eval/reward" in r] == [1.0, 1.0]  # eval.greedy in the config


def question_in_prompt(prompts, responses, question, answer):
  """1 for every row whose question ends its (possibly left-cut) prompt, which names its answer."""
  for prompt, asked, worked in zip(prompts, question, answer, strict=True):
    assert prompt.endswith(asked[-20:] + "\nAnswer:") and "####" in worked, (prompt, asked)
  return [1.0] * len(responses)


def test_hh_reward_baseline_is_the_reward_of_the_chosen_response(tmp_path):
  """configs/hh.py subtracts r(x, y_chosen) (P3O paper, HH): with a reward of the response's
  length in characters, each prompt's baseline is the length of its dataset chosen response."""
  source = os.path.join(DATA, "rm_static")
  tokenizer = train_tokenizer(fixture_texts(source) + fixture_texts(source, "test"))
  c = shrink(hh.get_config(), tmp_path)
  assert c.rl.reward_baseline == "reference"
  c.model.tokenizer = save_neox(tmp_path / "policy", tokenizer)
  c.data.sft = c.data.preference = c.data.prompts = source
  c.sampler.max_new_tokens = 512  # room for every chosen response and its EOS
  task = pipeline.load_task(c, str(tmp_path / "run"))
  length = TextReward(lambda prompts, responses: [len(r) for r in responses], task.tokenizer)
  baselines = [pipeline.reward_baseline(c, task.tokenizer, length, prompts, refs)
               for prompts, refs in ((task.rl_prompts, task.rl_references), (task.eval_prompts, task.eval_references))]
  for baseline, split, n in zip(baselines, ("train", "test"), (None, c.eval.num_prompts)):
    chosen = hub.load_split(source, split)["chosen"][:n]
    np.testing.assert_array_equal(baseline, [len(text) for text in chosen])

  prompt_only = tmp_path / "prompts"
  prompt_only.mkdir()
  for split in ("train", "test"):
    (prompt_only / f"{split}.jsonl").write_text('{"prompt": "Human: hi Assistant:"}\n')
  c.data.prompts = str(prompt_only)
  with pytest.raises(ValueError, match=r"rl.reward_baseline='reference' needs a response for every prompt"):
    pipeline.load_task(c, str(tmp_path / "run2"))


def test_a_hub_id_that_cannot_be_loaded_names_itself_and_its_field(tmp_path):
  # Offline (as every test runs) with no cached copy: the hub's own errors name no id here.
  with pytest.raises(OSError, match="model 'nobody-p3o/missing-model' .*not a local folder"):
    hf.load("nobody-p3o/missing-model")
  config = tldr.get_config()
  config.model.hf, config.model.tokenizer = "nobody-p3o/missing-policy", "nobody-p3o/missing-tokenizer"
  with pytest.raises(OSError, match="model.tokenizer='nobody-p3o/missing-tokenizer': no tokenizer"):
    pipeline.load_task(config, str(tmp_path))
  config.model.tokenizer = ""
  with pytest.raises(OSError, match="model.hf='nobody-p3o/missing-policy': no tokenizer"):
    pipeline.load_task(config, str(tmp_path))
  with pytest.raises(OSError, match="nobody-p3o/missing-data"):  # datasets names it itself
    hub.load_split("nobody-p3o/missing-data", "train")
