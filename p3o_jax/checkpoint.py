"""Checkpoints: an orbax `CheckpointManager` with the guards an RL run needs.

What a checkpoint holds (one orbax step directory `<workdir>/<step>/`):
  state  any pytree of arrays: params, optimizer state, rng keys, step. Typed PRNG keys
         (`jax.random.key`) are stored as their uint32 key data and re-wrapped on restore.
  meta   a JSON dict: data position (consumed prompts, epoch), KL-controller value, running
         reward statistics, the config as a dict. NumPy / JAX scalars become Python numbers.

Use from a plain Python loop:

    ckpt = Checkpointer(workdir / "ckpt", keep=3)
    stop = install_signal_handlers()             # SIGTERM / SIGINT -> stop.requested
    if ckpt.latest_step() is not None:            # resume
      restored = ckpt.restore(abstract_state)     # latest readable step, see below
      state, meta = restored.state, restored.meta
    for step in range(start, num_steps):
      state, metrics = train_step(state, batch)
      if step % every == 0 or stop.requested:
        ckpt.save(step, state, meta={"consumed_prompts": n, "kl_coef": kl, ...})
      if stop.requested:
        break
    ckpt.close()                                  # waits for the async write
    stop.uninstall()

`abstract_state` is a pytree of `jax.ShapeDtypeStruct` (or arrays) with the structure to
restore into; give each leaf a `.sharding` to restore straight onto a (possibly different)
mesh. Restoring with the target keeps int-keyed dicts (the decoder's `layers` 0..L-1)
int-keyed: orbax stores the keys as strings but rebuilds the target's structure.

Guarantees:
  * Atomic saves: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete,
    so a crash mid-write leaves a temporary directory that is never listed as a step.
  * `save` refuses non-finite floating values (`NonFiniteError` names the first bad leaf),
    so a NaN never overwrites a good checkpoint.
  * `restore` walks back from the newest step: a step that cannot be read (missing or
    garbled files, half-written directory, non-finite values) is logged
    ("checkpoint step 30 is unreadable (...); falling back to step 20"), moved aside to
    `<step>.unreadable` so later saves at that step can proceed, and the previous one tried.
    If no step can be read, the error of the newest one is raised and nothing is moved.
  * Checksums: each step holds `checksums.json`, the sha256 of every file of its items,
    computed in orbax's background thread just before the step directory gets its final name
    (single-process runs; orbax 0.12 has no checksum of its own over the data). `restore`
    verifies it first: a step that fails verification is moved aside like an unreadable one.
    A step without a manifest (older runs, multi-process runs) is restored unverified.
  * Saves are asynchronous; `wait_until_finished()`, `close()` and interpreter exit wait for
    the pending write. A step is listed (`all_steps`, `latest_step`) only once committed.
    `finish_pending_saves()` completes every open Checkpointer's write; main.run calls it
    before letting an error propagate, so a failure mid-save leaves a committed step, not a
    `<step>.orbax-checkpoint-tmp` directory (interpreter exit is too late: orbax's writer
    threads are already shut down then).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from p3o_jax import paths

log = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for a step directory still being written
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()  # for finish_pending_saves
MANIFEST_NAME = "checksums.json"
_UNCHECKED = ("_CHECKPOINT_METADATA", "commit_success.txt")  # orbax rewrites these while finalizing
CONFIG_ITEM = "config"  # the run's config, saved beside state and meta (see stamp_config)
_RUN_CONFIG: dict | None = None


class NonFiniteError(ValueError):
  """Raised instead of saving a state with NaN or Inf values."""


class ChecksumError(ValueError):
  """A step's files differ from its checksums.json."""


class NoReadableCheckpointError(RuntimeError):
  """Every step in the directory failed to restore."""


@dataclasses.dataclass
class Restored:
  """What `Checkpointer.restore` returns."""
  state: Any
  meta: dict
  step: int
  skipped: list[tuple[int, str]]  # (step, reason) for each unreadable newer step


def leaf_path(path) -> str:
  """`('params', 'layers', 0, 'attn')` keys -> 'params/layers/0/attn'."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _is_prng_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and not _is_prng_key(x) and jnp.issubdtype(x.dtype, jnp.inexact)


@jax.jit
def _all_finite(leaves):
  """One program over every leaf: a per-leaf flag, replicated (every process can read it)."""
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def first_non_finite(tree) -> str | None:
  """Path of the first floating leaf holding a NaN or Inf, or None when all are finite.

  One jitted reduction over all leaves, however they are sharded: no eager collective per
  leaf (which, across processes, can interleave differently and deadlock).
  """
  paths_leaves = [(leaf_path(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if _is_float(x)]
  if not paths_leaves:
    return None
  groups: dict = {}  # one program per set of devices (a jit cannot mix them)
  for i, (_, x) in enumerate(paths_leaves):
    where = tuple(sorted(d.id for d in x.sharding.device_set)) if isinstance(x, jax.Array) else "host"
    groups.setdefault(where, []).append(i)
  finite = np.ones(len(paths_leaves), bool)
  for where, indices in groups.items():
    leaves = [paths_leaves[i][1] for i in indices]
    finite[indices] = ([np.isfinite(x).all() for x in leaves] if where == "host"
                       else np.asarray(_all_finite(leaves)))
  bad = np.flatnonzero(~finite)
  return paths_leaves[bad[0]][0] if len(bad) else None


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_prng_key(x) else x, tree)


def _abstract_leaf(x):
  """A restore target for one leaf: key-typed leaves become their uint32 key data."""
  if isinstance(x, (int, float, np.number)):
    x = np.asarray(x)
  sds = x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)
  sharding = getattr(sds, "sharding", None)
  if _is_prng_key(sds):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(sds.shape, sds.dtype))
    if isinstance(sharding, jax.sharding.NamedSharding):  # keys are tiny: replicate
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  if sharding is None:  # orbax needs a placement; default to the first local device
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)


def _rewrap_keys(restored, abstract):
  def rewrap(data, target):
    if _is_prng_key(target):
      # The key dtype carries its implementation (threefry, rbg, ...).
      return jax.random.wrap_key_data(data, impl=target.dtype._impl)  # pylint: disable=protected-access
    return data
  return jax.tree.map(rewrap, restored, abstract)


def to_jsonable(value):
  """Meta values -> JSON types: NumPy / JAX scalars to numbers, tuples to lists."""
  if isinstance(value, dict) or hasattr(value, "to_dict"):
    value = value.to_dict() if hasattr(value, "to_dict") else value
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class Checkpointer:
  """Save / restore a training state pytree plus a JSON meta dict under one directory.

  Args:
    directory: where step directories go (created if missing).
    keep: number of most recent steps to keep.
    async_save: write in a background thread (the loop continues after the device->host copy).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = paths.resolve(directory)
    _report_half_written(self.directory)
    self._saving: int | None = None  # the step whose write is in flight (for its manifest)
    self._async = async_save
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a crash mid-write
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest) if async_save else None,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._closed = False
    _OPEN.add(self)
    atexit.register(self.wait_until_finished)

  # --------------------------------------------------------------------------- queries

  def all_steps(self) -> list[int]:
    """Committed steps. orbax lists a step as soon as its async save starts; its directory
    gets the plain `<step>` name only when the write is complete."""
    return sorted(s for s in self._manager.all_steps() if (self.directory / str(s)).is_dir())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  # --------------------------------------------------------------------------- save

  def save(self, step: int, state, meta: dict | None = None) -> bool:
    """Starts writing `state` and `meta` as `step`; returns once arrays are copied to host.

    Returns False (and writes nothing) when `step` is already saved, e.g. a periodic save
    followed by a preemption save at the same step. Raises NonFiniteError (naming the leaf)
    if any floating leaf holds a NaN or Inf.
    """
    if int(step) in self._manager.all_steps():
      log.info("checkpoint step %d already exists; not saving it again", step)
      return False
    bad = first_non_finite(state)
    if bad is not None:
      raise NonFiniteError(f"refusing to save checkpoint step {step}: leaf '{bad}' has NaN or Inf values")
    items = dict(state=ocp.args.StandardSave(_keys_to_data(state)), meta=ocp.args.JsonSave(to_jsonable(meta or {})))
    if _RUN_CONFIG is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(_RUN_CONFIG)
    args = ocp.args.Composite(**items)
    self._manager.wait_until_finished()  # orbax waits here anyway; the manifest needs the step number
    self._saving = int(step)
    self._manager.save(int(step), args=args, force=True)
    if not self._async:
      self._write_manifest()
    return True

  def _write_manifest(self) -> None:
    """checksums.json in the step being saved, still under its temporary name when orbax renames
    on commit (so it lands atomically with the step), under its final name otherwise."""
    step, self._saving = self._saving, None
    if step is None or jax.process_count() > 1:
      return
    for item in self.directory.iterdir():
      if item.name == str(step) or item.name.startswith(f"{step}{TMP_MARKER}"):
        paths.write_text(item / MANIFEST_NAME, json.dumps({"sha256": _digests(item)}, indent=0, sort_keys=True))

  def wait_until_finished(self) -> None:
    if not self._closed:
      self._manager.wait_until_finished()

  # --------------------------------------------------------------------------- restore

  def restore(self, abstract_state, step: int | None = None) -> Restored:
    """Restores `step` (default: the newest readable step) into `abstract_state`'s structure.

    With `step=None`, unreadable newer steps are skipped with a warning and moved aside.
    With an explicit `step`, any failure is raised.
    """
    self.wait_until_finished()
    target = jax.tree.map(_abstract_leaf, abstract_state)
    if step is not None:
      return self._restore_step(int(step), target, abstract_state, skipped=[])
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint steps in {self.directory}")
    skipped, first_error = [], None
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(candidate, target, abstract_state, skipped)
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous step
        first_error = first_error or e
        skipped.append((candidate, f"{type(e).__name__}: {_first_line(e)}"))
        continue
      for bad_step, reason in skipped:
        log.warning("checkpoint step %d is unreadable (%s); falling back to step %d",
                    bad_step, reason, candidate)
        self._move_aside(bad_step)
      if skipped:
        self._manager.reload()
      return restored
    raise NoReadableCheckpointError(
        f"no readable checkpoint in {self.directory}; tried steps {list(reversed(steps))}; "
        f"newest failed with {type(first_error).__name__}: {_first_line(first_error)}") from first_error

  def _restore_step(self, step, target, abstract_state, skipped) -> Restored:
    _verify(self.directory / str(step))
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=args)
    if out.meta is None:
      raise ValueError("meta item is missing")
    state = _rewrap_keys(out.state, abstract_state)
    bad = first_non_finite(state)
    if bad is not None:
      raise NonFiniteError(f"leaf '{bad}' has NaN or Inf values")
    return Restored(state=state, meta=dict(out.meta), step=step, skipped=list(skipped))

  def _move_aside(self, step: int) -> None:
    """Renames an unreadable step so it is no longer listed and its number can be saved again."""
    if jax.process_index() != 0:
      return
    src = self.directory / str(step)
    if src.is_dir():
      dst = self.directory / f"{step}{UNREADABLE_SUFFIX}-{int(time.time())}"
      src.rename(dst)
      log.warning("moved unreadable checkpoint step %d to %s", step, dst)

  # --------------------------------------------------------------------------- lifetime

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads. Idempotent."""
    if self._closed:
      return
    self._manager.wait_until_finished()
    self._manager.close()
    self._closed = True
    _OPEN.discard(self)
    atexit.unregister(self.wait_until_finished)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _digests(root) -> dict[str, str]:
  """sha256 of every file under `root` (relative path -> hex), bar the manifest and orbax's
  own commit files."""
  out = {}
  files = [folder / name for folder, _, names in root.walk() for name in names]
  for path in sorted(files):
    if path.name in (MANIFEST_NAME, *_UNCHECKED):
      continue
    digest = hashlib.sha256()
    with path.open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        digest.update(chunk)
    out[str(path.relative_to(root))] = digest.hexdigest()
  return out


def _verify(step_dir) -> None:
  """Raises ChecksumError naming the first file that differs from the step's checksums.json."""
  manifest = step_dir / MANIFEST_NAME
  if not manifest.is_file():
    log.info("checkpoint %s has no %s; restoring it unverified", step_dir, MANIFEST_NAME)
    return
  expected = json.loads(manifest.read_text())["sha256"]
  found = _digests(step_dir)
  for name, digest in expected.items():
    if found.get(name) != digest:
      raise ChecksumError(f"{name}: " + ("missing" if name not in found else "checksum mismatch") +
                          f" ({MANIFEST_NAME})")


def stamp_config(flat_config: dict | None) -> None:
  """Every save from now on also writes `flat_config` ({dotted field: value}) as the step's
  'config' item, so a resume can name the fields that changed (workdir.check_resume).
  None stops it. main.run stamps each stage's config before the stage starts."""
  global _RUN_CONFIG
  _RUN_CONFIG = None if flat_config is None else to_jsonable(flat_config)


def committed_steps(directory) -> list[int]:
  """Step numbers of the committed steps under a checkpoint directory, without opening a manager."""
  root = paths.resolve(directory)
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def saved_config(directory) -> tuple[int | None, dict | None]:
  """(newest committed step, the config it was saved with, or None when it has none)."""
  steps = committed_steps(directory)
  if not steps:
    return None, None
  item = paths.resolve(directory) / str(steps[-1]) / CONFIG_ITEM
  if not item.is_dir():
    return steps[-1], None
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
    return steps[-1], dict(reader.restore(item))


def finish_pending_saves() -> None:
  """Completes the in-flight save of every open Checkpointer and closes it. Called while an
  error propagates, so a failure of the save itself is logged, not raised over that error."""
  for ckpt in list(_OPEN):
    try:
      ckpt.close()
    except Exception as e:  # noqa: BLE001 - the error being propagated is the one to report
      log.error("checkpoint save under %s did not complete: %s: %s", ckpt.directory, type(e).__name__,
                _first_line(e))


def _report_half_written(directory) -> None:
  """Names the temporary directories an interrupted save left; orbax removes them on start."""
  if not directory.is_dir():
    return
  for item in sorted(directory.iterdir()):
    if TMP_MARKER in item.name:
      log.warning("checkpoint directory %s is half-written (a save was interrupted); ignoring it", item)


def _first_line(error) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else "")[:300]


# ----------------------------------------------------------------------------- preemption

class StopRequested:
  """A flag set by SIGTERM / SIGINT: the loop saves at the end of the current step and exits.

  A second SIGINT while the flag is already set raises KeyboardInterrupt, so Ctrl-C twice
  still kills a stuck run.
  """

  def __init__(self):
    self.requested = False
    self.signal_name: str | None = None
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signum = signum
    self.signal_name = signal.Signals(signum).name
    log.warning("%s received: will save a checkpoint and stop after the current step", self.signal_name)

  def uninstall(self) -> None:
    """Puts back the handlers that were there before `install_signal_handlers`."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def __bool__(self) -> bool:
    return self.requested


def install_signal_handlers(signals=(signal.SIGTERM, signal.SIGINT)) -> StopRequested:
  """Routes `signals` to a fresh StopRequested flag (main thread only) and returns it."""
  stop = StopRequested()
  for signum in signals:
    stop._previous[signum] = signal.signal(signum, stop._handle)  # pylint: disable=protected-access
  return stop


def abstract_like(x) -> jax.ShapeDtypeStruct:
  """The restore target for an array: shape, dtype and (when it has one) its sharding, so
  orbax restores straight onto the same mesh layout."""
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
