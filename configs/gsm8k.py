"""Math word problems with a verifiable reward: GSM8K, each response scored 1 when its final number
is the dataset's answer (p3o_jax/rewards.py), no reward model.

  python -m p3o_jax.main --config=configs/gsm8k.py --workdir=$WORKDIR
  python -m p3o_jax.main --config=configs/gsm8k.py:algo=grpo,k=8 --workdir=$WORKDIR
  python -m p3o_jax.main --config=configs/gsm8k.py:algos=p3o+grpo+rloo --workdir=$WORKDIR

Data: openai/gsm8k (subset main) as it is on the hub: SFT on the train split's worked answers,
RL on its questions, evaluation on the test split. The reward function gets each prompt's
'answer' column beside the texts (rl.rollout.TextReward). Policy: Qwen/Qwen2.5-0.5B-Instruct,
its chat template putting each question in the user's turn. Per RL iteration: 64 questions x K=4
= 256 responses; P3O compares the K responses to a question pairwise.

A base model without a chat template reads each question as "Question: ...\nAnswer:" and, after
its answer, tends to write the next question: `sampler.stop` ends a response there, as EOS does.
"""

from p3o_jax import config_base as common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.base_config()
  c.task = "gsm8k"
  c.model.hf = "Qwen/Qwen2.5-0.5B-Instruct"
  c.model.dtype = "bfloat16"
  c.model.reward_fn = "p3o_jax.rewards:gsm8k_correct"
  c.data.sft = c.data.prompts = "openai/gsm8k"
  c.data.data_dir = "main"
  c.data.sft_split, c.data.prompts_split, c.data.eval_split = "train", "train", "test"
  c.data.max_prompt_len = 256
  c.sampler.max_new_tokens = 256
  c.sampler.stop = ("\nQuestion:",)
  c.sft.steps, c.sft.batch_size, c.sft.optim.lr = 500, 32, 1e-5
  c.rl.iterations = 500
  c.rl.prompts_per_rollout = 64
  c.rl.k = 4
  c.rl.num_minibatches = 8
  # Qwen's 152k-token vocabulary makes the logits most of the memory: 16 prompts' rows at a time in the
  # rollout and 2 micro-batches in the update keep one iteration within 40 GB (bench/memory.py gsm8k-0.5b)
  c.rl.rollout_chunk, c.rl.micro_batches = 16, 2
  c.rl.beta = 0.04
  c.optim.lr = 1e-6
  c.eval.every, c.eval.num_prompts = 25, 512
  c.eval.greedy = True  # the greedy accuracy beside the sampled one
  c.mesh.data, c.mesh.fsdp = 1, -1
  if "runlocal" in args:
    common.runlocal(c)
  common.apply_args(c, args)
  return c
