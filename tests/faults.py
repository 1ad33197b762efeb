"""Functions the tests name in configs (model.reward_fn) to inject faults into a run. Kept apart
from the test modules, which import p3o_jax.main (its flags may be defined only once)."""

from p3o_jax.data import synthetic

CALLS = {"n": 0}


def reward_failing_on_third_call(prompts, responses):
  """The demo's gold reward, failing in the second training rollout: after the initial eval and
  the first rollout, while the save of iteration 1 is still being written (ckpt.every=1)."""
  CALLS["n"] += 1
  if CALLS["n"] == 3:
    raise RuntimeError("reward service unavailable")
  return synthetic.gold_reward(prompts, responses)
