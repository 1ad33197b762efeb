"""Read the TL;DR, HH and chat datasets as they are on the hub (or local copies) into uniform records.

    ds = load_split("trl-lib/tldr", "train")             # hub id, offline cache, or local path
    sft = sft_records(ds)                                 # Dataset{prompt, completion}
    prefs = preference_records(load_split("Anthropic/hh-rlhf", "test"))  # {prompt, chosen, rejected}
    prompts = prompt_records(ds)                          # Dataset{prompt}
    chat = ChatTemplate(tokenizer)                        # conversational rows as the tokenizer renders them
    prefs = load_preferences("trl-lib/ultrafeedback_binarized", "train", chat)

Extra keyword arguments go to `datasets.load_dataset`, e.g. `data_dir="helpful-base"` for one
subset of Anthropic/hh-rlhf.

Supported schemas (detected from the column names; extra columns are dropped):

| source                             | columns                            | SFT completion | prefs |
|------------------------------------|------------------------------------|----------------|-------|
| trl-lib/tldr                       | prompt, completion                 | completion     | -     |
| CarperAI/openai_summarize_tldr     | prompt, label                      | " " + label *  | -     |
| trl-lib/tldr-preference,           | prompt, chosen, rejected (strings) | chosen         | yes   |
|  CarperAI/openai_summarize_comparisons                                                           |
| trl-internal-testing/tldr-preference-trl-style | prompt (string), chosen/rejected as message lists; the last assistant message is the response |
| Dahoas/rm-static                   | prompt, response, chosen, rejected | chosen         | yes   |
| Anthropic/hh-rlhf                  | chosen, rejected (full transcripts)| chosen         | yes   |
| unpaired (TRL's KTO format)        | prompt, completion, label (bool)   | desirable ones | KTO   |
| openai/gsm8k (questions, answers)  | question, answer ("... #### 42")   | " " + answer   | -     |
| conversational, e.g. trl-lib/ultrafeedback_binarized (chosen, rejected message lists), trl-lib/Capybara (messages), |
|  trl-lib/kto-mix-14k (prompt, completion message lists, label): rendered with the chat template, see below        |

* CarperAI's labels do not start with a space while the prompt ends in "TL;DR:"; a space is
  added where neither side has one, so that a BPE tokenizer sees the usual " word" tokens when
  prompt and completion are tokenized apart (as `batching.sft_batch` does).

Unpaired preferences, a response at a time labelled desirable or not, train KTO alone
(`rl.algo=kto`); the reward model and the other offline algorithms need pairs.

A question-answer dataset's prompt is "Question: <question>\nAnswer:", or with a chat template
the question as the user's turn (`_question`).
RL prompts can keep their dataset's other columns (`keep_columns`), which a Python reward
function gets beside the texts (`rl.rollout.TextReward`): GSM8K's answer for its correctness.

Anthropic/hh-rlhf has no prompt column: the prompt is the shared prefix of `chosen` and
`rejected` up to and including its last "\\n\\nAssistant:"; the responses are what follows.
Conversational rows (TRL's conversational format: lists of {role, content} messages) are
rendered to text with the tokenizer's chat template (`ChatTemplate`, the pipeline's
data.chat_template), as TRL's `maybe_apply_chat_template` does: the prompt ends with the
template's generation prompt (the assistant header), and a response is what rendering the
prompt's messages followed by the reply adds after the prompt (its end-of-turn marker
included). Where the prompt is implicit (chosen and rejected hold whole conversations), it is
their shared leading messages; in a `messages` column it is every message before the last
assistant turn, which is the completion. An SFT record also says where the prompt's own earlier
assistant replies lie in its text (`reply_spans`), so that SFT trains on every assistant turn of
a multi-turn conversation, as TRL's assistant-only loss does, without the template having to mark
them. Without a chat template a conversational prompt is
refused with an error naming the row. A prompt given as text keeps responses given as message
lists to the last assistant message's content (trl-internal-testing/tldr-preference-trl-style).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import datasets

log = logging.getLogger(__name__)

ASSISTANT_TURN = "\n\nAssistant:"
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SFT_SCHEMAS = ("{prompt, completion} (trl-lib/tldr)", "{question, answer} (openai/gsm8k)",
                "{prompt, label} (CarperAI/openai_summarize_tldr)",
                "{prompt, chosen, rejected} (use chosen)", "{chosen, rejected} (Anthropic/hh-rlhf)",
                "{messages} (conversational)")
_PREF_SCHEMAS = ("{prompt, chosen, rejected} (trl-lib/tldr-preference, Dahoas/rm-static)",
                 "{chosen, rejected} (Anthropic/hh-rlhf)", "{prompt, completion, label} (unpaired, KTO's)")
_PROMPT_SCHEMAS = ("{prompt, ...}", "{question, answer} (openai/gsm8k)", "{chosen, rejected} (Anthropic/hh-rlhf)",
                   "{messages} (conversational)")


def load_split(source: str, split: str, **kwargs) -> datasets.Dataset:
  """One split of a dataset, from a hub id, a local data file, or a local directory.

  A file (.jsonl/.json/.parquet/.csv/.arrow) is read as that split. A directory written by
  `Dataset.save_to_disk` is loaded from disk; any other directory is handed to
  `datasets.load_dataset`, which finds splits by file name (train.jsonl, data/test-*.parquet, ...)
  just as it does in a hub repository. Anything else is a hub id (cached copies work offline).
  """
  if os.path.isfile(source):
    ext = next((e for e in _LOCAL_FORMATS if source.endswith(e)), None)
    if ext is None:
      raise ValueError(f"cannot read {source!r}: expected a file ending in one of {sorted(_LOCAL_FORMATS)}")
    if os.path.getsize(source) == 0:
      raise ValueError(f"data file {source} is empty")
    kwargs.pop("data_dir", None)  # a file is its own subset
    return datasets.load_dataset(_LOCAL_FORMATS[ext], data_files={split: source}, split=split, **kwargs)
  if os.path.isdir(source) and os.path.exists(os.path.join(source, "state.json")):
    return datasets.load_from_disk(source)
  if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
    return datasets.load_from_disk(source)[split]
  return datasets.load_dataset(source, split=split, **kwargs)


def _schema_error(kind: str, columns, expected) -> ValueError:
  return ValueError(f"unknown {kind} schema: columns found {sorted(columns)}; expected one of "
                    + "; ".join(expected))


class ChatTemplate:
  """Chat messages as text, rendered with `tokenizer`'s chat template.

  A prompt ends with the generation prompt (or continues its last message when that is the
  assistant's, a prefill); a reply is the text that rendering prompt + reply adds after the
  rendered prompt. `batching` adds the special tokens both ends need, so they are not doubled:
  a leading BOS the template writes is dropped when the tokenizer adds one itself, and a reply
  that ends with the EOS token (a chat model's end of turn, Qwen's <|im_end|>, Llama 3's
  <|eot_id|>) loses it and what follows, since EOS is appended to every response; the training
  replies then end exactly as the sampler's, which stop at EOS.
  """

  def __init__(self, tokenizer):
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError(f"{type(tokenizer).__name__} has no chat template")
    self._tokenizer = tokenizer
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer.bos_token_id in tokenizer("x")["input_ids"][:1]
    self._bos_to_drop = bos if adds_bos else None
    self._eos = tokenizer.eos_token

  def _render(self, messages: list, generation: bool) -> str:
    prefill = bool(messages) and messages[-1]["role"] == "assistant"
    return self._tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation and not prefill,
        continue_final_message=generation and prefill)

  def render(self, prompt: list, replies: Sequence[list] = ()) -> tuple[str, list[str]]:
    """(prompt text, reply texts): the prompt rendered once, each reply cut from the rendering of
    the prompt followed by it."""
    head = self._render(prompt, generation=True)
    texts = []
    for reply in replies:
      whole = self._render(prompt + reply, generation=False)
      if not whole.startswith(head):
        raise ValueError("the chat template renders the prompt followed by the reply with a different "
                         f"beginning than the prompt alone ({head[-40:]!r} against "
                         f"{whole[len(head) - 40:len(head)]!r}), so the reply cannot be cut from it")
      text = whole[len(head):]
      if self._eos and text.rstrip().endswith(self._eos):
        text = text.rstrip()[:-len(self._eos)]
      texts.append(text)
    return self._without_bos(head), texts

  def _without_bos(self, text: str) -> str:
    return text[len(self._bos_to_drop):] if self._bos_to_drop and text.startswith(self._bos_to_drop) else text

  def reply_spans(self, prompt: list, text: str | None = None) -> list[list[int]]:
    """[start, end) character ranges, in the rendered prompt `text` (`render(prompt)[0]`, rendered
    here unless given), of the prompt's own assistant replies: what SFT on every assistant turn
    trains on besides the completion. A range ends with the reply's end-of-turn EOS when it has one
    (what follows it opens the next turn), like a completion, whose EOS batching appends; a final
    assistant message (a prefill) is not a reply."""
    turns = [i for i in range(1, len(prompt) - 1) if prompt[i]["role"] == "assistant"]
    if not turns:
      return []
    text = self.render(prompt)[0] if text is None else text
    spans = []
    for i in turns:
      before = self._without_bos(self._render(prompt[:i], generation=True))
      through = self._without_bos(self._render(prompt[:i + 1], generation=False))
      if not (through.startswith(before) and text.startswith(through)):
        raise ValueError(f"the chat template renders assistant message {i} differently inside the conversation "
                         "than at its end (as templates that drop earlier turns' reasoning do), so that reply "
                         "cannot be trained on in place; sft.assistant_turns='last' trains on the last one only")
      eos_at = through.rfind(self._eos, len(before)) if self._eos else -1
      spans.append([len(before), eos_at + len(self._eos) if eos_at >= 0 else len(through)])
    return spans


def _messages(value: Any, column: str) -> list | None:
  """`value` as a list of {role, content} messages, or None when it is text."""
  if isinstance(value, str):
    return None
  if (isinstance(value, list) and value
      and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value)):
    return [dict(m) for m in value]
  raise ValueError(f"column {column!r} holds {type(value).__name__} {str(value)[:80]!r}; expected a "
                   "string or a non-empty list of chat messages with role and content")


def _needs_template(column: str) -> ValueError:
  return ValueError(f"column {column!r} holds chat messages and the tokenizer has no chat template: set "
                    "data.chat_template (a Jinja template, or a file holding one)")


def _reply_text(value: Any, column: str) -> str:
  """A response after a text prompt: a string, or the content of a chat list's last assistant message."""
  messages = _messages(value, column)
  if messages is None:
    return value
  replies = [m["content"] for m in messages if m["role"] == "assistant"]
  if not replies:
    raise ValueError(f"column {column!r} holds chat messages without an assistant turn")
  return replies[-1]


def _rendered(prompt: Any, replies: dict, column: str, chat: ChatTemplate | None, spans: bool = False) -> dict:
  """{'prompt': text, **replies as texts}. A text prompt stays as it is, its replies text (`_reply_text`);
  a conversational one (read from `column`) and its conversational replies are rendered by `chat`, the
  prompt once for all of them; a reply given as text stays text. spans: also 'reply_spans', where the
  prompt's own assistant replies lie in its text (`ChatTemplate.reply_spans`; none in a text prompt)."""
  messages = _messages(prompt, column)
  if messages is None:
    out = {"prompt": prompt, **{name: _reply_text(value, name) for name, value in replies.items()}}
    return out | ({"reply_spans": []} if spans else {})
  if chat is None:
    raise _needs_template(column)
  conversational = {name: m for name, value in replies.items() if (m := _messages(value, name)) is not None}
  text, rendered = chat.render(messages, list(conversational.values()))
  out = {"prompt": text, **replies, **dict(zip(conversational, rendered))}
  return out | ({"reply_spans": chat.reply_spans(messages, text)} if spans else {})


def split_conversations(chosen: list, rejected: list) -> tuple[list, list, list]:
  """(prompt, chosen, rejected) messages of two conversations that share their first messages;
  the prompt stops before the assistant turn where they part (or the last one, when equal)."""
  shared = 0
  while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
    shared += 1
  while shared and chosen[shared - 1]["role"] == "assistant" and (shared == len(chosen) or shared == len(rejected)):
    shared -= 1  # identical replies: the last assistant turns are the responses
  if not shared or shared == len(chosen) or shared == len(rejected):
    raise ValueError("chosen and rejected share no leading messages before an assistant reply, so "
                     "they have no prompt")
  return chosen[:shared], chosen[shared:], rejected[shared:]


def _last_turn(value: Any) -> tuple[list, dict]:
  """(prompt, {completion: reply}): a `messages` conversation cut before its last assistant message."""
  messages = _messages(value, "messages") or []
  last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
  if last == 0:
    raise ValueError("column 'messages' needs an assistant message after at least one other")
  return messages[:last], {"completion": messages[last:]}


def _question(row: dict, chat: ChatTemplate | None) -> tuple[Any, dict]:
  """(prompt, {completion}) of a question-answer row (openai/gsm8k): with a chat template the
  question is the user's turn and the answer the assistant's; without one the prompt is the
  question, then a cue for its answer."""
  question, answer = row["question"], row["answer"]
  if not isinstance(question, str) or not isinstance(answer, str):
    raise ValueError(f"question and answer must be strings, got {type(question).__name__} and {type(answer).__name__}")
  if chat is None:
    return f"Question: {question}\nAnswer:", {"completion": " " + answer}
  return [{"role": "user", "content": question}], {"completion": [{"role": "assistant", "content": answer}]}


def _label(value: Any) -> bool:
  """An unpaired preference's label: True (desirable) or False; 0 and 1 are read as those."""
  if isinstance(value, bool) or value in (0, 1):
    return bool(value)
  raise ValueError(f"label is {type(value).__name__} {str(value)[:80]!r}; expected true (a desirable "
                   "response) or false")


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen, rejected) from two HH transcripts that share the conversation so far."""
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(ASSISTANT_TURN)
  if cut < 0:
    raise ValueError(f"no shared {ASSISTANT_TURN!r} turn in transcripts starting {chosen[:60]!r}")
  cut += len(ASSISTANT_TURN)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def _join_space(prompt: str, completion: str) -> str:
  if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
    return " " + completion
  return completion


def _convert(ds: datasets.Dataset, fn, columns: list[str]) -> datasets.Dataset:
  """Map rows with `fn(row, index) -> dict`; errors name the row; only `columns` are kept."""
  def wrapped(row, index):
    try:
      out = fn(row)
      if "prompt" in out and not str(out["prompt"]).strip():
        raise ValueError("the prompt is empty; a response needs a prompt token to follow")
      return out
    except ValueError as e:
      raise ValueError(f"row {index}: {e}") from None
  out = ds.map(wrapped, with_indices=True, remove_columns=[c for c in ds.column_names if c not in columns])
  return out.select_columns(columns)


def _pair(row: dict, chat: ChatTemplate | None) -> tuple[Any, dict, str]:
  """(prompt, {chosen, rejected}, the prompt's column) of a preference row. Two whole conversations
  (HH transcripts or message lists) are split where they part; as in TRL, a text prompt beside
  chosen and rejected conversations is implicit in them when there is a chat template to render
  them with."""
  prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
  if prompt is not None and not (chat is not None and isinstance(prompt, str) and not isinstance(chosen, str)):
    return prompt, {"chosen": chosen, "rejected": rejected}, "prompt"
  chosen_messages, rejected_messages = _messages(chosen, "chosen"), _messages(rejected, "rejected")
  if chosen_messages is None or rejected_messages is None:
    prompt, chosen, rejected = split_transcripts(chosen, rejected)
  else:
    prompt, chosen, rejected = split_conversations(chosen_messages, rejected_messages)
  return prompt, {"chosen": chosen, "rejected": rejected}, "chosen"


_SPANS = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))


def sft_records(ds: datasets.Dataset, chat: ChatTemplate | None = None) -> datasets.Dataset:
  """Dataset{prompt, completion, reply_spans} from any supported SFT or preference schema (see module
  table); `chat` renders conversational rows. reply_spans: [start, end) character ranges of the
  prompt's own assistant replies (a multi-turn conversation's earlier turns, which SFT trains on
  beside the completion under sft.assistant_turns='all'); empty for text rows."""
  cols = set(ds.column_names)
  if {"prompt", "completion", "label"} <= cols and getattr(ds.features["label"], "dtype", None) == "bool":
    kept = ds.filter(lambda r: r["label"])  # unpaired preferences: SFT on the desirable responses alone
    log.info("SFT on %d desirable of %d labelled responses", len(kept), len(ds))
    ds = kept
  if {"prompt", "completion"} <= cols:
    fn = lambda r: _rendered(r["prompt"], {"completion": r["completion"]}, "prompt", chat, spans=True)
  elif {"question", "answer"} <= cols:
    fn = lambda r: _rendered(*_question(r, chat), "prompt", chat, spans=True)
  elif {"prompt", "label"} <= cols:
    fn = lambda r: {"prompt": r["prompt"], "completion": _join_space(r["prompt"], r["label"]), "reply_spans": []}
  elif {"chosen", "rejected"} <= cols:
    def fn(r):
      prompt, replies, column = _pair(r, chat)
      pair = _rendered(prompt, {"chosen": replies["chosen"]}, column, chat, spans=True)  # errors name chosen
      return {"prompt": pair["prompt"], "completion": pair["chosen"], "reply_spans": pair["reply_spans"]}
  elif "messages" in cols:
    fn = lambda r: _rendered(*_last_turn(r["messages"]), "messages", chat, spans=True)
  else:
    raise _schema_error("SFT", cols, _SFT_SCHEMAS)
  return _convert(ds, fn, ["prompt", "completion", "reply_spans"]).cast_column("reply_spans", _SPANS)


def preference_records(ds: datasets.Dataset, chat: ChatTemplate | None = None) -> datasets.Dataset:
  """Dataset{prompt, chosen, rejected} (texts; chosen is the preferred response), or of an unpaired
  dataset Dataset{prompt, completion, label} (label True: a desirable response); `chat` renders
  conversational rows."""
  cols = set(ds.column_names)
  if {"prompt", "completion", "label"} <= cols:
    fn = lambda r: _rendered(r["prompt"], {"completion": r["completion"]}, "prompt", chat) | {"label": _label(r["label"])}
    return _convert(ds, fn, ["prompt", "completion", "label"])
  if {"chosen", "rejected"} <= cols:
    fn = lambda r: _rendered(*_pair(r, chat), chat)
  else:
    raise _schema_error("preference", cols, _PREF_SCHEMAS)
  return _convert(ds, fn, ["prompt", "chosen", "rejected"])


def prompt_records(ds: datasets.Dataset, chat: ChatTemplate | None = None,
                   keep_columns: bool = False) -> datasets.Dataset:
  """Dataset{prompt} for RL rollouts and evaluation; `chat` renders conversational prompts.
  keep_columns: the dataset's other columns stay beside the prompt, as they are (what a Python
  reward reads, e.g. a math problem's answer)."""
  cols = set(ds.column_names)
  if {"question", "answer"} <= cols:
    fn = lambda r: _rendered(_question(r, chat)[0], {}, "prompt", chat)
  elif {"chosen", "rejected"} <= cols:  # the prompt the pair's responses answer (the responses not rendered)
    def fn(r):
      prompt, _, column = _pair(r, chat)
      return _rendered(prompt, {}, column, chat)
  elif "prompt" in cols:
    fn = lambda r: _rendered(r["prompt"], {}, "prompt", chat)
  elif "messages" in cols:
    fn = lambda r: _rendered(_last_turn(r["messages"])[0], {}, "messages", chat)
  else:
    raise _schema_error("prompt", cols, _PROMPT_SCHEMAS)
  return _convert(ds, fn, ["prompt"] + ([c for c in ds.column_names if c != "prompt"] if keep_columns else []))


def _load(records, source: str, split: str, chat: ChatTemplate | None, **kwargs) -> datasets.Dataset:
  """`records(load_split(...), chat)`; an empty split and every row error name the source and split."""
  ds = load_split(source, split, **kwargs)
  if len(ds) == 0:
    raise ValueError(f"{source} (split {split!r}) has no rows")
  try:
    return records(ds, chat)
  except ValueError as e:
    raise ValueError(f"{source} (split {split!r}): {e}") from None


def load_sft(source: str, split: str, chat: ChatTemplate | None = None, **kwargs) -> datasets.Dataset:
  return _load(sft_records, source, split, chat, **kwargs)


def load_preferences(source: str, split: str, chat: ChatTemplate | None = None, **kwargs) -> datasets.Dataset:
  return _load(preference_records, source, split, chat, **kwargs)


def load_prompts(source: str, split: str, chat: ChatTemplate | None = None, keep_columns: bool = False,
                 **kwargs) -> datasets.Dataset:
  return _load(functools.partial(prompt_records, keep_columns=keep_columns), source, split, chat, **kwargs)
