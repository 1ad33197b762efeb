"""Read the TL;DR and HH datasets as they are on the hub (or local copies) into uniform records.

    ds = load_split("trl-lib/tldr", "train")             # hub id, offline cache, or local path
    sft = sft_records(ds)                                 # Dataset{prompt, completion}
    prefs = preference_records(load_split("Anthropic/hh-rlhf", "test"))  # {prompt, chosen, rejected}
    prompts = prompt_records(ds)                          # Dataset{prompt}

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

* CarperAI's labels do not start with a space while the prompt ends in "TL;DR:"; a space is
  added where neither side has one, so that a BPE tokenizer sees the usual " word" tokens when
  prompt and completion are tokenized apart (as `batching.sft_batch` does).

Unpaired preferences, a response at a time labelled desirable or not, train KTO alone
(`rl.algo=kto`); the reward model and the other offline algorithms need pairs.

Anthropic/hh-rlhf has no prompt column: the prompt is the shared prefix of `chosen` and
`rejected` up to and including its last "\\n\\nAssistant:"; the responses are what follows.
A prompt given as a list of chat messages needs a chat template and is refused with an error;
render such datasets to text first.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import datasets

log = logging.getLogger(__name__)

ASSISTANT_TURN = "\n\nAssistant:"
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SFT_SCHEMAS = ("{prompt, completion} (trl-lib/tldr)", "{prompt, label} (CarperAI/openai_summarize_tldr)",
                "{prompt, chosen, rejected} (use chosen)", "{chosen, rejected} (Anthropic/hh-rlhf)")
_PREF_SCHEMAS = ("{prompt, chosen, rejected} (trl-lib/tldr-preference, Dahoas/rm-static)",
                 "{chosen, rejected} (Anthropic/hh-rlhf)", "{prompt, completion, label} (unpaired, KTO's)")
_PROMPT_SCHEMAS = ("{prompt, ...}", "{chosen, rejected} (Anthropic/hh-rlhf)")


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
    return datasets.load_dataset(_LOCAL_FORMATS[ext], data_files={split: source}, split=split, **kwargs)
  if os.path.isdir(source) and os.path.exists(os.path.join(source, "state.json")):
    return datasets.load_from_disk(source)
  if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
    return datasets.load_from_disk(source)[split]
  return datasets.load_dataset(source, split=split, **kwargs)


def _schema_error(kind: str, columns, expected) -> ValueError:
  return ValueError(f"unknown {kind} schema: columns found {sorted(columns)}; expected one of "
                    + "; ".join(expected))


def _text(value: Any, column: str) -> str:
  """A response as text: a string, or the content of the last assistant message of a chat list."""
  if isinstance(value, str):
    return value
  if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
    replies = [m["content"] for m in value if m.get("role") == "assistant"]
    if replies:
      return replies[-1]
  raise ValueError(f"column {column!r} holds {type(value).__name__} {str(value)[:80]!r}; expected a "
                   "string or a list of chat messages ending with an assistant turn")


def _prompt_text(value: Any) -> str:
  if isinstance(value, str):
    return value
  raise ValueError(f"prompt is {type(value).__name__} {str(value)[:80]!r}; conversational prompts need "
                   "a chat template: render them to text before loading")


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


def sft_records(ds: datasets.Dataset) -> datasets.Dataset:
  """Dataset{prompt, completion} from any supported SFT or preference schema (see module table)."""
  cols = set(ds.column_names)
  if {"prompt", "completion", "label"} <= cols and getattr(ds.features["label"], "dtype", None) == "bool":
    kept = ds.filter(lambda r: r["label"])  # unpaired preferences: SFT on the desirable responses alone
    log.info("SFT on %d desirable of %d labelled responses", len(kept), len(ds))
    ds = kept
  if {"prompt", "completion"} <= cols:
    fn = lambda r: {"prompt": _prompt_text(r["prompt"]), "completion": _text(r["completion"], "completion")}
  elif {"prompt", "label"} <= cols:
    fn = lambda r: {"prompt": r["prompt"], "completion": _join_space(r["prompt"], r["label"])}
  elif {"prompt", "chosen", "rejected"} <= cols:
    fn = lambda r: {"prompt": _prompt_text(r["prompt"]), "completion": _text(r["chosen"], "chosen")}
  elif {"chosen", "rejected"} <= cols:
    fn = lambda r: dict(zip(("prompt", "completion"), split_transcripts(r["chosen"], r["rejected"])[:2]))
  else:
    raise _schema_error("SFT", cols, _SFT_SCHEMAS)
  return _convert(ds, fn, ["prompt", "completion"])


def preference_records(ds: datasets.Dataset) -> datasets.Dataset:
  """Dataset{prompt, chosen, rejected} (texts; chosen is the preferred response), or of an unpaired
  dataset Dataset{prompt, completion, label} (label True: a desirable response)."""
  cols = set(ds.column_names)
  if {"prompt", "completion", "label"} <= cols:
    fn = lambda r: {"prompt": _prompt_text(r["prompt"]), "completion": _text(r["completion"], "completion"),
                    "label": _label(r["label"])}
    return _convert(ds, fn, ["prompt", "completion", "label"])
  if {"prompt", "chosen", "rejected"} <= cols:
    fn = lambda r: {"prompt": _prompt_text(r["prompt"]), "chosen": _text(r["chosen"], "chosen"),
                    "rejected": _text(r["rejected"], "rejected")}
  elif {"chosen", "rejected"} <= cols:
    fn = lambda r: dict(zip(("prompt", "chosen", "rejected"), split_transcripts(r["chosen"], r["rejected"])))
  else:
    raise _schema_error("preference", cols, _PREF_SCHEMAS)
  return _convert(ds, fn, ["prompt", "chosen", "rejected"])


def prompt_records(ds: datasets.Dataset) -> datasets.Dataset:
  """Dataset{prompt} for RL rollouts and evaluation."""
  cols = set(ds.column_names)
  if "prompt" in cols:
    fn = lambda r: {"prompt": _prompt_text(r["prompt"])}
  elif {"chosen", "rejected"} <= cols:
    fn = lambda r: {"prompt": split_transcripts(r["chosen"], r["rejected"])[0]}
  else:
    raise _schema_error("prompt", cols, _PROMPT_SCHEMAS)
  return _convert(ds, fn, ["prompt"])


def _load(records, source: str, split: str, **kwargs) -> datasets.Dataset:
  """`records(load_split(...))`; an empty split and every row error name the source and split."""
  ds = load_split(source, split, **kwargs)
  if len(ds) == 0:
    raise ValueError(f"{source} (split {split!r}) has no rows")
  try:
    return records(ds)
  except ValueError as e:
    raise ValueError(f"{source} (split {split!r}): {e}") from None


def load_sft(source: str, split: str, **kwargs) -> datasets.Dataset:
  return _load(sft_records, source, split, **kwargs)


def load_preferences(source: str, split: str, **kwargs) -> datasets.Dataset:
  return _load(preference_records, source, split, **kwargs)


def load_prompts(source: str, split: str, **kwargs) -> datasets.Dataset:
  return _load(prompt_records, source, split, **kwargs)
