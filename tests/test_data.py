"""Data layer: demo task and gold reward, hub-schema loaders on local fixtures, batching, resume."""
import copy
import json
import os

import datasets
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from p3o_jax.data import batching, hub, synthetic

DATA = os.path.join(os.path.dirname(__file__), "data")
datasets.disable_progress_bars()


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def demo_tok():
  return synthetic.build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
  """A byte-level BPE like GPT-2's, but adding a BOS like Llama's, with no pad token."""
  core = tokenizers.Tokenizer(models.BPE())
  core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  core.decoder = decoders.ByteLevel()
  texts = [r["prompt"] + r["completion"] for r in read_jsonl(os.path.join(DATA, "tldr", "train.jsonl"))]
  core.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
  return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


# ----------------------------------------------------------------------------- demo task

def test_demo_tokenizer_round_trips_text_and_autotokenizer(demo_tok, tmp_path):
  task = synthetic.make_demo_task(0, 50, 10, ops=synthetic.OPS)
  texts = task.sft_prompts + task.sft_completions + task.eval_prompts
  ids = demo_tok(texts, add_special_tokens=False)["input_ids"]
  assert [demo_tok.decode(i) for i in ids] == texts
  assert all(len(i) == len(t.split()) for i, t in zip(ids, texts))  # one id per word, no <unk>
  assert demo_tok.unk_token_id not in {x for row in ids for x in row}
  demo_tok.save_pretrained(tmp_path)
  loaded = AutoTokenizer.from_pretrained(str(tmp_path))
  assert loaded(texts, add_special_tokens=False)["input_ids"] == ids
  assert (loaded.pad_token_id, loaded.eos_token_id) == (demo_tok.pad_token_id, demo_tok.eos_token_id)
  assert loaded.pad_token_id != loaded.eos_token_id and len(loaded) == len(synthetic.VOCAB)


def test_gold_reward_formula():
  prompts = ["sort 3 1 2 =", "sort 3 1 2 =", "reverse 1 2 3 4 =", "copy 5 5 0 =", "copy 5 =", "sort 2 1 ="]
  responses = ["1 2 3", "1 2", "4 3 9 1 <eos> 7 7", "5 5 0 0 0 0 0 0", "5 5 5 5 5 5", "<pad> 2"]
  want = [1.0, 2 / 3 - 0.5 * 1 / 3, 3 / 4, 3 / 3 - 0.5 * 5 / 3, max(1 - 0.5 * 5, -1.0), 1 / 2]
  np.testing.assert_allclose(synthetic.gold_reward(prompts, responses), want, rtol=1e-6)
  with pytest.raises(ValueError, match="not a demo-task prompt"):
    synthetic.gold_reward(["hello ="], ["1"])


def test_gold_reward_ranks_clean_over_noisy_over_random():
  task = synthetic.make_demo_task(0, 1000, 10)
  prompts = task.sft_prompts
  clean = synthetic.gold_reward(prompts, task.sft_clean_completions)
  noisy = synthetic.gold_reward(prompts, task.sft_completions)
  rand = synthetic.gold_reward(prompts, synthetic.random_responses(prompts, np.random.default_rng(0)))
  corrupted = np.array([a != b for a, b in zip(task.sft_completions, task.sft_clean_completions)])
  assert np.all(clean == 1.0)
  assert clean.mean() > noisy.mean() > rand.mean() + 0.3
  assert noisy[corrupted].mean() < 0.7  # the corrupted demos are bad, not just slightly off
  # About noise_frac of the demos differ (a corruption can leave a demo unchanged by chance).
  assert 0.45 < corrupted.mean() <= 0.65


def test_make_demo_task_is_deterministic_and_splits_are_disjoint():
  a, b, c = (synthetic.make_demo_task(s, 200, 50, n_sft=300) for s in (3, 3, 4))
  assert a == b and a != c
  assert (len(a.sft_prompts), len(a.train_prompts), len(a.eval_prompts)) == (300, 200, 50)
  assert not set(a.sft_prompts) & set(a.train_prompts)
  assert not (set(a.sft_prompts) | set(a.train_prompts)) & set(a.eval_prompts)
  assert [synthetic.target(p) for p in a.sft_prompts] == a.sft_clean_completions
  with pytest.raises(ValueError, match="noise_frac"):
    synthetic.make_demo_task(0, 10, 10, noise_frac=1.5)


def test_bradley_terry_label_matches_sigmoid():
  rng = np.random.default_rng(0)
  diffs = np.repeat(np.array([-0.3, -0.1, 0.0, 0.05, 0.2]), 20000)
  labels = synthetic.bradley_terry_label(diffs, np.zeros_like(diffs), rng, temperature=0.1)
  freq = labels.reshape(5, -1).mean(1)
  np.testing.assert_allclose(freq, 1 / (1 + np.exp(-np.array([-3.0, -1.0, 0.0, 0.5, 2.0]))), atol=0.012)
  hard = synthetic.bradley_terry_label(np.array([1.0, 0.0]), np.array([0.0, 1.0]), rng, temperature=0)
  assert hard.tolist() == [True, False]
  with pytest.raises(ValueError, match="shape"):
    synthetic.bradley_terry_label(np.zeros(2), np.zeros(3), rng)


def test_saved_demo_task_reads_back_through_hub_loaders(tmp_path):
  task = synthetic.make_demo_task(1, 20, 8)
  paths = synthetic.save_demo_task(task, str(tmp_path))
  sft = hub.load_sft(paths["sft"], "train")
  assert sft["prompt"] == task.sft_prompts and sft["completion"] == task.sft_completions
  assert hub.load_prompts(paths["prompts"], "test")["prompt"] == task.eval_prompts
  assert hub.load_prompts(paths["prompts"], "train")["prompt"] == task.train_prompts
  assert AutoTokenizer.from_pretrained(paths["tokenizer"]).eos_token == synthetic.EOS


# ----------------------------------------------------------------------------- hub loaders

@pytest.mark.parametrize("source, split, completion_of", [
    ("tldr", "train", lambda r: r["completion"]),                          # dir, split by file name
    ("tldr/validation.jsonl", "validation", lambda r: r["completion"]),
    ("openai_summarize_tldr.jsonl", "train", lambda r: " " + r["label"]),
    ("tldr_preference/train.jsonl", "train", lambda r: r["chosen"]),
    ("tldr_preference_trl_style.jsonl", "train", lambda r: r["chosen"][-1]["content"]),
])
def test_tldr_sft_and_prompt_records(source, split, completion_of):
  path = os.path.join(DATA, source)
  raw = read_jsonl(path if path.endswith(".jsonl") else os.path.join(path, f"{split}.jsonl"))
  sft = hub.load_sft(path, split)
  assert sft.column_names == ["prompt", "completion", "reply_spans"] and not any(sft["reply_spans"])
  assert sft["prompt"] == [r["prompt"] for r in raw]
  assert sft["completion"] == [completion_of(r) for r in raw]
  assert hub.load_prompts(path, split)["prompt"] == [r["prompt"] for r in raw]


@pytest.mark.parametrize("source", ["tldr_preference/train.jsonl", "tldr_preference_trl_style.jsonl"])
def test_tldr_preference_records(source):
  raw = read_jsonl(os.path.join(DATA, source))
  prefs = hub.load_preferences(os.path.join(DATA, source), "train")
  assert prefs.column_names == ["prompt", "chosen", "rejected"]
  text = lambda v: v if isinstance(v, str) else v[-1]["content"]
  assert prefs["chosen"] == [text(r["chosen"]) for r in raw]
  assert prefs["rejected"] == [text(r["rejected"]) for r in raw]


def test_unpaired_preference_records():
  """TRL's unpaired (KTO) format: each response with its label; SFT reads the desirable ones."""
  source = os.path.join(DATA, "tldr_unpaired")
  raw = read_jsonl(os.path.join(source, "train.jsonl"))
  prefs = hub.load_preferences(source, "train")
  assert prefs.column_names == ["prompt", "completion", "label"]
  assert prefs.to_list() == raw and 0 < sum(prefs["label"]) < len(raw)
  sft = hub.load_sft(source, "train")
  assert sft["completion"] == [r["completion"] for r in raw if r["label"]]
  as_ints = hub.preference_records(datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "label": 1}]))
  assert as_ints["label"] == [True]
  with pytest.raises(ValueError, match="row 1: label is int '2'; expected true"):
    hub.preference_records(datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "label": v} for v in (0, 2)]))


def test_hh_rlhf_transcripts_split_at_last_shared_assistant_turn():
  raw = read_jsonl(os.path.join(DATA, "hh_rlhf", "train.jsonl"))
  prefs = hub.load_preferences(os.path.join(DATA, "hh_rlhf"), "train")
  for row, rec in zip(raw, prefs):
    assert rec["prompt"].endswith("\n\nAssistant:") and rec["prompt"].startswith("\n\nHuman:")
    assert rec["prompt"] + rec["chosen"] == row["chosen"]
    assert rec["prompt"] + rec["rejected"] == row["rejected"]
    assert "\n\nAssistant:" not in rec["chosen"] and "\n\nHuman:" not in rec["chosen"]
  assert hub.load_sft(os.path.join(DATA, "hh_rlhf"), "train")["completion"] == prefs["chosen"]
  with pytest.raises(ValueError, match="row 0: no shared"):
    hub.preference_records(datasets.Dataset.from_list([{"chosen": "Hi there", "rejected": "Bye"}]))


def test_rm_static_parquet_in_hub_layout():
  root = os.path.join(DATA, "rm_static")
  train, test = hub.load_split(root, "train"), hub.load_split(root, "test")
  assert train.column_names == ["prompt", "response", "chosen", "rejected"]
  hh = read_jsonl(os.path.join(DATA, "hh_rlhf", "train.jsonl"))  # the same dialogues, HH layout
  prefs = hub.preference_records(datasets.concatenate_datasets([train, test]))
  assert [p + c for p, c in zip(prefs["prompt"], prefs["chosen"])] == [r["chosen"] for r in hh]
  assert hub.sft_records(test)["completion"] == test["chosen"]


def test_save_to_disk_directory_loads_like_a_hub_id(tmp_path):
  ds = datasets.Dataset.from_list(read_jsonl(os.path.join(DATA, "tldr", "train.jsonl")))
  ds.save_to_disk(str(tmp_path / "one"))
  datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "dict"))
  assert hub.load_sft(str(tmp_path / "one"), "train")["completion"] == ds["completion"]
  assert hub.load_sft(str(tmp_path / "dict"), "validation")["prompt"] == ds["prompt"]


def test_unknown_schema_errors_name_found_and_expected_columns():
  ds = datasets.Dataset.from_list([{"title": "q", "body": "a"}])
  for fn in (hub.sft_records, hub.preference_records, hub.prompt_records):
    with pytest.raises(ValueError, match=r"columns found \['body', 'title'\]; expected one of .*prompt"):
      fn(ds)
  chat = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}], "completion": "x"}])
  with pytest.raises(ValueError, match="row 0: column .prompt. holds chat messages and the tokenizer has no chat template"):
    hub.sft_records(chat)
  with pytest.raises(ValueError, match="expected a file ending"):
    hub.load_split(os.path.join(DATA, "make_fixtures.py"), "train")


# ----------------------------------------------------------------------------- conversational rows

CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml(messages, generation=True):
  """ChatML written out by hand: the reference the template's rendering is checked against."""
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
  return text + ("<|im_start|>assistant\n" if generation else "")


@pytest.fixture(scope="module")
def chat(bpe_tok):
  tok = copy.deepcopy(bpe_tok)
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  tok.chat_template = CHATML
  return hub.ChatTemplate(tok), tok


def test_conversational_preferences_render_with_the_chat_template(chat):
  """HuggingFaceH4/ultrafeedback_binarized (a text prompt beside chosen/rejected conversations),
  trl-lib/ultrafeedback_binarized (the prompt implicit in them) and TRL's explicit conversational
  format all read as the same texts: the shared messages rendered with the generation prompt, each
  reply as the text it adds, end of turn included; the prompt once with the tokenizer's BOS."""
  renderer, tok = chat
  source = os.path.join(DATA, "ultrafeedback_binarized")
  raw = hub.load_split(source, "train_prefs")
  shared = [r["chosen"][:-1] for r in raw]
  expected = {"prompt": [chatml(m) for m in shared],
              "chosen": [r["chosen"][-1]["content"] + "<|im_end|>\n" for r in raw],
              "rejected": [r["rejected"][-1]["content"] + "<|im_end|>\n" for r in raw]}
  assert any(len(m) == 3 for m in shared)  # a multi-turn row: the earlier reply is the prompt's
  assert hub.load_preferences(source, "train_prefs", renderer).to_dict() == expected
  implicit = raw.remove_columns(["prompt", "prompt_id", "messages"])  # trl-lib's columns
  assert hub.preference_records(implicit, renderer).to_dict() == expected
  explicit = datasets.Dataset.from_list([{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:],
                                          "rejected": r["rejected"][-1:]} for r in raw])
  assert hub.preference_records(explicit, renderer).to_dict() == expected
  sft = hub.load_sft(source, "train_prefs", renderer)
  assert sft["prompt"] == expected["prompt"] and sft["completion"] == expected["chosen"]
  assert hub.load_prompts(source, "train_prefs", renderer)["prompt"] == expected["prompt"]
  messages = datasets.Dataset.from_list([{"messages": r["messages"]} for r in raw])  # trl-lib/Capybara's column
  spans = [[[len(chatml(m[:i])), len(chatml(m[:i + 1], generation=False))] for i in range(1, len(m))
            if m[i]["role"] == "assistant"] for m in shared]  # an earlier reply: its content and end of turn
  assert hub.sft_records(messages, renderer).to_dict() == {"prompt": expected["prompt"], "completion": expected["chosen"],
                                                           "reply_spans": spans}
  assert sft["reply_spans"] == spans and any(spans)
  assert hub.prompt_records(messages, renderer)["prompt"] == expected["prompt"]
  unpaired = datasets.Dataset.from_list([{"prompt": r["chosen"][:-1], "completion": r["rejected"][-1:], "label": False}
                                         for r in raw])  # trl-lib/kto-mix-14k's columns
  assert hub.preference_records(unpaired, renderer)["completion"] == expected["rejected"]
  tokens, mask = batching.tokenize_prompts(tok, expected["prompt"][:2], 64)
  assert [int((row[m] == tok.bos_token_id).sum()) for row, m in zip(tokens, mask)] == [1, 1]
  assert tok.decode(tokens[0][mask[0]]) == tok.bos_token + expected["prompt"][0]


def test_conversational_rows_without_a_template_or_a_prompt_fail_naming_the_row(chat):
  renderer, _ = chat
  source = os.path.join(DATA, "ultrafeedback_binarized")
  # A text prompt and no template: the replies are the last assistant messages' content, as for
  # trl-internal-testing/tldr-preference-trl-style.
  raw = hub.load_split(source, "test_prefs")
  prefs = hub.load_preferences(source, "test_prefs")
  assert prefs["prompt"] == raw["prompt"] and prefs["chosen"] == [r[-1]["content"] for r in raw["chosen"]]
  implicit = raw.remove_columns(["prompt"])
  with pytest.raises(ValueError, match="row 0: column 'chosen' holds chat messages and the tokenizer has no chat "
                                       "template: set data.chat_template"):
    hub.preference_records(implicit)
  parted = datasets.Dataset.from_list([
      {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
       "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
  with pytest.raises(ValueError, match="row 0: chosen and rejected share no leading messages"):
    hub.preference_records(parted, renderer)
  with pytest.raises(ValueError, match="row 0: column 'messages' needs an assistant message after"):
    hub.sft_records(datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}]), renderer)
  with pytest.raises(ValueError, match="row 0: column 'prompt' holds list"):
    hub.prompt_records(datasets.Dataset.from_list([{"prompt": [{"content": "no role"}]}]), renderer)


def test_a_prompt_ending_in_an_assistant_message_is_continued(chat):
  renderer, _ = chat
  prefill = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Sure,"}]
  assert renderer.render(prefill)[0] == chatml(prefill[:1], generation=False) + "<|im_start|>assistant\nSure,"


def test_a_reply_ending_with_eos_leaves_it_to_batching(chat):
  """A chat model whose EOS ends each turn (Qwen's <|im_end|>): the reply loses its end of turn and
  the newline after it, so the tokenized response ends in one EOS, as a sample does."""
  _, tok = chat
  chat_model = copy.deepcopy(tok)
  chat_model.eos_token = "<|im_end|>"
  renderer = hub.ChatTemplate(chat_model)
  question = [{"role": "user", "content": "Name a colour."}]
  assert renderer.render(question, [[{"role": "assistant", "content": "Blue."}]])[1] == ["Blue."]
  tokens, mask = batching.tokenize_responses(chat_model, ["Blue."], 8)
  assert chat_model.decode(tokens[0][mask[0] == 1]) == "Blue.<|im_end|>"
  assert hub.ChatTemplate(tok).render(question, [[{"role": "assistant", "content": "Blue."}]])[1] == ["Blue.<|im_end|>\n"]


THREE_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
               {"role": "assistant", "content": "Red, then green."}, {"role": "user", "content": "One more."},
               {"role": "assistant", "content": "Yellow."}]


@pytest.mark.parametrize("eos_ends_turns", [False, True])
def test_every_assistant_turn_of_a_conversation_is_a_target(chat, eos_ends_turns):
  """SFT on a three-turn conversation (sft.assistant_turns='all'): the targets are the three
  replies, each with its end of turn, and nothing of the system or user turns; the tokens are the
  rendered conversation's. With EOS as the end of turn (Qwen's <|im_end|>) each reply's target
  ends in EOS and the newline after it is context, as in a sample followed by the next turn."""
  _, tok = chat
  tok = copy.deepcopy(tok)
  if eos_ends_turns:
    tok.eos_token = "<|im_end|>"
  renderer = hub.ChatTemplate(tok)
  sft = hub.sft_records(datasets.Dataset.from_list([{"messages": THREE_TURNS}]), renderer)
  prompt, completion, spans = sft[0]["prompt"], sft[0]["completion"], sft[0]["reply_spans"]
  end_of_turn = "<|im_end|>" if eos_ends_turns else "<|im_end|>\n"
  assert prompt == chatml(THREE_TURNS[:-1])
  assert [prompt[a:b] for a, b in spans] == ["Blue." + end_of_turn, "Red, then green." + end_of_turn]
  assert completion == ("Yellow." if eos_ends_turns else "Yellow.<|im_end|>\n")

  batch = batching.sft_batch(tok, [prompt], [completion], 256, reply_spans=[spans])
  tokens, mask, targets = batch["tokens"][0], batch["mask"][0], batch["loss_mask"][0]
  whole = tok.bos_token + chatml(THREE_TURNS, generation=False)
  if eos_ends_turns:
    whole = whole[:-1]  # the last reply ends in its EOS, appended by batching
  else:
    whole += tok.eos_token
  assert tok.decode(tokens[mask]) == whole
  replies = ["Blue.", "Red, then green.", "Yellow."]
  assert tok.decode(tokens[targets]) == "".join(r + end_of_turn for r in replies) + ("" if eos_ends_turns else tok.eos_token)
  # Each run of targets is one reply: three runs, split by the user turns.
  starts = np.flatnonzero(targets & ~np.concatenate([[False], targets[:-1]]))
  assert len(starts) == 3 and not targets[:starts[0]].any()
  # Without the spans (sft.assistant_turns='last') the last reply alone.
  last = batching.sft_batch(tok, [prompt], [completion], 256)
  assert (last["tokens"] == batch["tokens"]).all()
  assert tok.decode(last["tokens"][0][last["loss_mask"][0]]) == "Yellow." + end_of_turn + ("" if eos_ends_turns else tok.eos_token)


def test_a_cut_conversation_loses_its_first_turns_targets_with_them(chat):
  """A prompt cut from the left to fit keeps the targets of what is left, aligned with its tokens."""
  renderer, tok = chat
  sft = hub.sft_records(datasets.Dataset.from_list([{"messages": THREE_TURNS}]), renderer)
  row = sft[0]
  whole = batching.sft_batch(tok, [row["prompt"]], [row["completion"]], 400, reply_spans=[row["reply_spans"]])
  targets = whole["loss_mask"][0][whole["mask"][0]]
  first_reply_end = int(np.flatnonzero(targets)[0]) + int(np.argmin(targets[np.flatnonzero(targets)[0]:]))
  kept = len(targets) - first_reply_end - 1  # cut through the user turn after the first reply
  cut = batching.sft_batch(tok, [row["prompt"]], [row["completion"]], kept, reply_spans=[row["reply_spans"]])
  assert cut["mask"][0].all()
  assert (cut["tokens"][0] == whole["tokens"][0][-kept:]).all()
  assert (cut["loss_mask"][0] == whole["loss_mask"][0][-kept:]).all()
  assert not cut["loss_mask"][0][0] and targets[:-kept].any()  # the cut took the first reply's targets with it
  assert tok.decode(cut["tokens"][0][cut["loss_mask"][0]]).endswith("Yellow.<|im_end|>\n" + tok.eos_token)


def test_a_template_that_rewrites_earlier_turns_fails_naming_the_row_and_the_fix(chat):
  """A template that renders earlier replies unlike the last one (dropping their reasoning, as
  Qwen3's does) cannot have them trained in place: the error names the row and sft.assistant_turns."""
  _, tok = chat
  tok = copy.deepcopy(tok)
  tok.chat_template = ("{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and not loop.last %}"
                       "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}"
                       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
  turns = [dict(m) for m in THREE_TURNS]
  turns[2]["content"] = "<think>easy</think>Blue."
  with pytest.raises(ValueError, match=r"row 0: the chat template renders assistant message 2 differently .*"
                                       r"sft.assistant_turns='last'"):
    hub.sft_records(datasets.Dataset.from_list([{"messages": turns}]), hub.ChatTemplate(tok))
  turns[2]["content"] = "Blue."  # the same template, no reasoning to drop: the reply trains in place
  assert len(hub.sft_records(datasets.Dataset.from_list([{"messages": turns}]), hub.ChatTemplate(tok))[0]["reply_spans"]) == 2


def test_gsm8k_questions_keep_their_answers_beside_the_prompt(chat):
  """openai/gsm8k (subset main, hub layout main/{split}-*.parquet): the prompt cues the answer (or,
  with a chat template, the question is the user's turn); SFT completes it with the worked
  answer; the prompt records keep the other columns for a reward function."""
  source = os.path.join(DATA, "gsm8k")
  raw = hub.load_split(source, "train", data_dir="main")
  prompts = hub.load_prompts(source, "train", keep_columns=True, data_dir="main")
  assert prompts.column_names == ["prompt", "question", "answer"]
  assert prompts["prompt"] == [f"Question: {q}\nAnswer:" for q in raw["question"]]
  assert prompts["answer"] == raw["answer"] and prompts["question"] == raw["question"]
  assert hub.load_prompts(source, "train", data_dir="main").column_names == ["prompt"]
  sft = hub.load_sft(source, "train", data_dir="main")
  assert sft["completion"] == [" " + a for a in raw["answer"]]
  renderer, _ = chat
  chat_sft = hub.load_sft(source, "train", renderer, data_dir="main")
  asked = [[{"role": "user", "content": q}] for q in raw["question"]]
  assert chat_sft["prompt"] == [chatml(m) for m in asked]
  assert chat_sft["completion"] == [a + "<|im_end|>\n" for a in raw["answer"]]


# ----------------------------------------------------------------------------- batching

def test_left_pad_against_a_plain_reference():
  seqs = [[5, 6, 7], [], [9], [1, 2, 3, 4]]
  tokens, mask = batching.left_pad(seqs, 6, pad_id=0)
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (4, 6)
  for row, s in enumerate(seqs):
    assert tokens[row].tolist() == [0] * (6 - len(s)) + s
    assert mask[row].tolist() == [False] * (6 - len(s)) + [True] * len(s)
  assert batching.left_pad(seqs, None, pad_id=0)[0].shape == (4, 4)
  with pytest.raises(ValueError, match="row 3 has 4 tokens"):
    batching.left_pad(seqs, 3, pad_id=0)


def test_tokenize_prompts_truncates_and_pads_left(bpe_tok):
  texts = [r["prompt"] for r in read_jsonl(os.path.join(DATA, "tldr", "train.jsonl"))] + ["Hi"]
  full = bpe_tok(texts)["input_ids"]
  assert all(ids[0] == bpe_tok.bos_token_id for ids in full)
  P = 24
  for side, cut in (("right", lambda ids: ids[:P]), ("left", lambda ids: ids[-P:])):
    tokens, mask = batching.tokenize_prompts(bpe_tok, texts, P, truncate=side)
    assert tokens.shape == (len(texts), P)
    for row, ids in enumerate(full):
      assert tokens[row][mask[row]].tolist() == cut(ids)
  assert bpe_tok.pad_token_id is None and batching.pad_token_id(bpe_tok) == bpe_tok.eos_token_id
  assert tokens[-1][~mask[-1]].tolist() == [bpe_tok.eos_token_id] * int((~mask[-1]).sum())
  assert bpe_tok.decode(tokens[0][mask[0]]).endswith("TL;DR:")  # left truncation keeps the end


def test_sft_batch_masks_completion_and_eos(demo_tok, bpe_tok):
  rows = read_jsonl(os.path.join(DATA, "tldr", "train.jsonl"))
  prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
  L = 120
  batch = batching.sft_batch(bpe_tok, prompts, completions, max_len=L)
  eos = bpe_tok.eos_token_id
  for row, (p, c) in enumerate(zip(prompts, completions)):
    p_ids = bpe_tok(p)["input_ids"]
    c_ids = bpe_tok(c, add_special_tokens=False)["input_ids"] + [eos]
    budget = L - len(c_ids)
    assert batch["tokens"][row][batch["mask"][row]].tolist() == p_ids[-budget:] + c_ids
    assert batch["tokens"][row][batch["loss_mask"][row]].tolist() == c_ids
    assert batch["tokens"][row, -1] == eos
  assert (batch["loss_mask"] <= batch["mask"]).all()
  lengths = [len(bpe_tok(p)["input_ids"] + bpe_tok(c)["input_ids"]) for p, c in zip(prompts, completions)]
  assert min(lengths) < L < max(lengths)  # some rows padded, some truncated

  # A completion too long for the budget keeps one prompt token and loses its own end (and EOS).
  task = synthetic.make_demo_task(0, 4, 1)
  short = batching.sft_batch(demo_tok, task.sft_prompts[:2], ["1 2 3 4 5 6 7 8", "1"], max_len=5,
                             max_prompt_len=3)
  assert demo_tok.decode(short["tokens"][0][short["loss_mask"][0]]) == "1 2 3 4"
  assert short["mask"][0].sum() - short["loss_mask"][0].sum() == 1
  assert demo_tok.decode(short["tokens"][1][short["mask"][1]]) == task.sft_prompts[1].split(" ", 2)[2] + " 1 <eos>"


def test_packed_sft_rows_hold_every_example_once_as_its_own_row_would(bpe_tok):
  """sft.packing: each example is one segment of a packed row, with the tokens and targets
  `sft_batch` gives it alone; rows stay within L, segments count from 1 in order, and the
  examples take fewer rows than one to a row."""
  rows = read_jsonl(os.path.join(DATA, "tldr", "train.jsonl"))
  prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
  L = 240  # room for two or three examples a row
  packed = batching.pack_sft(bpe_tok, prompts, completions, L)
  alone = batching.sft_batch(bpe_tok, prompts, completions, L)
  expected = sorted((tuple(t[m]), tuple(lm[m])) for t, m, lm in zip(alone["tokens"], alone["mask"], alone["loss_mask"]))
  found = []
  for tokens, mask, targets, segments in zip(packed["tokens"], packed["mask"], packed["loss_mask"], packed["segments"]):
    np.testing.assert_array_equal(mask, segments > 0)
    ids = segments[mask]
    assert (np.diff(ids) >= 0).all() and ids[0] == 1 and (np.diff(np.unique(ids)) == 1).all()
    assert mask[-1] and not targets[~mask].any()  # left padded
    found += [(tuple(tokens[segments == s]), tuple(targets[segments == s])) for s in np.unique(ids)]
  assert sorted(found) == expected
  assert len(packed["tokens"]) < len(prompts) and packed["tokens"].shape[1] == L


def test_preference_batch_holds_each_prompt_once_before_both_responses(demo_tok):
  """The reward model's batch is laid out as RL scores it: the prompt left padded to
  max_prompt_len (cut as RL prompts are), the chosen and rejected responses right padded to
  max_new_tokens with EOS when it fits, the same prompt tokens for both."""
  prompts, chosen, rejected = ["sort 3 1 2 =", "copy 7 ="], ["1 2 3", "7"], ["3 2", "7 7 7 7 7 7"]
  cut_before = batching.RESPONSES_CUT["max_new_tokens"]
  batch = batching.preference_batch(demo_tok, prompts, chosen, rejected, max_prompt_len=6, max_new_tokens=5)
  assert batching.RESPONSES_CUT["max_new_tokens"] == cut_before + 1  # the 6-token response, counted
  assert batch["query"].shape == batch["query_mask"].shape == (2, 6)
  assert batch["response"].shape == batch["response_mask"].shape == (2, 2, 5)
  assert batch["query_mask"][:, -1].all()  # left padded: the last query slot is real
  for row, prompt in enumerate(prompts):
    assert demo_tok.decode(batch["query"][row][batch["query_mask"][row].astype(bool)]) == prompt
    for column, responses in enumerate((chosen, rejected)):
      tokens, mask = batch["response"][row, column], batch["response_mask"][row, column].astype(bool)
      assert mask[:mask.sum()].all()  # right padded
      expected = f"{responses[row]} <eos>" if len(responses[row].split()) < 5 else " ".join(responses[row].split()[:5])
      assert demo_tok.decode(tokens[mask]) == expected
  with pytest.raises(ValueError, match="2 prompts, 1 chosen"):
    batching.preference_batch(demo_tok, prompts, chosen[:1], rejected, max_prompt_len=6, max_new_tokens=5)


def test_reward_loss_is_bradley_terry_on_whole_rows(demo_tok):
  """supervised.reward_loss_fn runs each prompt once for its two responses; its loss and
  accuracy are the Bradley-Terry ones of the reward model read on each whole (prompt, response)
  row, computed here with NumPy."""
  import jax
  from p3o_jax import supervised
  from p3o_jax.models import decoder
  from p3o_jax.rl import sequences
  cfg = decoder.DecoderConfig(vocab_size=len(demo_tok), hidden_size=16, num_layers=2, num_heads=2,
                              intermediate_size=32, lm_head=False, scalar_head=True)
  graph, params = decoder.create(cfg, seed=3)
  prompts = ["sort 3 1 2 =", "copy 7 =", "sort 9 =", "copy 1 2 ="]
  chosen, rejected = ["1 2 3", "7", "9", "1 2"], ["3 2", "7 7 7", "", "2 1 1 2 2"]
  batch = batching.preference_batch(demo_tok, prompts, chosen, rejected, max_prompt_len=7, max_new_tokens=4)
  loss, metrics = supervised.reward_loss_fn(graph)(params, batch)
  scores = np.stack([np.asarray(sequences.sequence_scores(
      graph, params, np.concatenate([batch["query"], batch["response"][:, i]], 1),
      np.concatenate([batch["query_mask"], batch["response_mask"][:, i]], 1))) for i in (0, 1)], 1)
  margin = scores[:, 0] - scores[:, 1]
  np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-margin))), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["rm/accuracy"]), np.mean(margin > 0))
  grads = jax.grad(lambda p: supervised.reward_loss_fn(graph)(p, batch)[0])(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_tokenize_responses_right_pads_and_ends_in_eos(demo_tok):
  eos, pad = demo_tok.eos_token_id, batching.pad_token_id(demo_tok)
  texts = ["1 2 3", "4 5 6 7 8 9 1 2 3 4 5"]
  tokens, mask = batching.tokenize_responses(demo_tok, texts, 6)
  ids = [demo_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  assert len(ids[0]) < 6 <= len(ids[1])
  np.testing.assert_array_equal(tokens[0], ids[0] + [eos] + [pad] * (5 - len(ids[0])))
  np.testing.assert_array_equal(mask[0], [1] * (len(ids[0]) + 1) + [0] * (5 - len(ids[0])))
  np.testing.assert_array_equal(tokens[1], ids[1][:6])  # cut without EOS, like a sample out of tokens
  assert mask[1].all() and tokens.dtype == mask.dtype == np.int32


def test_epoch_iterator_resumes_exactly():
  n, bs, seed = 23, 5, 7  # 4 full batches per epoch, 3 rows dropped each epoch
  straight = batching.EpochIterator(n, bs, seed)
  first = [next(straight) for _ in range(6)]            # crosses an epoch boundary
  state = json.loads(json.dumps(straight.state()))      # survives a JSON round trip
  expected = [next(straight) for _ in range(9)]
  resumed = batching.EpochIterator(n, bs, seed).restore(state)
  np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(9)]), np.stack(expected))
  # Each epoch is one permutation from default_rng(seed + epoch), read in order.
  fresh = batching.EpochIterator(n, bs, seed)
  for epoch in range(3):
    got = np.concatenate([next(fresh) for _ in range(n // bs)])
    np.testing.assert_array_equal(got, np.random.default_rng(seed + epoch).permutation(n)[:n // bs * bs])
  assert not np.array_equal(first[0], first[4])
  with pytest.raises(ValueError, match="expected \\['epoch', 'position'\\]"):
    batching.EpochIterator(n, bs, seed).restore({"epoch": 0})
  with pytest.raises(ValueError, match="batch_size"):
    batching.EpochIterator(3, 5, 0)


def test_truncate_prompts_cuts_as_configured_counts_and_error_names_the_row(demo_tok, caplog):
  texts = ["sort 1 2 3 4 5 6 =", "sort 1 ="]
  full = demo_tok(texts)["input_ids"]
  batching.TRUNCATED.clear()
  with caplog.at_level("WARNING", logger="p3o_jax.data.batching"):
    tokens, mask = batching.tokenize_prompts(demo_tok, texts, 4, truncate="right")
    batching.tokenize_prompts(demo_tok, texts, 4, truncate="right")
  assert tokens[0][mask[0]].tolist() == full[0][:4] and tokens[1][mask[1]].tolist() == full[1]
  assert batching.TRUNCATED["right"] == 2  # counted every time, logged once
  assert caplog.text.count("cutting from the right (data.truncate_prompts='right')") == 1
  with pytest.raises(ValueError, match=r"prompt of batch row 0 \('sort 1 2 3 4 5 6 ='\) has \d+ tokens.*'error'"):
    batching.tokenize_prompts(demo_tok, texts, 4, truncate="error")
  with pytest.raises(ValueError, match=r"prompt of batch row 1 .*room left beside its response"):
    batching.sft_batch(demo_tok, texts[::-1], ["1", "1 2 3 4 5 6"], max_len=8, truncate="error")
  assert batching.sft_batch(demo_tok, texts[::-1], ["1", "1 2 3 4 5 6"], max_len=8, truncate="left")["mask"].all(-1)[1]


def test_empty_data_file_and_empty_prompt_are_named(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match=f"data file {empty} is empty"):
    hub.load_prompts(str(empty), "train")
  rows = tmp_path / "rows.jsonl"
  rows.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a", "completion": "b"},
                                                     {"prompt": "  ", "completion": "c"}]) + "\n")
  with pytest.raises(ValueError, match=rf"{rows} \(split 'train'\): row 1: the prompt is empty"):
    hub.load_sft(str(rows), "train")


def test_learned_positions_past_the_table_fail_in_sft():
  """A learned-position model cannot embed positions past max_position_embeddings: the SFT
  stage refuses before training (RL's sampler has the same check)."""
  from configs import demo
  from p3o_jax import pipeline
  c = demo.get_config("runlocal")
  c.model.arch.position, c.model.arch.max_position_embeddings = "learned", 16  # 8 + 10 tokens needed
  c.mesh.data = 1
  tok = synthetic.build_tokenizer()
  task = pipeline.Task(tok, ["sort 1 ="] * 16, ["1"] * 16, [], [])
  with pytest.raises(ValueError, match=r"sft: sequences of 18 tokens .* exceed the model's 16 learned positions"):
    pipeline.run_sft(c, "/nonexistent/never-written", task)
  assert not os.path.exists("/nonexistent/never-written")


def test_learned_positions_past_the_table_fail_for_the_reward_model(monkeypatch):
  from configs import demo
  from p3o_jax import pipeline
  from p3o_jax.models import decoder
  c = demo.get_config("runlocal")
  cfg = decoder.DecoderConfig(vocab_size=17, hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
                              position="learned", max_position_embeddings=16)
  from p3o_jax.models import hf
  monkeypatch.setattr(hf, "load", lambda *a, **k: (cfg, None, None))
  with pytest.raises(ValueError, match=r"reward model /x/rm/hf: sequences of 18 tokens .* 16 learned positions"):
    pipeline.reward_source(c, "/x", synthetic.build_tokenizer())
