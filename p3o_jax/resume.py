"""A training stage's state on the mesh, resumed from its checkpoints: the one set-up that
supervised fitting (`supervised.fit`) and the RL loop (`rl/loop.py`) share.

    run = resume.start("sft", params, tx, axes, mesh_cfg=..., workdir=..., ckpt_cfg=..., order=order)
    for step in range(run.start, total):
      run.state, metrics = step_fn(run.state, batch)
      if run.checkpoint(step + 1, total, stop, extra_meta):   # True: stop requested, saved
        break
    run.close()

What is checkpointed besides the state: the data order (`order.state()`) and whatever the
loop passes as `extra_meta` (RL: the KL coefficient and the reward statistics), so a resumed
run continues bitwise (docs/pitfalls.md, 10).
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from p3o_jax import checkpoint, paths, sharding, train_state

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  name: str
  state: train_state.TrainState
  shardings: object            # the state's NamedShardings (the update keeps this layout)
  mesh: jax.sharding.Mesh
  ckpt: checkpoint.Checkpointer
  order: object                # the data order (EpochIterator), saved with every checkpoint
  every: int
  start: int = 0               # steps already done (0, or the restored step)
  meta: dict = dataclasses.field(default_factory=dict)  # the restored checkpoint's meta

  def checkpoint(self, done: int, total: int, stop=None, extra_meta: dict | None = None) -> bool:
    """Saves at every `every` steps, at the last step and when a stop is requested; returns
    True when the loop should stop (a signal asked for it and the state is saved)."""
    stopping = stop is not None and stop.requested
    if self.saves_at(done, total, stop):
      self.ckpt.save(done, self.state, meta={"data": self.order.state(), **(extra_meta or {})})
    if stopping:
      log.warning("%s: stop requested; saved step %d", self.name, done)
    return stopping

  def saves_at(self, done: int, total: int, stop=None) -> bool:
    """Whether `checkpoint(done, total, stop)` will save."""
    return done % self.every == 0 or done == total or (stop is not None and stop.requested)

  def close(self) -> None:
    self.ckpt.close()


def start(name: str, params, tx, axes, *, mesh_cfg, workdir: str, ckpt_cfg, order) -> Run:
  """Places params and optimizer state on the config's mesh and, when `<workdir>/ckpt` holds a
  readable step and ckpt.resume is on, restores the state and the data order from it."""
  mesh = sharding.mesh_from_config(mesh_cfg)
  state, shardings = train_state.create_on_mesh(params, tx, axes, mesh)
  ckpt = checkpoint.Checkpointer(paths.join(workdir, "ckpt"), keep=ckpt_cfg.keep)
  run = Run(name, state, shardings, mesh, ckpt, order, ckpt_cfg.every)
  if ckpt_cfg.resume and ckpt.latest_step() is not None:
    restored = ckpt.restore(jax.tree.map(checkpoint.abstract_like, state))
    run.state, run.start, run.meta = restored.state, restored.step, restored.meta
    order.restore(run.meta["data"])
    log.info("%s: resumed from step %d", name, run.start)
  return run
