"""The embedded demo task: sort a few digits, learnt from sloppy demonstrations.

Small enough that SFT -> reward model -> RL runs on a laptop CPU, and real enough that each stage
has something to learn, with a programmatic GOLD reward to measure the result by.

    prompt      "sort 3 1 4 1 ="            (op word, n digits, "=")
    clean       "1 1 3 4"                   (the target; responses end with EOS in token space)
    noisy demo  "1 7 3 4 4"                 (some tokens replaced, one inserted)

Ops: `sort` (ascending), `reverse`, `copy`; the default task uses `sort` only. Digits 0-9,
n in [min_digits, max_digits].

Why RL has something to gain: a fraction `noise_frac` of the SFT demonstrations is corrupted
(each token replaced by a random digit with probability `token_noise`; with probability
`length_noise` one token dropped or a random one inserted). A policy fitted to them by maximum
likelihood reproduces that noise when it samples at temperature 1, so its gold reward is
mediocre; its mode is mostly right, so a reward model trained on Bradley-Terry comparisons of its
own samples can steer RL towards the clean answer. The corruptions are locally visible (a digit
that is not in the prompt, an order violation, a wrong length), which is what a tiny reward model
can pick up from a few thousand comparisons.

Gold reward of response y (m words) for target t (n words), in [-1, 1]:

    gold = #{i < min(n, m): y_i == t_i} / n  -  length_penalty * |m - n| / n

With the defaults (sort, 3-6 digits, noise 0.6 / 0.4 / 0.3) the clean targets score 1.0, the
noisy demonstrations about 0.71 on average (those that differ from the target about 0.47),
random digit strings about -0.16. A 2-layer, d=64 policy (~100k parameters) after 300 SFT steps samples at
about 0.63 (its greedy answer scores about 0.99): the room RL is meant to win back.

Responses are scored as decoded text: words split on whitespace, everything from the first EOS
word on is ignored, any word that is not the right digit (a special token, an op word) counts as
wrong. Decode sampled tokens with `skip_special_tokens=False` so a stray `<pad>` is not silently
removed.

Text and tokens. The tokenizer is a word-level `tokenizers.Tokenizer` (whitespace split, one id per
word) wrapped as `transformers.PreTrainedTokenizerFast`, so the pipeline treats it like any hub
tokenizer: `save_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` round-trip it.
Completions are stored WITHOUT the EOS word; `batching.sft_batch` appends `eos_token_id`, as for
the hub datasets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
DIGITS = tuple(str(d) for d in range(10))
OPS = ("sort", "reverse", "copy")
EQUALS = "="
VOCAB = SPECIAL_TOKENS + DIGITS + OPS + (EQUALS,)


def build_tokenizer() -> PreTrainedTokenizerFast:
  """Word-level tokenizer over the demo vocabulary; ids are positions in VOCAB (pad = 0, eos = 1)."""
  core = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # No post-processor: nothing is added around a text; callers append EOS to completions.
  return PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
      padding_side="left", clean_up_tokenization_spaces=False, model_max_length=64)


def apply_op(op: str, digits: Sequence[str]) -> list[str]:
  if op == "sort":
    return sorted(digits)
  if op == "reverse":
    return list(reversed(digits))
  if op == "copy":
    return list(digits)
  raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
  """'sort 3 1 4 =' -> ('sort', ['3', '1', '4'])."""
  words = prompt.split()
  if len(words) < 3 or words[0] not in OPS or words[-1] != EQUALS or not all(
      w in DIGITS for w in words[1:-1]):
    raise ValueError(f"not a demo-task prompt: {prompt!r}; expected '<op> <digits> =' with op in {OPS}")
  return words[0], words[1:-1]


def target(prompt: str) -> str:
  """The clean response to a prompt, as text without EOS."""
  return " ".join(apply_op(*parse_prompt(prompt)))


def gold_reward(prompts: Sequence[str], responses: Sequence[str],
                length_penalty: float = 0.5) -> np.ndarray:
  """Gold score of each response (see the module docstring); float32 [B] in [-1, 1]."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  scores = np.empty(len(prompts), np.float32)
  for i, (prompt, response) in enumerate(zip(prompts, responses)):
    want = target(prompt).split()
    got = response.split()
    if EOS in got:
      got = got[:got.index(EOS)]
    n = len(want)
    matches = sum(a == b for a, b in zip(got, want))
    scores[i] = matches / n - length_penalty * abs(len(got) - n) / n
  return np.clip(scores, -1.0, 1.0)


def bradley_terry_label(gold_a, gold_b, rng: np.random.Generator, temperature: float = 0.1) -> np.ndarray:
  """Simulated annotator: True where response a is preferred, drawn with P = sigmoid((a - b) / T).

  temperature 0 gives the noiseless label (ties broken by a fair coin).
  """
  gold_a, gold_b = np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)
  if gold_a.shape != gold_b.shape:
    raise ValueError(f"gold_a {gold_a.shape} and gold_b {gold_b.shape} differ in shape")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  diff = gold_a - gold_b
  coin = rng.random(diff.shape)
  if temperature == 0:
    return np.where(diff == 0, coin < 0.5, diff > 0)
  p_a = 0.5 * (1.0 + np.tanh(diff / (2.0 * temperature)))  # = sigmoid(diff / T), overflow-free
  return coin < p_a


def corrupt(words: Sequence[str], rng: np.random.Generator, token_noise: float,
            length_noise: float) -> list[str]:
  """A sloppy annotator's version of `words`: random substitutions, maybe one drop or insert."""
  out = [DIGITS[rng.integers(10)] if rng.random() < token_noise else w for w in words]
  if rng.random() < length_noise:
    if rng.random() < 0.5 and len(out) > 1:
      del out[rng.integers(len(out))]
    else:
      out.insert(int(rng.integers(len(out) + 1)), DIGITS[rng.integers(10)])
  return out


def random_responses(prompts: Sequence[str], rng: np.random.Generator, max_words: int = 8) -> list[str]:
  """Uniformly random digit strings of random length: the floor of the gold reward."""
  return [" ".join(DIGITS[d] for d in rng.integers(10, size=rng.integers(1, max_words + 1)))
          for _ in prompts]


@dataclasses.dataclass(frozen=True)
class DemoTask:
  """Disjoint prompt sets for SFT, RL training and evaluation (text, EOS not included)."""
  sft_prompts: list[str]
  sft_completions: list[str]      # noisy demonstrations
  sft_clean_completions: list[str]  # what they should have been (for diagnostics only)
  train_prompts: list[str]        # for reward-model pairs and RL
  eval_prompts: list[str]


def _sample_prompts(rng, count, ops, min_digits, max_digits, seen: set) -> list[str]:
  n_possible = len(ops) * sum(10 ** n for n in range(min_digits, max_digits + 1))
  if count + len(seen) > n_possible // 2:
    raise ValueError(f"asked for {count + len(seen)} distinct prompts from only {n_possible}; "
                     "raise max_digits or ask for fewer")
  out = []
  while len(out) < count:
    n = int(rng.integers(min_digits, max_digits + 1))
    prompt = " ".join([ops[rng.integers(len(ops))], *(DIGITS[d] for d in rng.integers(10, size=n)), EQUALS])
    if prompt not in seen:
      seen.add(prompt)
      out.append(prompt)
  return out


def make_demo_task(seed: int, n_train_prompts: int, n_eval_prompts: int, n_sft: int | None = None,
                   ops: Sequence[str] = ("sort",), min_digits: int = 3, max_digits: int = 6,
                   noise_frac: float = 0.6, token_noise: float = 0.4,
                   length_noise: float = 0.3) -> DemoTask:
  """Deterministic in `seed`. n_sft defaults to n_train_prompts. See the module docstring."""
  for name, value in (("noise_frac", noise_frac), ("token_noise", token_noise), ("length_noise", length_noise)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {value}")
  if not 1 <= min_digits <= max_digits:
    raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
  for op in ops:
    if op not in OPS:
      raise ValueError(f"unknown op {op!r}; expected some of {OPS}")
  rng = np.random.default_rng(seed)
  n_sft = n_train_prompts if n_sft is None else n_sft
  seen: set = set()
  sample = lambda count: _sample_prompts(rng, count, tuple(ops), min_digits, max_digits, seen)
  sft_prompts, train_prompts, eval_prompts = sample(n_sft), sample(n_train_prompts), sample(n_eval_prompts)
  clean = [target(p) for p in sft_prompts]
  noisy = [" ".join(corrupt(c.split(), rng, token_noise, length_noise)) if rng.random() < noise_frac else c
           for c in clean]
  return DemoTask(sft_prompts, noisy, clean, train_prompts, eval_prompts)


def save_demo_task(task: DemoTask, directory: str) -> dict[str, str]:
  """Write the task as jsonl in the hub schemas that `p3o_jax.data.hub` reads, plus the tokenizer.

  Layout: sft/train.jsonl {prompt, completion}; prompts/train.jsonl and prompts/test.jsonl
  {prompt}; tokenizer/. Returns the paths by name.
  """
  def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")

  paths = {"sft": os.path.join(directory, "sft"), "prompts": os.path.join(directory, "prompts"),
           "tokenizer": os.path.join(directory, "tokenizer")}
  write(os.path.join(paths["sft"], "train.jsonl"),
        [{"prompt": p, "completion": c} for p, c in zip(task.sft_prompts, task.sft_completions)])
  write(os.path.join(paths["prompts"], "train.jsonl"), [{"prompt": p} for p in task.train_prompts])
  write(os.path.join(paths["prompts"], "test.jsonl"), [{"prompt": p} for p in task.eval_prompts])
  build_tokenizer().save_pretrained(paths["tokenizer"])
  return paths
