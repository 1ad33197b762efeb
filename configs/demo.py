"""The embedded demo: sort digits, learnt from sloppy demonstrations, with a gold reward.

The whole pipeline (SFT -> reward model -> RL -> eval) runs offline on a laptop CPU:

  python -m p3o_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m p3o_jax.main --config=configs/demo.py --workdir=runs/demo --config.stage=rl \
      --config.rl.algo=ppo
  python -m p3o_jax.main --config=configs/demo.py:runlocal --workdir=/tmp/demo   # seconds

`arg` is a comma list: `runlocal` shrinks every stage to a smoke test; `algo=ppo` etc. sets
rl.algo; `algos=p3o+ppo` sets which algorithms the pipeline trains and compares.
"""

import ml_collections

from p3o_jax import config_base as common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.base_config()
  c.task = "demo"
  c.stage = "pipeline"

  # A Llama-style model small enough for a CPU: ~100k parameters over a 17-word vocabulary.
  c.model.hf = ""
  c.model.arch = ml_collections.ConfigDict(dict(
      model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
      intermediate_size=192, max_position_embeddings=32, norm="rmsnorm", norm_eps=1e-6,
      mlp="swiglu", activation="silu", position="rotary", tie_embeddings=True))
  # ~100k parameters need no memory saving: the reference and reward model stay fp32, so the demo's
  # numbers are exact and equal across meshes and process counts (tests/test_multiprocess.py).
  c.model.frozen_dtype = "float32"

  c.data.demo = ml_collections.ConfigDict(dict(
      n_train_prompts=2048, n_eval_prompts=128, n_sft=4096, ops=("sort",),
      min_digits=3, max_digits=6, noise_frac=0.6, token_noise=0.4, length_noise=0.3,
      bt_temperature=0.1,
      seed=-1))  # the task's prompts and demonstrations (-1: config.seed); bench/frontier.py fixes
                 # it so that config.seed varies only the RL run
  c.data.max_prompt_len = 8        # "sort" + up to 6 digits + "="
  c.sampler.max_new_tokens = 10    # up to 6 digits + EOS, with room to ramble

  # SFT: 4096 noisy demonstrations, 300 steps x 64 = ~5 epochs.
  c.sft.steps = 300
  c.sft.batch_size = 64
  c.sft.optim.lr = 3e-3

  # RM: 4 pairs for each of 1024 prompts, sampled from the SFT policy, labelled by the gold
  # reward through a Bradley-Terry coin flip; initialised from the SFT backbone.
  c.rm.pairs_per_prompt = 4
  c.rm.num_prompts = 1024
  c.rm.steps = 300
  c.rm.batch_size = 64
  c.rm.optim.lr = 1e-3

  # RL: 64 prompts x K=2 responses per rollout, 4 inner epochs x 4 minibatches of 16 prompts.
  c.rl.iterations = 60
  c.rl.prompts_per_rollout = 64
  c.rl.num_minibatches = 4
  c.rl.inner_epochs = 4
  c.rl.beta = 0.1
  c.optim.lr = 3e-4
  # Offline DPO: the reward model's 4096 pairs, 2 epochs of 64 pairs a step.
  c.dpo.steps = 128
  c.dpo.batch_size = 64
  c.dpo.optim.lr = 3e-4
  c.eval.every = 10
  c.eval.num_prompts = 128
  c.ckpt.every = 20
  # the paper's comparison, and offline DPO on the reward model's pairs, on one frontier
  c.pipeline.algos = ("p3o", "ppo", "online_dpo", "dpo")

  if "runlocal" in args:
    c.data.demo.n_train_prompts, c.data.demo.n_sft, c.data.demo.n_eval_prompts = 128, 128, 16
    c.sft.steps = c.rm.steps = c.dpo.steps = 4
    c.dpo.batch_size = 8
    c.rm.num_prompts = 32
    c.rl.iterations = 3
    c.rl.prompts_per_rollout = 8
    c.rl.num_minibatches = 2
    c.rl.inner_epochs = 1
    c.eval.every = 2
    c.eval.num_prompts = 16
    c.ckpt.every = 2
    c.pipeline.algos = ("p3o",)
  common.apply_args(c, args)
  return c
