"""TL;DR summarisation, as in the P3O paper (Pythia SFT policy, Bradley-Terry reward model).

  python -m p3o_jax.main --config=configs/tldr.py --workdir=$WORKDIR
  python -m p3o_jax.main --config=configs/tldr.py:algo=ppo --workdir=$WORKDIR --config.rl.beta=0.1
  python -m p3o_jax.main --config=configs/tldr.py --workdir=$WORKDIR --config.stage=rl \
      --config.model.hf=<sft policy> --config.model.reward_hf=<reward model>

Data are read from the hub as they are (or from local copies with the same schema):
SFT trl-lib/tldr (prompt, completion), comparisons trl-lib/tldr-preference
(prompt, chosen, rejected). Batch arithmetic per RL iteration: 64 prompts x K=2 = 128
responses; 4 inner epochs x 8 minibatches of 8 prompts (16 responses) = 32 updates.
"""

from p3o_jax import config_base as common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.base_config()
  c.task = "tldr"
  c.model.hf = "EleutherAI/pythia-1b-deduped"
  c.model.dtype = "bfloat16"
  c.data.sft = "trl-lib/tldr"
  c.data.preference = "trl-lib/tldr-preference"
  c.data.preference_eval_split = "validation"
  c.data.prompts = "trl-lib/tldr"
  c.data.eval_split = "validation"
  c.data.max_prompt_len = 512
  c.sampler.max_new_tokens = 53
  c.sft.steps, c.sft.batch_size, c.sft.optim.lr = 4000, 32, 1e-5
  c.rm.steps, c.rm.batch_size, c.rm.optim.lr = 3000, 32, 1e-5
  c.rl.iterations = 1000
  c.rl.prompts_per_rollout = 64
  c.rl.num_minibatches = 8
  c.rl.beta = 0.05
  c.optim.lr = 6e-6
  c.eval.every, c.eval.num_prompts = 50, 256
  c.mesh.data, c.mesh.fsdp = 1, -1
  if "runlocal" in args:
    common.runlocal(c)
  common.apply_args(c, args)
  return c
