"""Defaults shared by every config file in configs/ (each file overrides what it needs).

Values are the authors' P3O code defaults (docs/algorithms.md) unless a comment says otherwise.
The options only one algorithm reads are declared by that algorithm (`options` in
p3o_jax/rl/algorithms/<name>.py) and added to `rl` here.
"""

from __future__ import annotations

import ml_collections

from p3o_jax.rl import algorithms


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"   # sft | rm | rl | eval | pipeline
  c.task = "demo"        # demo (the embedded task), or any name for hub data: tldr | hh | ultrafeedback
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      hf="",               # HF dir or hub id of the SFT/initial policy ("" = build from arch)
      tokenizer="",        # defaults to model.hf
      reward_hf="",        # HF dir or hub id of a trained reward model (skips the rm stage)
      reward_fn="",        # 'package.module:function' of (prompts, responses) -> scores, instead of a RM
      dtype="float32", param_dtype="float32",
      frozen_dtype="bfloat16",  # the reference and reward model's weights: never trained, so bf16
                                # storage halves their memory at a tested cost (README, Memory)
      # the inputs of every weight matmul ('': the activations' dtype; bfloat16: bf16 inputs summed in
      # float32, the CPU's bf16 matrix units and GPUs' / TPUs' native mode; weights stay param_dtype)
      matmul_dtype="",
      frozen_matmul_dtype="",  # the same for the reference and reward model ('': model.matmul_dtype)
      remat=False,         # gradient checkpointing: recompute each block in the backward pass
      scan_layers=False))  # one lax.scan over stacked blocks: compile time flat in depth
  c.model.arch = ml_collections.ConfigDict()  # DecoderConfig fields when model.hf is empty

  c.data = ml_collections.ConfigDict(dict(
      sft="", preference="", prompts="",       # hub ids or local paths
      data_dir="",         # a folder inside each (a hub dataset's subset: openai/gsm8k's main, HH's helpful-base)
      sft_split="train", preference_split="train", prompts_split="train", eval_split="test",
      preference_eval_split="",  # held-out pairs (the reward model's and DPO's held-out accuracy; "": none)
      # renders conversational (message-list) rows to text: a Jinja template or a file holding one;
      # "": the tokenizer's own. Set, it is saved with every exported policy's tokenizer.
      chat_template="",
      max_prompt_len=64,
      truncate_prompts="left"))  # a prompt over max_prompt_len: cut its start (left), its end (right), or error
  c.data.demo = ml_collections.ConfigDict()

  c.sampler = ml_collections.ConfigDict(dict(
      max_new_tokens=50, min_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0,
      # strings a response ends with, as with EOS (a base model's next "Question:"); matched as the
      # tokenizer writes them, and counted as finished by rl.missing_eos_penalty
      stop=(),
      matmul_dtype="",     # the sampler's weight matmuls ('': model.matmul_dtype); see rl.rollout_is
      param_dtype="float32",   # the dtype the sampler reads the policy's weights in (bfloat16: as a
                               # bf16 inference engine would; see rl.rollout_is)
      # CPU devices to decode on when the trainer holds one: 'auto' (one per core for a small
      # policy; p3o_jax/host_devices.py), N, or 'cores'. Never changes the samples.
      cpu_devices="auto"))

  optim = lambda lr: ml_collections.ConfigDict(dict(
      lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-6, grad_clip=1.0, warmup_steps=0,
      schedule="constant", mu_dtype="float32"))  # Adam's first moment: bfloat16 halves its memory
  c.sft = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, optim=optim(1e-5),
      # a multi-turn conversation: train on every assistant reply ('all'), or on the last one with
      # the earlier turns as its prompt ('last')
      assistant_turns="all",
      # several examples to a row of data.max_prompt_len + sampler.max_new_tokens tokens, each
      # attending to itself alone; batch_size then counts packed rows
      packing=False))
  c.rm = ml_collections.ConfigDict(dict(steps=1000, batch_size=32, pairs_per_prompt=1, num_prompts=0,
                                        optim=optim(1e-5)))
  c.optim = optim(6e-6)  # the RL optimizer
  # Offline preference optimisation (rl.algo dpo, simpo, orpo, kto; p3o_jax/preference.py): steps
  # of batch_size pairs (KTO: responses) from the reward model's data (data.preference, or the
  # demo's sampled pairs), evaluated on the frontier every eval.every steps. DPO's and KTO's beta
  # is rl.dpo_beta, as online DPO's.
  c.dpo = ml_collections.ConfigDict(dict(steps=1000, batch_size=32, optim=optim(1e-6)))

  c.rl = ml_collections.ConfigDict(dict(
      algo="p3o",            # any name in p3o_jax.rl.algorithms.names()
      iterations=1000,       # rollout + update rounds
      prompts_per_rollout=64,
      k=2,                   # responses per prompt (p3o: any K >= 2; online_dpo: 2)
      inner_epochs=4,
      num_minibatches=8,     # per epoch; prompts_per_rollout must divide evenly
      micro_batches=1,       # gradient accumulation inside a minibatch (exact; saves activations)
      rollout_chunk=0,       # sample / score this many prompts at a time (exact; 0: the whole rollout)
      # P3O (docs/algorithms.md); beta and eps are shared with the other policy-gradient methods
      variant="v2", beta=0.05, eps=0.2, c=10.0, kl_source="theta", whiten_delta=False,
      clip_per_token=False, normalise="pair",
      # rewards
      reward_clip=10.0, reward_scaling=True,
      # "reference": score minus the reward of the prompt's own dataset response (chosen /
      # completion / label), the P3O paper's HH reward r(x, y) - r(x, y_chosen)
      reward_baseline="none",
      missing_eos_penalty=0.0,  # subtracted from the score of a response without EOS (0: off)
      # PPO (trlx as the paper ran it)
      gamma=1.0, lam=0.95, vf_coef=0.1, cliprange_value=0.2, critic="head",
      kl_init=0.05, kl_target=6.0, kl_horizon=10000, adaptive_kl=True, whiten_advantages=True,
      # online DPO
      dpo_beta=0.1,
      # rollout importance correction (every policy-gradient algorithm): "tis" multiplies the
      # loss by min(pi_old / pi_sampler, rollout_is_cap), for a sampler in another precision
      rollout_is="none", rollout_is_cap=2.0))
  c.rl.update({name: default for name, (default, _) in algorithms.options().items()})

  # LoRA (p3o_jax/models/lora.py): rank 0 trains every weight; rank r > 0 trains W + (alpha / r) A B
  # on `targets` ('all': q,k,v,o,gate,up,down) with the model frozen, in `stages` (a comma list of
  # sft, rm, rl, or 'all'), and exports the merged model (and the adapters as a PEFT folder)
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="all", stages="rl"))

  c.eval = ml_collections.ConfigDict(dict(
      every=50, num_prompts=256,
      num_pairs=512,  # held-out preference pairs scored every eval.every steps (data.preference_eval_split;
                      # the demo samples rm.pairs_per_prompt for each held-out prompt); 0: none
      judge="",  # 'package.module:function' (prompt, first, second) -> 1 | 0 | 0.5 for win rates
      greedy=False))  # RL's held-out evaluations also score greedy responses (eval/greedy_reward)
  c.pipeline = ml_collections.ConfigDict(dict(algos=("p3o",)))
  # allow_changes: 'field,section.*' a resume may see changed beyond workdir.SAFE_TO_CHANGE
  c.ckpt = ml_collections.ConfigDict(dict(every=50, keep=3, resume=True, allow_changes=""))
  # level: console logging (warning: progress bars, warnings and summaries only; info: every
  # library's INFO lines too, as --verbosity=0 does)
  c.log = ml_collections.ConfigDict(dict(every=1, tensorboard=True, wandb=False, wandb_project="p3o_jax",
                                         level="warning"))
  # cpu_devices: the trainer's CPU devices, N or 'cores' (p3o_jax/host_devices.py; measured in
  # docs/speed.md: 1 is fastest here but at the tiny benchmark shape; the sampler's are
  # sampler.cpu_devices). cpu_reuse_memory: on a CPU run, keep freed host memory for XLA's next
  # call instead of page-faulting it in again, and run one-device calls on the calling thread so
  # that their scratch comes from it (p3o_jax/host_memory.py)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, cpu_devices="1", cpu_reuse_memory=True))
  return c


def parse_arg(arg: str | None) -> dict:
  """'runlocal,algo=ppo' -> {'runlocal': True, 'algo': 'ppo'}."""
  out = {}
  for part in (arg or "").split(","):
    if part.strip():
      key, _, value = part.partition("=")
      out[key.strip()] = value.strip() if value else True
  return out


def runlocal(c: ml_collections.ConfigDict) -> None:
  """A hub config cut to a smoke run (`file.py:runlocal`): two steps of each stage, 4 prompts (sampled
  2 at a time where the config chunks its rollouts)."""
  c.sft.steps = c.rm.steps = 2
  c.rl.iterations, c.rl.prompts_per_rollout, c.rl.num_minibatches = 2, 4, 2
  c.rl.rollout_chunk = min(c.rl.rollout_chunk, 2)
  c.eval.num_prompts = 4


def apply_args(c: ml_collections.ConfigDict, args: dict) -> None:
  """Shortcuts usable in `--config=file.py:algo=ppo,variant=v1,k=4,algos=p3o+ppo`."""
  for key, value in args.items():
    if key == "runlocal":
      continue
    if key in ("algo", "variant"):
      c.rl[key] = value
    elif key == "k":
      c.rl.k = int(value)
    elif key == "algos":
      c.pipeline.algos = tuple(value.split("+"))
    else:
      raise ValueError(f"unknown config argument {key!r}; expected runlocal, algo, variant, k or algos")
