"""Regenerates the fixtures in this folder (made-up text, in the exact schema of each hub dataset). Run from here."""
import hashlib, json, os
import datasets
import pyarrow as pa
import pyarrow.parquet as pq

def write(path, rows):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")

posts = [
  ("r/cooking", "My sourdough never rises", "I have fed my starter twice a day for two weeks and the loaf still comes out flat. The kitchen is cold, around 17C. Is that the problem?", "cold kitchen, flat sourdough, is temperature the culprit?", "bread bad"),
  ("r/running", "First half marathon next month", "I have been running 30km a week. My long run is 16km. Should I push to 21km before race day or taper now?", "training for a half marathon, long run is 16km, should I do a full 21km before the race?", "running is hard and I like shoes"),
  ("r/personalfinance", "Paying off a car loan early", "The loan is at 6% and I have an emergency fund of four months. Extra cash could go to the loan or to an index fund.", "6% car loan, solid emergency fund: pay the loan down or invest?", "money question"),
  ("r/relationships", "Friend keeps cancelling plans", "My friend [24F] has cancelled the last five times we planned to meet, always on the same day. I [25F] am not sure whether to say something.", "friend cancels every plan last minute, should I bring it up?", "my friend is the worst person ever, I hate her"),
  ("r/gardening", "Tomato leaves turning yellow", "The lower leaves on my tomato plants turn yellow and drop. I water every morning and the pots drain well.", "lower tomato leaves yellowing despite regular watering, why?", "plants"),
  ("r/learnprogramming", "Stuck on recursion", "I understand loops but recursive functions confuse me. Every tutorial uses factorial and I still cannot write my own.", "loops make sense, recursion does not, looking for a better way to learn it", "coding is confusing lol"),
  ("r/cats", "Cat will not use new litter", "We switched to a pine litter to save money and now the cat goes next to the box. Back to the old one?", "cat refuses new pine litter, should we switch back?", "cat"),
  ("r/travel", "Two days in Lisbon", "Arriving on a Friday morning and leaving Sunday night. What should not be missed?", "weekend in Lisbon, what are the must-sees?", "travel is nice"),
]

def tldr_prompt(sub, title, post):
  return f"SUBREDDIT: {sub}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"

# trl-lib/tldr: prompt, completion (completion starts with a space); splits train/validation/test.
write("tldr/train.jsonl", [{"prompt": tldr_prompt(s, t, p), "completion": " " + good} for s, t, p, good, _ in posts[:6]])
write("tldr/validation.jsonl", [{"prompt": tldr_prompt(s, t, p), "completion": " " + good} for s, t, p, good, _ in posts[6:]])

# CarperAI/openai_summarize_tldr: prompt, label (prompt ends "TL;DR:", label has no leading space).
write("openai_summarize_tldr.jsonl", [{"prompt": tldr_prompt(s, t, p), "label": good} for s, t, p, good, _ in posts[:5]])

# trl-lib/tldr-preference: prompt, chosen, rejected (strings).
write("tldr_preference/train.jsonl", [{"prompt": tldr_prompt(s, t, p), "chosen": " " + good, "rejected": " " + bad} for s, t, p, good, bad in posts[:6]])
write("tldr_preference/validation.jsonl", [{"prompt": tldr_prompt(s, t, p), "chosen": " " + good, "rejected": " " + bad} for s, t, p, good, bad in posts[6:]])

# trl-internal-testing/tldr-preference-trl-style: prompt string; chosen/rejected as message lists; extra columns.
def msgs(prompt, reply):
  return [{"content": prompt, "role": "user"}, {"content": reply, "role": "assistant"}]
write("tldr_preference_trl_style.jsonl", [
  {"prompt": tldr_prompt(s, t, p), "chosen": msgs(tldr_prompt(s, t, p), " " + good), "rejected": msgs(tldr_prompt(s, t, p), " " + bad),
   "choice": i % 2, "worker": f"w{i}", "batch": "batch3", "split": "train"}
  for i, (s, t, p, good, bad) in enumerate(posts[:5])])

# Anthropic/hh-rlhf: chosen, rejected full transcripts.
dialogs = [
  ([("How do I boil an egg?", None)], " Put the egg in boiling water for about nine minutes, then cool it in cold water.", " Eggs are from chickens."),
  ([("What is the capital of France?", " Paris."), ("And of Italy?", None)], " Rome is the capital of Italy.", " I don't know."),
  ([("Can you help me write a birthday note for my sister?", None)], " Sure! Happy birthday to the best sister, thank you for always being there.", " No."),
  ([("Why is the sky blue?", " Sunlight scatters off air molecules, and blue light scatters the most."), ("Why not violet then?", None)], " Our eyes are less sensitive to violet, and some of it is absorbed high in the atmosphere.", " Because violet is not a real colour."),
  ([("Give me a synonym for happy.", None)], " Joyful.", " Sad."),
  ([("How many legs does a spider have?", None)], " Eight.", " Eight."),
]
def transcript(turns, last):
  out = ""
  for human, assistant in turns:
    out += f"\n\nHuman: {human}\n\nAssistant:"
    if assistant is not None:
      out += assistant
  return out + last
write("hh_rlhf/train.jsonl", [{"chosen": transcript(t, c), "rejected": transcript(t, r)} for t, c, r in dialogs])

# Dahoas/rm-static: prompt, response, chosen, rejected (hub layout: data/{split}-00000-of-00001.parquet).
rows = [{"prompt": transcript(t, ""), "response": c, "chosen": c, "rejected": r} for t, c, r in dialogs]
os.makedirs("rm_static/data", exist_ok=True)
datasets.Dataset.from_list(rows[:4]).to_parquet("rm_static/data/train-00000-of-00001.parquet")
datasets.Dataset.from_list(rows[4:]).to_parquet("rm_static/data/test-00000-of-00001.parquet")

# Unpaired preferences in TRL's KTO format: prompt, completion, label (bool); a post's responses not adjacent.
unpaired = lambda ps: [{"prompt": tldr_prompt(s, t, p), "completion": " " + text, "label": label}
                       for label in (True, False) for s, t, p, good, bad in ps for text in [good if label else bad]]
write("tldr_unpaired/train.jsonl", unpaired(posts[:6]))
write("tldr_unpaired/validation.jsonl", unpaired(posts[6:]))

# HuggingFaceH4/ultrafeedback_binarized: prompt (string), prompt_id, chosen/rejected/messages as message lists
# (the user turn, then the reply; messages = chosen), score_chosen, score_rejected. Hub layout: splits named in
# README.md's configs, data/{split}-00000-of-00001.parquet.
def chat_row(turns, good, bad, scores):
  history = [{"content": text, "role": role} for role, text in turns]
  first = history[0]["content"]
  return {"prompt": first, "prompt_id": hashlib.sha256(first.encode()).hexdigest(),
          "chosen": history + [{"content": good, "role": "assistant"}],
          "rejected": history + [{"content": bad, "role": "assistant"}],
          "messages": history + [{"content": good, "role": "assistant"}],
          "score_chosen": scores[0], "score_rejected": scores[1]}
chats = [chat_row([("user", human)], c.strip(), r.strip(), (8.0, 3.0)) for ((human, _),), c, r in
         [(t, c, r) for t, c, r in dialogs if len(t) == 1]]
chats += [chat_row([("user", t[0][0]), ("assistant", t[0][1].strip()), ("user", t[1][0])], c.strip(), r.strip(), (7.5, 2.0))
          for t, c, r in dialogs if len(t) == 2]
chats += [chat_row([("user", f"Summarize: {p}")], good, bad, (9.0, 4.0)) for s, t, p, good, bad in posts[:4]]
os.makedirs("ultrafeedback_binarized/data", exist_ok=True)
feedback_splits = {"train_prefs": chats[:8], "test_prefs": chats[8:], "train_sft": chats[:8], "test_sft": chats[8:],
                   "train_gen": chats[:8], "test_gen": chats[8:]}
for split, split_rows in feedback_splits.items():  # plain Arrow (no datasets metadata): read by datasets 3 and 4 alike
  pq.write_table(pa.Table.from_pylist(split_rows), f"ultrafeedback_binarized/data/{split}-00000-of-00001.parquet")
with open("ultrafeedback_binarized/README.md", "w") as f:
  f.write("---\nconfigs:\n- config_name: default\n  data_files:\n"
          + "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in feedback_splits)
          + "---\nMade-up rows in HuggingFaceH4/ultrafeedback_binarized's schema.\n")

# openai/gsm8k (config "main"): question, answer (worked solution with <<calculator>> notes, ending "#### N").
# Hub layout: main/{split}-00000-of-00001.parquet.
problems = [
  ("Tom has 3 boxes of 12 pencils. He gives away 10 pencils. How many pencils does he have left?",
   "Tom has 3*12=<<3*12=36>>36 pencils.\nAfter giving 10 away he has 36-10=<<36-10=26>>26 pencils.\n#### 26"),
  ("A baker makes 48 muffins and sells half of them in the morning. How many muffins are left?",
   "Half of 48 is 48/2=<<48/2=24>>24.\nSo 48-24=<<48-24=24>>24 muffins are left.\n#### 24"),
  ("Sara reads 15 pages a day for 6 days. How many pages does she read?",
   "She reads 15*6=<<15*6=90>>90 pages.\n#### 90"),
  ("A bike costs $1,200 and is on sale for $150 off. What is the sale price?",
   "The sale price is 1200-150=<<1200-150=1050>>1050 dollars.\n#### 1,050"),
  ("There are 7 rows of 8 chairs. 5 chairs are broken. How many chairs can be used?",
   "There are 7*8=<<7*8=56>>56 chairs.\n56-5=<<56-5=51>>51 can be used.\n#### 51"),
  ("Ann saves $4 a week. How many weeks until she has $36?",
   "She needs 36/4=<<36/4=9>>9 weeks.\n#### 9"),
  ("A train travels 60 km an hour for 3 hours. How far does it go?",
   "It goes 60*3=<<60*3=180>>180 km.\n#### 180"),
  ("Ben had 20 marbles and lost 7. How many does he have?",
   "He has 20-7=<<20-7=13>>13 marbles.\n#### 13"),
]
os.makedirs("gsm8k/main", exist_ok=True)
datasets.Dataset.from_list([{"question": q, "answer": a} for q, a in problems[:6]]).to_parquet("gsm8k/main/train-00000-of-00001.parquet")
datasets.Dataset.from_list([{"question": q, "answer": a} for q, a in problems[6:]]).to_parquet("gsm8k/main/test-00000-of-00001.parquet")
