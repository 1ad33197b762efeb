"""Text -> padded numpy batches, and an epoch iterator whose position can be saved and restored.

Shape letters: B rows, P prompt length, L sequence length.

Everything is LEFT padded, so for every row the last column holds the last real token: the
sampler continues from there, and the reward model reads its score at position -1
(`Decoder.scalar(hidden)[:, -1]`). Masks carry the truth; pad ids are never used to find
padding (the pad id may equal EOS). Positions come from the mask
(`decoder.positions_from_mask`).

Prompts and responses are tokenized separately and concatenated as ids, so the boundary between
them is exact: prompts with the tokenizer's special tokens (a Llama BOS), responses without, then
`eos_token_id` appended to each response.

Truncation (data.truncate_prompts), when a prompt is longer than P or prompt + response + EOS
does not fit in L: 'left' drops the prompt's start (the end of a TL;DR post or the last HH
turns stay), 'right' its end, never below one token; 'error' refuses the row. Every cut is
counted in `TRUNCATED` (the first one is logged, main prints the count). A response longer
than what is left loses its end, EOS included (such a row teaches no stopping); those cut to
sampler.max_new_tokens (`tokenize_responses`: preference pairs, reference responses) are counted
in `RESPONSES_CUT` the same way.
"""

from __future__ import annotations

import bisect
import collections
import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

TRUNCATE_MODES = ("left", "right", "error")
TRUNCATED: collections.Counter = collections.Counter()  # prompts cut, by mode (this process)
RESPONSES_CUT: collections.Counter = collections.Counter()  # responses cut to max_new_tokens (this process)


def _cut_prompt(ids: list[int], budget: int, truncate: str, text: str, row: int, why: str) -> list[int]:
  """`ids` cut to `budget` tokens as data.truncate_prompts says; counted, the first one logged."""
  if len(ids) <= budget:
    return ids
  if truncate not in TRUNCATE_MODES:
    raise ValueError(f"data.truncate_prompts must be one of {TRUNCATE_MODES}, got {truncate!r}")
  if truncate == "error":
    raise ValueError(f"prompt of batch row {row} ({text[:60]!r}) has {len(ids)} tokens, {why} {budget}; "
                     "data.truncate_prompts='error' refuses to cut it (use 'left' or 'right', or raise the limit)")
  if not TRUNCATED[truncate]:
    log.warning("prompt of batch row %d has %d tokens, %s %d: cutting from the %s (data.truncate_prompts=%r); "
                "further cuts are counted", row, len(ids), why, budget, truncate, truncate)
  TRUNCATED[truncate] += 1
  return ids[-budget:] if truncate == "left" else ids[:budget]


def check_positions(model_cfg, length: int, what: str) -> None:
  """Sequences of `length` tokens must fit the model: a learned-position model has no position past
  max_position_embeddings - 1 (an index past it would silently read a clamped row), and a model
  trained with a sliding window (Mistral) is run here with full causal attention, which is the
  same function only while every key is inside the window."""
  if getattr(model_cfg, "position", None) == "learned" and length > model_cfg.max_position_embeddings:
    raise ValueError(f"{what}: sequences of {length} tokens (data.max_prompt_len + sampler.max_new_tokens) exceed "
                     f"the model's {model_cfg.max_position_embeddings} learned positions (max_position_embeddings)")
  window = getattr(model_cfg, "sliding_window", None)
  if window is not None and length > window:
    raise ValueError(f"{what}: sequences of {length} tokens (data.max_prompt_len + sampler.max_new_tokens) exceed "
                     f"the model's sliding window of {window} (sliding_window in its config.json); this decoder "
                     "attends over every earlier token, which is the window's attention only up to its length")


def pad_token_id(tokenizer) -> int:
  """The id used to fill padding: pad, or EOS for tokenizers without one (GPT-2, Pythia)."""
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad is None:
    raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token")
  return int(pad)


def _eos_id(tokenizer) -> int:
  if tokenizer.eos_token_id is None:
    raise ValueError(f"{type(tokenizer).__name__} has no EOS token; responses must end with one")
  return int(tokenizer.eos_token_id)


def _ids(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
  if isinstance(texts, str):
    raise TypeError("expected a list of texts, got a single string")
  if not len(texts):
    return []
  return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def left_pad(seqs: Sequence[Sequence[int]], length: int | None, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [B, L], mask bool [B, L]), each sequence right-aligned; L = longest if None."""
  longest = max((len(s) for s in seqs), default=0)
  length = longest if length is None else length
  if longest > length:
    row = next(i for i, s in enumerate(seqs) if len(s) > length)
    raise ValueError(f"row {row} has {len(seqs[row])} tokens, more than the padded length {length}")
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s):
      tokens[i, length - len(s):] = s
      mask[i, length - len(s):] = True
  return tokens, mask


def tokenize_prompts(tokenizer, texts: Sequence[str], max_prompt_len: int,
                     truncate: str = "left") -> tuple[np.ndarray, np.ndarray]:
  """Prompts as (tokens int32 [B, P], mask bool [B, P]), P = max_prompt_len, left padded.

  truncate (data.truncate_prompts): 'left' drops the start of a long prompt (keeps "TL;DR:" /
  the last turn), 'right' its end, 'error' raises naming the row.
  """
  if truncate not in TRUNCATE_MODES:
    raise ValueError(f"data.truncate_prompts must be one of {TRUNCATE_MODES}, got {truncate!r}")
  ids = _ids(tokenizer, texts, add_special_tokens=True)
  for i, row in enumerate(ids):
    if not row:
      raise ValueError(f"prompt {i} ({texts[i][:40]!r}) has no tokens")
  ids = [_cut_prompt(row, max_prompt_len, truncate, texts[i], i, "more than data.max_prompt_len =")
         for i, row in enumerate(ids)]
  return left_pad(ids, max_prompt_len, pad_token_id(tokenizer))


def tokenize_responses(tokenizer, texts: Sequence[str], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Responses as the sampler returns them: (tokens int32 [B, N], mask int32 [B, N]), right
  padded, N = max_new_tokens, EOS appended when it fits (a longer response is cut at N tokens
  without EOS, as a sample that ran out of tokens would be)."""
  eos, pad = _eos_id(tokenizer), pad_token_id(tokenizer)
  tokens = np.full((len(texts), max_new_tokens), pad, np.int32)
  mask = np.zeros((len(texts), max_new_tokens), np.int32)
  for i, ids in enumerate(_ids(tokenizer, texts, add_special_tokens=False)):
    if len(ids) > max_new_tokens:
      if not RESPONSES_CUT["max_new_tokens"]:
        log.warning("response of batch row %d has %d tokens, more than sampler.max_new_tokens = %d: cut there, "
                    "without EOS, as a sample would be; further cuts are counted", i, len(ids), max_new_tokens)
      RESPONSES_CUT["max_new_tokens"] += 1
    ids = (ids + [eos])[:max_new_tokens]
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  return tokens, mask


def _segment_ids(tokenizer, text: str, spans: Sequence[Sequence[int]]) -> list[tuple[int, bool]]:
  """(id, is a target) for each token of `text`, with the character ranges `spans` (sorted, apart)
  tokenized apart from the text around them and marked as targets; the first piece gets the
  tokenizer's special tokens, as a whole prompt does."""
  pieces, at = [], 0
  for start, end in spans:
    if not at <= start < end <= len(text):
      raise ValueError(f"reply span [{start}, {end}) does not lie, in order, inside a prompt of {len(text)} characters")
    pieces += [(text[at:start], False), (text[start:end], True)]
    at = end
  pieces.append((text[at:], False))
  out = []
  for k, (piece, target) in enumerate(pieces):
    if piece:
      out += [(i, target) for i in tokenizer(piece, add_special_tokens=k == 0)["input_ids"]]
  return out


def _prompt_response_ids(tokenizer, prompts, responses, max_len, max_prompt_len, truncate="left", reply_spans=None):
  """Per row: (prompt ids + response ids + [eos], truncated to max_len; which of them are targets:
  the response's, and in a prompt with `reply_spans` its earlier replies')."""
  if len(prompts) != len(responses) or (reply_spans is not None and len(reply_spans) != len(prompts)):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses"
                     + ("" if reply_spans is None else f" and {len(reply_spans)} reply spans"))
  eos = _eos_id(tokenizer)
  rows = []
  for i, (p, r) in enumerate(zip(_ids(tokenizer, prompts, True), _ids(tokenizer, responses, False))):
    if reply_spans and reply_spans[i]:
      p = _segment_ids(tokenizer, prompts[i], reply_spans[i])
    else:
      p = [(t, False) for t in p]
    if not p:
      raise ValueError(f"prompt {i} ({prompts[i][:40]!r}) has no tokens; the first response token "
                       "needs one to be predicted from")
    r = [(t, True) for t in r + [eos]]
    budget = max(max_len - len(r), 1)
    if max_prompt_len is not None:
      budget = min(budget, max_prompt_len)
    p = _cut_prompt(p, budget, truncate, prompts[i], i, "more than the room left beside its response:")
    ids, targets = zip(*(p + r[:max_len - len(p)]))
    rows.append((list(ids), list(targets)))
  return rows


def sft_batch(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_len: int,
              max_prompt_len: int | None = None, truncate: str = "left",
              reply_spans: Sequence[Sequence[Sequence[int]]] | None = None) -> dict[str, np.ndarray]:
  """Teacher-forcing batch, left padded to L = max_len.

  Returns tokens int32 [B, L], mask bool [B, L] (real tokens), loss_mask bool [B, L]: True where
  tokens[b, t] is a completion token or its EOS, i.e. a target; it is predicted by the logits at
  t - 1, so a loss reads `logprob(tokens[:, 1:] | logits[:, :-1])` under `loss_mask[:, 1:]`.
  reply_spans: per row, [start, end) character ranges of the prompt that are targets too (a
  conversation's earlier assistant replies, `hub.sft_records`); such a prompt is tokenized in
  pieces at their edges. A prompt cut to fit loses its targets with its tokens.
  """
  rows = _prompt_response_ids(tokenizer, prompts, completions, max_len, max_prompt_len, truncate, reply_spans)
  tokens, mask = left_pad([ids for ids, _ in rows], max_len, pad_token_id(tokenizer))
  loss_mask = np.zeros_like(mask)
  for i, (ids, targets) in enumerate(rows):
    loss_mask[i, max_len - len(ids):] = targets
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def pack_sft(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_len: int,
             max_prompt_len: int | None = None, truncate: str = "left",
             reply_spans: Sequence[Sequence[Sequence[int]]] | None = None) -> dict[str, np.ndarray]:
  """Every SFT row (`sft_batch`'s, cut the same way) packed into rows of max_len tokens, several
  to a row, placed best fit in decreasing length (each in the fullest row it still fits).

  Returns, for M packed rows, tokens int32 [M, L], mask bool [M, L], loss_mask bool [M, L] as
  `sft_batch`'s (left padded), and segments int32 [M, L]: 1, 2, ... for the sequences of a row
  in order, 0 for padding, which the model reads so that each sequence attends to itself alone
  from position 0 (`decoder.forward`): its log-probs are those of a row of its own.
  """
  rows = _prompt_response_ids(tokenizer, prompts, completions, max_len, max_prompt_len, truncate, reply_spans)
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  packed: list[list[int]] = []
  room: list[tuple[int, int]] = []  # (tokens left, packed row), sorted
  for i in order:
    need = len(rows[i][0])
    at = bisect.bisect_left(room, (need, -1))
    if at == len(room):
      packed.append([i])
      left, row = max_len - need, len(packed) - 1
    else:
      left, row = room.pop(at)
      packed[row].append(i)
      left -= need
    bisect.insort(room, (left, row))
  pad = pad_token_id(tokenizer)
  out = {"tokens": np.full((len(packed), max_len), pad, np.int32), "mask": np.zeros((len(packed), max_len), bool),
         "loss_mask": np.zeros((len(packed), max_len), bool), "segments": np.zeros((len(packed), max_len), np.int32)}
  for r, members in enumerate(packed):
    at = max_len - sum(len(rows[i][0]) for i in members)
    for segment, i in enumerate(members, start=1):
      ids, targets = rows[i]
      place = slice(at, at + len(ids))
      out["tokens"][r, place], out["loss_mask"][r, place], out["segments"][r, place] = ids, targets, segment
      out["mask"][r, place] = True
      at += len(ids)
  return out


def preference_batch(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                     max_prompt_len: int, max_new_tokens: int, truncate: str = "left") -> dict[str, np.ndarray]:
  """Reward-model batch laid out as RL scores: each pair's prompt once, its two responses after it.

  Returns query int32 [B, P] and query_mask [B, P] (`tokenize_prompts`: left padded, P =
  max_prompt_len, cut by `truncate`) and response / response_mask int32 [B, 2, N] (`tokenize_responses`:
  right padded, N = max_new_tokens, EOS appended when it fits), chosen at [:, 0], rejected at
  [:, 1]. Both responses read the same prompt tokens, and the reward model trains on the shapes
  it scores in RL, a sampled response's length included; the prompt's pass runs once per pair
  (`sequences.response_scores`).
  """
  if not len(prompts) == len(chosen) == len(rejected):
    raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses")
  query, query_mask = tokenize_prompts(tokenizer, prompts, max_prompt_len, truncate)
  pairs = [text for both in zip(chosen, rejected) for text in both]  # row 2b chosen, 2b + 1 rejected
  response, response_mask = tokenize_responses(tokenizer, pairs, max_new_tokens)
  return {"query": query, "query_mask": query_mask.astype(np.int32),
          "response": response.reshape(len(prompts), 2, max_new_tokens),
          "response_mask": response_mask.reshape(len(prompts), 2, max_new_tokens)}


class EpochIterator:
  """Endless batches of indices into a dataset of n rows, reshuffled every epoch.

  Epoch e visits `np.random.default_rng(seed + e).permutation(n)` in slices of batch_size; a
  last slice shorter than batch_size is dropped (static shapes). The whole position is
  `state()` = {'epoch', 'position'} (plain ints, JSON-safe); `restore(state)` continues with
  exactly the batches an uninterrupted iterator would have produced.
  """

  def __init__(self, n: int, batch_size: int, seed: int):
    if batch_size < 1 or n < batch_size:
      raise ValueError(f"need 1 <= batch_size <= n, got batch_size={batch_size}, n={n}")
    self.n, self.batch_size, self.seed = n, batch_size, seed
    self.epoch, self.position = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng(self.seed + epoch).permutation(self.n)

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    if self.position + self.batch_size > self.n:
      self.epoch, self.position = self.epoch + 1, 0
      self._order = self._permutation(self.epoch)
    batch = self._order[self.position:self.position + self.batch_size]
    self.position += self.batch_size
    return batch

  def state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "position": int(self.position)}

  def restore(self, state: dict) -> "EpochIterator":
    if set(state) != {"epoch", "position"}:
      raise ValueError(f"iterator state has keys {sorted(state)}; expected ['epoch', 'position']")
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position <= self.n:
      raise ValueError(f"iterator state {state} is out of range for n={self.n}")
    self.epoch, self.position = epoch, position
    self._order = self._permutation(epoch)
    return self
