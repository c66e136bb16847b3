"""LoRA adapters on the InternLM2 projections, applied inside the one `model.forward` (no second model).

Shapes: L layers, E embed, F mlp, V vocab, H query heads, K kv heads, G = H / K, D head_dim, r rank.

  target  base weight (param_specs)  a (input side)   b (output side)      HF module (PEFT name stem)
  wqkv    [L, E, K, G + 2, D]        [L, E, r]        [L, r, K, G + 2, D]  model.layers.{i}.attention.wqkv
  wo      [L, H, D, E]               [L, H, D, r]     [L, r, E]            model.layers.{i}.attention.wo
  w1, w3  [L, E, F]                  [L, E, r]        [L, r, F]            model.layers.{i}.feed_forward.w1 / w3
  w2      [L, F, E]                  [L, F, r]        [L, r, E]            model.layers.{i}.feed_forward.w2
  output  [E, V]                     [E, r]           [r, V]               output

Every base weight is laid out [input dims..., output dims...], so the update is W' = W + (alpha / r) * a @ b,
contracting r. `a` starts uniform(+-1/sqrt(fan_in)) (PEFT's kaiming-uniform bound), `b` zero, so a fresh adapter
leaves the model unchanged. Adapter leaves carry the logical axes of the dims they share with their base weight,
so they shard like it.

How it runs inside the forward. `apply_lora` swaps each targeted leaf for a `LoraWeight` pytree node (base, a,
b). model.py applies every layer projection through `layers.project(spec, x, w, dtype)`, which for a LoraWeight
computes einsum(x, W) + s * (x a) b: no merged weight and no weight-sized gradient is built (the base is behind
`stop_gradient` and is not an argument of the differentiated function in `train.finetune_step`), per layer inside
the layer scan (a scan slices every leaf, including a and b). A quantized base (`quant_nf4.QuantizedWeight`) is
decoded per layer in groups and again in the backward, never saved (quant_nf4_ops.quantized_einsum). The output
head and anything else that reads a weight with `w.astype(compute_dtype)` gets the merged W + s * a @ b instead
(the same numbers). LoRA dropout (on the adapter's input activations, as PEFT) applies when `apply_lora` gets a
dropout key, which the SFT step derives from the state's key and step; with gradient accumulation the
micro-batches of a step share their masks.

PEFT export (lora_io.py): torch Linear weights are [out, in], so lora_A.weight = a[i] viewed [in, r], transposed
([r, in]) and lora_B.weight = b[i] viewed [r, out], transposed ([out, r]); the flattening orders are those of
hf_io (wqkv rows grouped per kv head; wo columns head-major).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.model import ParamSpec, param_specs
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules

Params = dict[str, Any]

# target -> (path in the params tree, input dims, output dims (both after the layer axis), HF module stem)
TARGETS: dict[str, tuple[tuple[str, ...], int, int, str]] = {
    "wqkv": (("layers", "wqkv"), 1, 3, "model.layers.{i}.attention.wqkv"),
    "wo": (("layers", "wo"), 2, 1, "model.layers.{i}.attention.wo"),
    "w1": (("layers", "w1"), 1, 1, "model.layers.{i}.feed_forward.w1"),
    "w2": (("layers", "w2"), 1, 1, "model.layers.{i}.feed_forward.w2"),
    "w3": (("layers", "w3"), 1, 1, "model.layers.{i}.feed_forward.w3"),
    "output": (("output",), 1, 1, "output"),
}


class LoraError(ValueError):
  """An adapter config, adapter folder or adapter tree that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (scale = alpha / r as in PEFT), dropout (on the adapter inputs in SFT steps), target modules.

  The default targets are every projection, output head included: XTuner's `target_modules=None` adapts every
  Linear but `lm_head`, and InternLM2's head is named `output`.
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("wqkv", "wo", "w1", "w2", "w3", "output")

  def __post_init__(self):
    targets = tuple(self.targets)
    if not targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
      raise LoraError(f"LoRA targets must be distinct names from {list(TARGETS)}, got {list(targets)}")
    object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # one canonical order
    if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
      raise LoraError(f"LoRA needs rank >= 1 and 0 <= dropout < 1, got rank={self.rank}, dropout={self.dropout}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _with(tree, path, value):
  """A shallow copy of `tree` with the leaf at `path` replaced (the input tree is not modified)."""
  tree = dict(tree)
  tree[path[0]] = value if len(path) == 1 else _with(tree.get(path[0], {}), path[1:], value)
  return tree


def lora_specs(config: ModelConfig, lcfg: LoraConfig) -> Params:
  """ParamSpecs of the adapter tree {..path..: {"a": spec, "b": spec}}, mirroring the params tree."""
  base = param_specs(config)
  out: Params = {}
  for name in lcfg.targets:
    path, n_in, _, _ = TARGETS[name]
    spec = _get(base, path)
    lead = 1 if path[0] == "layers" else 0
    cut = lead + n_in
    a = ParamSpec(spec.shape[:cut] + (lcfg.rank,), spec.logical_axes[:cut] + (None,), "uniform")
    b = ParamSpec(spec.shape[:lead] + (lcfg.rank,) + spec.shape[cut:],
                  spec.logical_axes[:lead] + (None,) + spec.logical_axes[cut:], "zeros")
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = {"a": a, "b": b}
  return out


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def lora_shardings(config: ModelConfig, lcfg: LoraConfig, mesh, rules: ShardingRules = DEFAULT_RULES) -> Params:
  return jax.tree.map(lambda s: rules.sharding(mesh, s.logical_axes), lora_specs(config, lcfg), is_leaf=_is_spec)


def init_lora(config: ModelConfig, lcfg: LoraConfig, key: jax.Array, mesh=None,
              rules: ShardingRules = DEFAULT_RULES, dtype=jnp.float32) -> Params:
  """A random, B zero; float32 adapters (they are the trained weights), born sharded on `mesh` if given."""
  specs = lora_specs(config, lcfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)

  def make(key):
    out = []
    for k, spec in zip(jax.random.split(key, len(leaves)), leaves):
      if spec.init == "zeros":
        out.append(jnp.zeros(spec.shape, dtype))
      else:
        lead = 1 if spec.logical_axes[0] == "layers" else 0
        bound = 1.0 / math.sqrt(math.prod(spec.shape[lead:-1]))
        out.append(jax.random.uniform(k, spec.shape, dtype, -bound, bound))
    return jax.tree.unflatten(treedef, out)

  shardings = None if mesh is None else lora_shardings(config, lcfg, mesh, rules)
  return jax.jit(make, out_shardings=shardings)(key)


# ---- the update ----------------------------------------------------------------------------------------------
def lora_delta(a: jax.Array, b: jax.Array, scale: float, n_out: int) -> jax.Array:
  """scale * a @ b contracting r, float32, shaped [*lead, *in_dims, *out_dims] (see the table above).

  a [*lead, *in, r], b [*lead, r, *out] with n_out output dims; lead is the layer axis or nothing (a scan slices
  it away from both), so it is read off the shapes.
  """
  r = a.shape[-1]
  n_lead = b.ndim - n_out - 1
  chex.assert_equal(b.shape[n_lead], r)
  lead, ins, outs = a.shape[:n_lead], a.shape[n_lead:-1], b.shape[n_lead + 1:]
  a2 = a.astype(jnp.float32).reshape(lead + (math.prod(ins), r))
  b2 = b.astype(jnp.float32).reshape(lead + (r, math.prod(outs)))
  return (scale * jnp.matmul(a2, b2)).reshape(lead + ins + outs)


def _merged(w, a, b, scale, n_out, dtype):
  return (w.astype(jnp.float32) + lora_delta(a, b, scale, n_out)).astype(dtype)


@jax.tree_util.register_pytree_node_class
class LoraWeight:
  """A frozen base weight (an array or a quantized weight) plus its adapter; `.astype(d)` is the merged weight.

  Leaves: base (or its quantized leaves), a, b, and an optional dropout key (one per layer for stacked weights,
  so a layer scan slices it like the weights). Static: scale, the number of output dims of the base, the rate.
  """

  def __init__(self, base, a, b, scale: float, n_out: int, dropout_key=None, dropout: float = 0.0):
    self.base, self.a, self.b, self.scale, self.n_out = base, a, b, float(scale), int(n_out)
    self.dropout_key, self.dropout = dropout_key, float(dropout)

  def tree_flatten(self):
    return (self.base, self.a, self.b, self.dropout_key), (self.scale, self.n_out, self.dropout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    base, a, b, key = children
    scale, n_out, dropout = aux
    return cls(base, a, b, scale, n_out, dropout_key=key, dropout=dropout)

  @property
  def shape(self):
    return self.base.shape

  @property
  def dtype(self):
    return self.base.dtype

  def astype(self, dtype):
    """The merged weight (no dropout: it acts on activations, which a merged weight never sees)."""
    base = jax.lax.stop_gradient(self.base.astype(jnp.float32))
    return _merged(base, self.a, self.b, self.scale, self.n_out, dtype)

  def project(self, spec: str, x: jax.Array, dtype) -> jax.Array:
    """einsum(spec, x, merged weight) computed as x W + s (dropout(x) a) b (see layers.project): no merged
    weight and no gradient the size of W are ever built, so a step costs the base's forward and input gradients
    plus the adapters' small matmuls. x's trailing dims are the weight's input dims (every projection in
    model.py). Dropout (PEFT's lora_dropout) applies only on the adapter's input and only when a key is set."""
    if hasattr(self.base, "project"):  # a quantized base: decoded again in the backward, not saved (quant_nf4_ops)
      out = self.base.project(spec, x, dtype)
    else:
      out = jnp.einsum(spec, x, jax.lax.stop_gradient(self.base.astype(dtype)))
    n_in = len(self.base.shape) - self.n_out
    adapter_in = x
    if self.dropout_key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
      adapter_in = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    down = jnp.tensordot(adapter_in, self.a.astype(dtype), n_in)  # [..., r]
    delta = jnp.tensordot(down, self.b.astype(dtype), 1)  # [..., *out_dims]
    return out + (self.scale * delta).astype(out.dtype)

  def __repr__(self):
    return f"LoraWeight(base={self.base!r}, a={self.a.shape}, b={self.b.shape}, scale={self.scale})"


def _check_adapter(base: Params, lora: Params, lcfg: LoraConfig) -> None:
  for name in lcfg.targets:
    path, _, n_out, _ = TARGETS[name]
    try:
      node, w = _get(lora, path), _get(base, path)
    except (KeyError, TypeError):
      raise LoraError(f"adapter or params have no {'/'.join(path)} (targets {list(lcfg.targets)})") from None
    a, b = node["a"], node["b"]
    if a.shape[-1] != lcfg.rank or tuple(a.shape[:-1]) + tuple(b.shape[b.ndim - n_out:]) != tuple(w.shape):
      raise LoraError(f"adapter {'/'.join(path)} a {tuple(a.shape)} b {tuple(b.shape)} does not fit the weight "
                      f"{tuple(w.shape)} at rank {lcfg.rank}")


def apply_lora(base: Params, lora: Params, lcfg: LoraConfig, dropout_key: jax.Array | None = None) -> Params:
  """Params for `model.forward` whose targeted weights are LoraWeight nodes (never merged in the layers); every
  base leaf is behind stop_gradient, so differentiating through the result reaches only the adapters.

  `dropout_key` (a typed key) turns on `lcfg.dropout` on the adapters' inputs, with independent masks per target
  and per layer: pass it for training steps, never for evaluation. The output head, read merged, gets none.
  """
  _check_adapter(base, lora, lcfg)
  out = jax.tree.map(jax.lax.stop_gradient, base)  # the whole base is frozen, embedding and norms included
  for index, name in enumerate(lcfg.targets):
    path, _, n_out, _ = TARGETS[name]
    node, weight = _get(lora, path), _get(out, path)
    key = None
    if dropout_key is not None and lcfg.dropout > 0:
      key = jax.random.fold_in(dropout_key, index)
      if path[0] == "layers":
        key = jax.random.split(key, weight.shape[0])  # one key per layer: the layer scan slices it
    out = _with(out, path, LoraWeight(weight, node["a"], node["b"], lcfg.scale, n_out, dropout_key=key,
                                      dropout=lcfg.dropout))
  return out


def merge(base: Params, lora: Params, lcfg: LoraConfig) -> Params:
  """Plain params with W + s * a @ b in each targeted weight (in W's dtype): for export and serving."""
  _check_adapter(base, lora, lcfg)
  out = base
  for name in lcfg.targets:
    path, _, n_out, _ = TARGETS[name]
    w, node = _get(base, path), _get(lora, path)
    out = _with(out, path, _merged(w, node["a"], node["b"], lcfg.scale, n_out, w.dtype))
  return out


def unmerge(merged: Params, lora: Params, lcfg: LoraConfig) -> Params:
  """Inverse of `merge`: W' - s * a @ b (exact up to float rounding of the add and subtract)."""
  neg = lora
  for name in lcfg.targets:
    path = TARGETS[name][0]
    node = _get(lora, path)
    neg = _with(neg, path, {"a": node["a"], "b": -node["b"]})
  return merge(merged, neg, lcfg)


def trainable_count(lora: Params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))


def loraplus(tx, b_ratio: float):
  """LoRA+ (Hayou et al., 2024): the B matrices learn `b_ratio` times faster than the A matrices.

  `tx` turns gradients into final updates (learning rate included); the B leaves' updates are then scaled, which
  for a per-parameter optimizer (Adam) is a B learning rate of b_ratio * lr. With B starting at zero, A's gradient
  is zero at first and B alone moves the output, so plain LoRA moves slowly out of its initial plateau; the paper
  recommends a ratio of about 16. b_ratio = 1 returns `tx` unchanged.
  """
  import optax
  if b_ratio <= 0:
    raise LoraError(f"the LoRA+ ratio must be positive, got {b_ratio}")
  if b_ratio == 1.0:
    return tx
  is_b = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "b", tree)
  return optax.chain(tx, optax.masked(optax.scale(b_ratio), is_b))


def warn_if_dropout(lcfg: LoraConfig) -> None:
  """For trainers that do not pass a dropout key to apply_lora (DPO: the policy and its reference must see the
  same activations)."""
  if lcfg.dropout > 0:
    warnings.warn(f"LoRA dropout {lcfg.dropout} is recorded in the adapter config but not applied by this "
                  "trainer (see internlm_jax.lora.apply_lora)", stacklevel=3)
