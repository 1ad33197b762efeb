"""LoRA (Hu et al. 2021): train a low-rank update of chosen weight matrices, the model frozen.

A kernel W (its input axes, then its output axes; a leading layer axis with scan_layers) is
used as W + s A B, with A [in, r], B [r, out], s = alpha / r. A starts as peft initialises it
(uniform, +-1/sqrt(in)) and B at zero, so training starts at the model itself.

The adapters sit in the model's params dict under `KEY`, beside `SCALE` (s, a float32
scalar):

    params = {"embed": ..., "layers": ..., KEY: {"layers": {0: {"attn": {"q_kernel": {"a", "b"}}}}}, SCALE: s}

`adapted` gives the model's params with each targeted kernel an `Adapted` (W, A, s B), which
`decoder.weight_matmul` runs as x W + ((x A) s B): the train step's loss, the sampler and the
scoring passes read that, so no merged copy of the weights is made, and in the loss W is not
differentiated (the backward forms no [in, out] gradient of it). `merged` turns such a dict back
into the model's own params (W + s A B), for export.

`trainable` / `with_trainable` are the train state's split: in a dict that holds `KEY`, only the
adapters (and a reward model's new score head) train; the model's weights and s are frozen (not
differentiated, no optimizer state). A dict without `KEY` trains whole, so a critic beside a
LoRA policy trains as before.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KEY = "lora"
SCALE = "lora_scale"

# target name -> (module, kernel, number of input axes, number of output axes)
KERNELS = {
    "q": ("attn", "q_kernel", 1, 2), "k": ("attn", "k_kernel", 1, 2), "v": ("attn", "v_kernel", 1, 2),
    "o": ("attn", "o_kernel", 2, 1),
    "gate": ("mlp", "gate_kernel", 1, 1), "up": ("mlp", "up_kernel", 1, 1), "down": ("mlp", "down_kernel", 1, 1),
}
ALL = tuple(KERNELS)  # peft's "all-linear": every block matmul, not the embeddings or the LM head
# A new head trains beside the adapters (peft's modules_to_save): a reward model's score head.
TRAINED_BESIDE = ("scalar_kernel", "scalar_bias")
STAGES = ("sft", "rm", "rl")


def applies(lora_cfg, stage: str) -> bool:
  """Whether the config's `lora` block puts adapters on `stage`'s model."""
  return bool(lora_cfg) and lora_cfg.rank > 0 and stage in parse_names(lora_cfg.stages, STAGES, "lora.stages")


def parse_names(spec: str, known, field: str) -> tuple[str, ...]:
  """A comma list of names from `known` ('all': every one) -> the names; unknown ones are named."""
  names = tuple(known) if spec.strip() == "all" else tuple(n.strip() for n in spec.split(",") if n.strip())
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise ValueError(f"{field}={spec!r}: {unknown or 'empty'}; expected 'all' or a comma list of {list(known)}")
  return names


def parse_targets(spec: str, field: str = "lora.targets") -> tuple[str, ...]:
  """'all' or a comma list of KERNELS' names -> the names; an unknown one is named."""
  return parse_names(spec, ALL, field)


def _kernels(layers: dict, targets) -> dict:
  """{path inside `layers`: kernel} for the targeted kernels the model has (gate only with SwiGLU)."""
  out = {}
  stacked = "attn" in layers  # scan_layers: one dict of [L, ...] arrays
  for index, block in ([(None, layers)] if stacked else layers.items()):
    for name in targets:
      module, kernel, _, _ = KERNELS[name]
      if kernel in block.get(module, {}):
        out[(index, module, kernel)] = block[module][kernel]
  return out


def _nest(flat: dict) -> dict:
  """{(index | None, module, kernel): x} -> the nested layers dict it names."""
  tree: dict = {}
  for (index, module, kernel), x in flat.items():
    node = tree if index is None else tree.setdefault(index, {})
    node.setdefault(module, {})[kernel] = x
  return tree


def _shapes(kernel_shape, kernel: str, layer_axes: int):
  n_in = next(v[2] for v in KERNELS.values() if v[1] == kernel)
  lead, rest = tuple(kernel_shape[:layer_axes]), tuple(kernel_shape[layer_axes:])
  return lead, rest[:n_in], rest[n_in:]


def attach(params: dict, axes: dict, *, rank: int, alpha: float, targets, seed: int = 0) -> tuple[dict, dict]:
  """(params, logical axes) of a model with rank-`rank` adapters on `targets`' kernels.

  A's rank axis and B's are unsharded; their other axes take the kernel's logical axes, so the
  adapters shard as their kernels do."""
  if rank < 1:
    raise ValueError(f"lora.rank={rank}: must be >= 1 to attach adapters")
  kernels = _kernels(params["layers"], targets)
  if not kernels:
    raise ValueError(f"lora.targets={list(targets)}: none of these kernels is in the model")
  layer_axes = 1 if "attn" in params["layers"] else 0
  keys = jax.random.split(jax.random.key(seed), len(kernels))
  adapters, adapter_axes = {}, {}
  for key, (path, w) in zip(keys, sorted(kernels.items(), key=lambda kv: str(kv[0]))):
    lead, ins, outs = _shapes(w.shape, path[2], layer_axes)
    bound = 1.0 / math.sqrt(math.prod(ins))  # peft: kaiming_uniform(a=sqrt(5)) on A
    a = jax.random.uniform(key, (*lead, *ins, rank), jnp.float32, -bound, bound)
    b = jnp.zeros((*lead, rank, *outs), jnp.float32)
    adapters[path] = {"a": a, "b": b}
    index, module, kernel = path
    kernel_axes = (axes["layers"] if index is None else axes["layers"][index])[module][kernel]
    k_lead, k_in, k_out = _shapes(kernel_axes, kernel, layer_axes)
    adapter_axes[path] = {"a": (*k_lead, *k_in, None), "b": (*k_lead, None, *k_out)}
  params = {**params, KEY: {"layers": _nest(adapters)}, SCALE: jnp.asarray(alpha / rank, jnp.float32)}
  axes = {**axes, KEY: {"layers": _nest(adapter_axes)}, SCALE: ()}
  return params, axes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Adapted:
  """A frozen kernel w with its adapter: used as w + a b (b already scaled by s)."""
  w: jax.Array   # [lead, in..., out...]
  a: jax.Array   # [lead, in..., r]
  b: jax.Array   # [lead, r, out...]

  def __getitem__(self, key):  # `param[...]` in the model reads the whole kernel
    if key is not Ellipsis:
      raise TypeError(f"an adapted kernel is read whole (param[...]), not at {key!r}")
    return self

  def reshape(self, *shape):
    """The kernel reshaped with its input axes merged or split among themselves (`o_kernel` as
    [H * K, D]): a's input axes follow, b's output axes follow."""
    w = self.w.reshape(*shape)
    n_in, size = 0, 1
    while size < math.prod(self.a.shape[:-1]):
      size *= w.shape[n_in]
      n_in += 1
    if size != math.prod(self.a.shape[:-1]):
      raise ValueError(f"reshape {self.w.shape} -> {w.shape} mixes an adapted kernel's input and output axes")
    r = self.a.shape[-1]
    return Adapted(w, self.a.reshape(*w.shape[:n_in], r), self.b.reshape(r, *w.shape[n_in:]))


def _flat(layers: dict) -> dict:
  """The nested layers dict of adapters -> {(index | None, module, kernel): {"a", "b"}}."""
  if "attn" in layers or "mlp" in layers:
    return {(None, m, k): ab for m, kernels in layers.items() for k, ab in kernels.items()}
  return {(i, m, k): ab for i, block in layers.items() for m, kernels in block.items() for k, ab in kernels.items()}


def per_layer(tree: dict):
  """(layer index, module, kernel, a, b) of every adapter in a params dict holding `KEY`; stacked
  adapters (scan_layers) are given one layer at a time."""
  for (index, module, kernel), ab in sorted(_flat(tree[KEY]["layers"]).items(), key=lambda kv: str(kv[0])):
    if index is not None:
      yield index, module, kernel, ab["a"], ab["b"]
    else:
      for i in range(ab["a"].shape[0]):
        yield i, module, kernel, ab["a"][i], ab["b"][i]


def delta(w, kernel: str, layer_axes: int, a, b, scale):
  """s A B in the shape of the kernel `w` (float32): A [lead, in..., r], B [lead, r, out...]."""
  lead, ins, outs = _shapes(w.shape, kernel, layer_axes)
  r = a.shape[-1]
  product = jnp.matmul(a.reshape(*lead, math.prod(ins), r), b.reshape(*lead, r, math.prod(outs)),
                       precision=jax.lax.Precision.HIGHEST)
  return scale * product.reshape(w.shape)


def _with_kernels(tree, new_kernel):
  """`tree` with every dict holding adapters replaced by its model's params, each targeted
  kernel w replaced by new_kernel(w, kernel name, layer axes, a, b, s)."""
  if not isinstance(tree, dict):
    return tree
  if KEY not in tree:
    return {k: _with_kernels(v, new_kernel) for k, v in tree.items()}
  model = {k: v for k, v in tree.items() if k not in (KEY, SCALE)}
  layers = jax.tree.map(lambda x: x, model["layers"])  # a copy to write the new kernels into
  layer_axes = 1 if "attn" in layers else 0
  for (index, module, kernel), ab in _flat(tree[KEY]["layers"]).items():
    block = layers if index is None else layers[index]
    new = new_kernel(block[module][kernel], kernel, layer_axes, ab["a"], ab["b"], tree[SCALE])
    block[module] = {**block[module], kernel: new}
  return {**model, "layers": layers}


def adapted(tree):
  """Params with every dict holding adapters replaced by its model's params whose targeted
  kernels are `Adapted` (the loss's view: the frozen weights are read, never copied)."""
  return _with_kernels(tree, lambda w, kernel, layer_axes, a, b, scale: Adapted(w, a, scale * b))


def merged(tree, cast: bool = False):
  """Params with every dict holding adapters replaced by its model's own params, W + s A B.

  The merged kernels are float32 (a bfloat16 model's small updates would round away);
  `cast=True` gives them the model's dtype again, for export."""
  def merge(w, kernel, layer_axes, a, b, scale):
    new = w.astype(jnp.promote_types(w.dtype, jnp.float32)) + delta(w, kernel, layer_axes, a, b, scale)
    return new.astype(w.dtype) if cast else new
  return _with_kernels(tree, merge)


def trainable(tree):
  """The part of params the optimizer updates (a pruned copy of the dicts): in a dict holding
  adapters, the adapters and any TRAINED_BESIDE head; elsewhere everything."""
  if not isinstance(tree, dict):
    return tree
  if KEY in tree:
    return {k: tree[k] for k in (KEY, *TRAINED_BESIDE) if k in tree}
  return {k: trainable(v) for k, v in tree.items()}


def with_trainable(tree, part):
  """`tree` with its trainable part replaced by `part` (what `trainable` returned, updated)."""
  if not isinstance(tree, dict):
    return part
  if KEY in tree:
    return {**tree, **part}
  return {k: with_trainable(v, part[k]) for k, v in tree.items()}


def without_adapters(tree):
  """The model's own params of a dict holding adapters (its frozen weights, shared, not copied)."""
  return {k: v for k, v in tree.items() if k not in (KEY, SCALE)}


def has_adapters(tree) -> bool:
  if not isinstance(tree, dict):
    return False
  return KEY in tree or any(has_adapters(v) for v in tree.values())


def count(tree) -> int:
  """Number of scalars in a params tree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
