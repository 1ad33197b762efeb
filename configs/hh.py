"""Anthropic HH (Dahoas/rm-static), the P3O paper's main setting: Pythia-1B SFT policy,
GPT-J reward model, 128 new tokens, authors' defaults (64 pairs per rollout, 4 inner
epochs, 8 pairs per step, lr 6e-6, beta 0.05).

  python -m p3o_jax.main --config=configs/hh.py --workdir=$WORKDIR --config.stage=rl
  python -m p3o_jax.main --config=configs/hh.py:variant=v1 --workdir=$WORKDIR --config.stage=rl

Per RL iteration: 64 prompts x K=2 = 64 pairs; 8 minibatches of 8 pairs; 4 epochs.
"""

from p3o_jax import config_base as common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.base_config()
  c.task = "hh"
  c.stage = "rl"
  c.model.hf = "Dahoas/pythia-1B-static-sft"
  c.model.reward_hf = "Dahoas/gptj-rm-static"
  c.model.dtype = "bfloat16"
  c.data.sft = "Dahoas/rm-static"
  c.data.preference = "Dahoas/rm-static"
  c.data.preference_eval_split = "test"
  c.data.prompts = "Dahoas/rm-static"
  c.data.max_prompt_len = 512
  c.sampler.max_new_tokens = 128
  c.rl.iterations = 1000
  c.rl.prompts_per_rollout = 64
  c.rl.num_minibatches = 8
  c.rl.inner_epochs = 4
  c.rl.beta = 0.05
  c.rl.reward_baseline = "reference"  # the paper's reward: r(x, y) - r(x, y_chosen)
  c.optim.lr = 6e-6
  c.mesh.data, c.mesh.fsdp = 1, -1
  if "runlocal" in args:
    common.runlocal(c)
  common.apply_args(c, args)
  return c
