"""Chat preferences: UltraFeedback on an instruct model, every conversation rendered with its chat template.

  python -m p3o_jax.main --config=configs/ultrafeedback.py --workdir=$WORKDIR
  python -m p3o_jax.main --config=configs/ultrafeedback.py:algos=p3o+dpo --workdir=$WORKDIR
  python -m p3o_jax.main --config=configs/ultrafeedback.py --workdir=$WORKDIR \
      --config.model.hf=Qwen/Qwen3-0.6B-Base --config.data.chat_template=chatml.jinja   # a base model

Data: HuggingFaceH4/ultrafeedback_binarized (a prompt, chosen and rejected conversations scored
by GPT-4) as it is on the hub: SFT on train_sft's chosen replies, the reward model on
train_prefs (held out: test_prefs), RL on train_gen's prompts, evaluation on test_gen's. Policy:
Qwen/Qwen2.5-0.5B-Instruct, whose ChatML template renders the conversations (p3o_jax/data/hub.py:
its <|im_end|> is the EOS that ends each reply) and is saved with every exported policy.
Per RL iteration: 64 prompts x K=2 = 64 pairs; 8 minibatches of 8 pairs; 4 epochs.
"""

from p3o_jax import config_base as common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.base_config()
  c.task = "ultrafeedback"
  c.model.hf = "Qwen/Qwen2.5-0.5B-Instruct"
  c.model.dtype = "bfloat16"
  source = "HuggingFaceH4/ultrafeedback_binarized"
  c.data.sft = c.data.preference = c.data.prompts = source
  c.data.sft_split, c.data.preference_split, c.data.preference_eval_split = "train_sft", "train_prefs", "test_prefs"
  c.data.prompts_split, c.data.eval_split = "train_gen", "test_gen"
  c.data.max_prompt_len = 512
  c.sampler.max_new_tokens = 256
  c.sft.steps, c.sft.batch_size, c.sft.optim.lr = 1000, 32, 1e-5
  c.rm.steps, c.rm.batch_size, c.rm.optim.lr = 2000, 32, 1e-5
  c.rl.iterations = 1000
  c.rl.prompts_per_rollout = 64
  c.rl.num_minibatches = 8
  c.rl.rollout_chunk = 16  # Qwen's 152k-token logits: 16 prompts' rows at a time (bench/memory.py ultrafeedback-0.5b)
  c.rl.beta = 0.05
  c.optim.lr = 1e-6
  c.eval.every, c.eval.num_prompts = 50, 256
  c.mesh.data, c.mesh.fsdp = 1, -1
  if "runlocal" in args:
    common.runlocal(c)
  common.apply_args(c, args)
  return c
