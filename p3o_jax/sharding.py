"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes:
  data    pure data parallelism: batch split, parameters replicated
  fsdp    batch split AND parameters split along `embed` (ZeRO-3 style)
  tensor  Megatron-style: heads, MLP width and vocab split

    mesh = make_mesh(data=-1, fsdp=2, tensor=1)             # -1: whatever devices remain
    param_shardings = logical_to_mesh(decoder.logical_axes(graph), mesh, shapes=params)
    params = jax.device_put(params, param_shardings)        # or shard_params(...)
    replicated_fraction(param_shardings, params)            # warns if most bytes are replicated
    opt_shardings = like_params(opt_state, params, param_shardings, mesh)
    batch = jax.device_put(batch, batch_sharding(mesh))     # leading dim over data x fsdp

A dimension whose size a mesh axis does not divide is left unsplit along that axis (logged
once per parameter), so odd sizes (GQA with 1 kv head, a vocab of 50257) still work.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from p3o_jax import host_devices
from p3o_jax.models import lora

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None: replicated). Names the decoder does not use are replicated.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "norm": None,
    "length": None,
    "layers": None,     # scan_layers' stacking axis: never split, each device holds its shards of all layers
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 to fill."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  fill = [name for name, size in sizes.items() if size == -1]
  bad = [f"mesh.{name}={size}" for name, size in sizes.items() if size != -1 and (not isinstance(size, int) or size < 1)]
  if bad or len(fill) > 1:
    raise ValueError(f"mesh sizes must be positive ints with at most one -1; got {sizes}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if len(devices) % known:
      raise ValueError(f"cannot fill mesh.{fill[0]}: {len(devices)} devices are not divisible by {known} ({sizes})")
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
  shape = tuple(sizes[name] for name in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _mesh_axes_for(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
  if name is None:
    return ()
  axes = rules.get(name)
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                    rules: Mapping[str, Any] = RULES, where: str = "") -> PartitionSpec:
  """Logical axis names of one array -> PartitionSpec over `mesh`.

  A mesh axis is dropped for a dimension it does not divide (checked when `shape` is given)
  and when an earlier dimension already uses it (a mesh axis may appear once per array).
  """
  if shape is not None and len(shape) != len(logical):
    raise ValueError(f"{where or 'array'}: {len(logical)} logical axes {tuple(logical)} for shape {tuple(shape)}")
  used, spec = set(), []
  for dim, name in enumerate(logical):
    kept, size = [], shape[dim] if shape is not None else None
    for axis in _mesh_axes_for(name, rules):
      if axis in used or mesh.shape[axis] == 1:
        continue
      split = math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]
      if size is not None and size % split:
        log.info("%s: dim %d (%s, size %d) is not divisible by mesh axis %r (%d-way split); not splitting it there",
                 where or "array", dim, name, size, axis, split)
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_to_mesh(axes_tree, mesh: Mesh, shapes=None, rules: Mapping[str, Any] = RULES):
  """Tree of logical-axis tuples (e.g. decoder.logical_axes(graph)) -> tree of NamedSharding.

  `shapes` is a matching tree of arrays or ShapeDtypeStructs; with it, axes that do not
  divide a dimension are dropped (see logical_to_spec).
  """
  def one(path, logical, shaped=None):
    where = jax.tree_util.keystr(path)
    shape = None if shaped is None else shaped.shape
    return NamedSharding(mesh, logical_to_spec(logical, mesh, shape, rules, where))
  if shapes is None:
    return jax.tree_util.tree_map_with_path(one, axes_tree, is_leaf=_is_axes)
  return jax.tree_util.tree_map_with_path(one, axes_tree, shapes, is_leaf=_is_axes)


def shard_params(params, logical_axes_tree, mesh: Mesh, rules: Mapping[str, Any] = RULES):
  """Places `params` on `mesh` by the rules; returns (sharded params, their shardings)."""
  shardings = logical_to_mesh(logical_axes_tree, mesh, shapes=params, rules=rules)
  return jax.device_put(params, shardings), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; every other dimension whole."""
  return NamedSharding(mesh, logical_to_spec(("batch",), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate_onto(tree, mesh: Mesh):
  """`tree`'s arrays replicated onto every device of `mesh` (one process): each array's buffer on
  a device of the mesh is kept, and the other devices get device-to-device copies of it.
  `jax.device_put` to a sharding over other devices takes a path through host memory instead
  (the trainer's one device to the per-core sampler's two: 3.7 against 2.0 ms for the small
  bench policy's 68 arrays)."""
  target, devices = replicated(mesh), list(mesh.devices.flat)
  leaves, treedef = jax.tree.flatten(tree)
  if not all(isinstance(x, jax.Array) and len(x.devices()) == 1 for x in leaves):
    return jax.device_put(tree, target)
  per_device = []
  for device in devices:  # one batched copy per device of the arrays not already on it
    moved = [i for i, x in enumerate(leaves) if x.devices() != {device}]
    copied = dict(zip(moved, jax.device_put([leaves[i] for i in moved], device)))
    per_device.append([copied.get(i, x) for i, x in enumerate(leaves)])
  out = [jax.make_array_from_single_device_arrays(x.shape, target, [held[i] for held in per_device])
         for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, out)


def like_params(tree, params, param_shardings, mesh: Mesh):
  """Shardings for a tree that holds params-shaped subtrees (optax state, gradients).

  Every subtree with the params' structure gets `param_shardings` (when shapes agree);
  anything else (step counters, scalars) is replicated.
  """
  params_def = jax.tree_util.tree_structure(params)
  param_shapes = [np.shape(x) for x in jax.tree.leaves(params)]

  def is_params_like(x):
    if jax.tree_util.tree_structure(x) != params_def:
      return False
    return [np.shape(y) for y in jax.tree.leaves(x)] == param_shapes

  def assign(x):
    return param_shardings if is_params_like(x) else replicated(mesh)
  return jax.tree.map(assign, tree, is_leaf=is_params_like)


def replicated_fraction(shardings, params, warn_above: float = 0.5) -> float:
  """Fraction of parameter bytes that every device holds in full.

  Warns (naming the largest replicated arrays) when the fraction exceeds `warn_above` on
  a mesh meant to split parameters (fsdp or tensor > 1); with data parallelism alone,
  replication is the intent.
  """
  total, replicated_bytes, culprits = 0, 0, []
  for (path, x), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings)):
    nbytes = math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
    total += nbytes
    if sharding.is_fully_replicated:
      replicated_bytes += nbytes
      culprits.append((nbytes, jax.tree_util.keystr(path)))
  fraction = replicated_bytes / total if total else 0.0
  mesh = next((s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)), None)
  splits_params = mesh is not None and (mesh.shape.get("fsdp", 1) > 1 or mesh.shape.get("tensor", 1) > 1)
  if splits_params and fraction > warn_above:
    largest = ", ".join(f"{name} ({nbytes / 2**20:.1f} MiB)" for nbytes, name in sorted(culprits, reverse=True)[:5])
    log.warning("%.0f%% of parameter bytes are replicated on every device (mesh %s); largest: %s",
                100 * fraction, dict(mesh.shape), largest)
  return fraction


def mesh_from_config(mesh_cfg) -> Mesh:
  """config.mesh -> Mesh over the trainer's devices (host_devices.training_devices). With no -1
  the mesh takes the first data*fsdp*tensor of them, so a single-device run stays single-device
  on a host that has more."""
  sizes = dict(data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=mesh_cfg.tensor)
  devices = host_devices.training_devices(mesh_cfg)
  devices = devices if -1 in sizes.values() else devices[: math.prod(sizes.values())]
  return make_mesh(**sizes, devices=devices)


def train_state_shardings(state, params_axes, mesh: Mesh):
  """Shardings for a TrainState(step, params, opt_state): params by their logical axes,
  optimizer moments like the params, counters replicated."""
  param_shardings = logical_to_mesh(params_axes, mesh, shapes=state.params)
  replicated_fraction(param_shardings, state.params)
  # The optimizer's state is over the trainable params alone (`lora.trainable`).
  return type(state)(replicated(mesh), param_shardings,
                     like_params(state.opt_state, lora.trainable(state.params), lora.trainable(param_shardings), mesh))


class RowSplit:
  """How an n-row global batch (leading dimension over data x fsdp) is shared between processes.

  `rows` are the global row indices this process's devices hold, in order: the process reads,
  tokenizes and holds only those, `to_global` builds the global arrays from them without any
  cross-host comparison, `local` takes them back out of a global array, and `gather` gives
  every process all n rows of a small per-row array (metrics, reward statistics). A batch the
  batch axes do not divide is replicated: every process holds all of it. In one process,
  rows = 0..n-1 and every method is the identity.
  """

  def __init__(self, n: int, mesh: Mesh):
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    self.n, self.mesh = int(n), mesh
    self.sharding = batch_sharding(mesh) if n % split == 0 else replicated(mesh)
    if split > 1 and n % split and (n,) not in _WARNED_SHAPES:
      _WARNED_SHAPES.add((n,))
      log.warning("batch of %d rows is not divisible by data x fsdp = %d; every device holds all of it", n, split)
    self.rows = _held_rows(self.sharding, self.n)
    self.replicated = len(self.rows) == self.n

  def repeat(self, k: int) -> "RowSplit":
    """The split of the n * k rows made by repeating each row k times (row b*k + j)."""
    return RowSplit(self.n * k, self.mesh)

  def to_global(self, tree):
    """This process's rows (leading dimension len(rows)) -> global arrays of n rows."""
    position = np.full(self.n, -1, np.int64)
    position[self.rows] = np.arange(len(self.rows))

    def build(x):
      x = np.asarray(x)
      if x.shape[:1] != (len(self.rows),):
        raise ValueError(f"expected this process's {len(self.rows)} rows, got an array of shape {x.shape}")
      shape = (self.n, *x.shape[1:])
      return jax.make_array_from_callback(shape, self.sharding, lambda index: x[position[np.arange(self.n)[index[0]]]]
                                          [(slice(None), *index[1:])])
    return jax.tree.map(build, tree)

  def local(self, x) -> np.ndarray:
    """This process's rows of a global array (any sharding) as NumPy."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)[self.rows] if np.shape(x)[:1] == (self.n,) and not self.replicated else np.asarray(x)
    held, parts = set(), []
    for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
      start = shard.index[0].start or 0
      if start not in held:
        held.add(start)
        parts.append(np.asarray(shard.data))
    out = np.concatenate(parts)
    if out.shape[0] != len(self.rows):
      raise ValueError(f"array of shape {x.shape} holds {out.shape[0]} rows on this process; expected "
                       f"{len(self.rows)} (sharding {x.sharding})")
    return out

  def gather(self, local) -> np.ndarray:
    """All n rows, in global order, on every process, from each process's own rows."""
    local = np.asarray(local)
    if self.replicated or jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    values = multihost_utils.process_allgather(local, tiled=False)
    rows = multihost_utils.process_allgather(self.rows, tiled=False)
    out = np.empty((self.n, *local.shape[1:]), local.dtype)
    out[np.asarray(rows).reshape(-1)] = np.asarray(values).reshape(-1, *local.shape[1:])
    return out


def row_ranges(rows) -> str:
  """[0 1 2 3 8 9] -> '0:4,8:10' (for logs)."""
  rows, out, start = [int(r) for r in rows], [], None
  for i, r in enumerate(rows):
    start = r if start is None else start
    if i + 1 == len(rows) or rows[i + 1] != r + 1:
      out.append(f"{start}:{r + 1}")
      start = None
  return ",".join(out)


def _held_rows(named: NamedSharding, n: int) -> np.ndarray:
  """Sorted global row indices that this process's devices hold of an [n] array."""
  held = set()
  for index in named.addressable_devices_indices_map((n,)).values():
    held.update(range(n)[index[0]])
  return np.asarray(sorted(held), np.int64)


def shard_batch(batch, mesh: Mesh):
  """Puts every array's leading dimension over data x fsdp; an array whose leading size the
  batch axes do not divide is replicated instead (logged once per shape)."""
  split = mesh.shape["data"] * mesh.shape["fsdp"]

  def place(x):
    if np.ndim(x) and np.shape(x)[0] % split == 0:
      return jax.device_put(x, batch_sharding(mesh))
    if split > 1 and np.shape(x)[:1] not in _WARNED_SHAPES:
      _WARNED_SHAPES.add(np.shape(x)[:1])
      log.warning("batch dimension %s is not divisible by data x fsdp = %d; replicating it",
                  np.shape(x)[:1], split)
    return jax.device_put(x, replicated(mesh))
  return jax.tree.map(place, batch)


_WARNED_SHAPES: set = set()
