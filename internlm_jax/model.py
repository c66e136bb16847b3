"""InternLM2 as pure functions: weight declarations, init, forward and a cached decode path.

Shapes: B batch, T tokens, S cache slots, L layers, E embed, V vocab, F mlp, H query heads, K kv heads,
G = H / K query heads per kv head, D head_dim.

Params (layers stacked on a leading L axis whether or not the forward scans):
  embed [V, E]                          output [E, V]                     norm [E]
  layers/attention_norm [L, E]          layers/ffn_norm [L, E]
  layers/wqkv [L, E, K, G + 2, D]       (slots 0..G-1 queries of group k, G the key, G + 1 the value)
  layers/wo   [L, H, D, E]              (query head h = k * G + j)
  layers/w1, w3 [L, E, F]               layers/w2 [L, F, E]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from internlm_jax import attention as attention_lib
from internlm_jax import layers
from internlm_jax.config import ModelConfig
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules, check_divisible, constrain

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  logical_axes: tuple[str | None, ...]
  init: str  # "normal" or "ones"


def param_specs(config: ModelConfig) -> Params:
  """Every weight declared once: shape, logical axes and init. Init, sharding and HF I/O all derive from this."""
  c = config
  L, E, V, F = c.num_layers, c.hidden_size, c.vocab_size, c.intermediate_size
  H, K, G, D = c.num_heads, c.num_kv_heads, c.q_per_kv, c.head_dim
  return {
      "embed": ParamSpec((V, E), ("vocab", "embed"), "normal"),
      "layers": {
          "attention_norm": ParamSpec((L, E), ("layers", None), "ones"),
          "wqkv": ParamSpec((L, E, K, G + 2, D), ("layers", "embed", "kv_heads", None, "head_dim"), "normal"),
          "wo": ParamSpec((L, H, D, E), ("layers", "q_heads", "head_dim", "embed"), "normal"),
          "ffn_norm": ParamSpec((L, E), ("layers", None), "ones"),
          "w1": ParamSpec((L, E, F), ("layers", "embed", "mlp"), "normal"),
          "w3": ParamSpec((L, E, F), ("layers", "embed", "mlp"), "normal"),
          "w2": ParamSpec((L, F, E), ("layers", "mlp", "embed"), "normal"),
      },
      "norm": ParamSpec((E,), (None,), "ones"),
      "output": ParamSpec((E, V), ("embed", "vocab"), "normal"),
  }


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def param_shardings(config: ModelConfig, mesh, rules: ShardingRules = DEFAULT_RULES) -> Params:
  """NamedSharding per weight; raises a ShardingError naming the weight if a dimension does not divide."""
  def one(path, spec):
    check_divisible(mesh, rules, spec.shape, spec.logical_axes, f"weight {jax.tree_util.keystr(path)}")
    return rules.sharding(mesh, spec.logical_axes)
  return jax.tree_util.tree_map_with_path(one, param_specs(config), is_leaf=_is_spec)


def abstract_params(config: ModelConfig, mesh=None, rules: ShardingRules = DEFAULT_RULES) -> Params:
  """ShapeDtypeStructs of the params (with shardings when a mesh is given); allocates nothing."""
  dtype = jnp.dtype(config.param_dtype)
  specs = param_specs(config)
  shardings = param_shardings(config, mesh, rules) if mesh is not None else jax.tree.map(
      lambda _: None, specs, is_leaf=_is_spec)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), specs, shardings,
                      is_leaf=_is_spec)


def init_params(config: ModelConfig, key: jax.Array, mesh=None, rules: ShardingRules = DEFAULT_RULES) -> Params:
  """Random params N(0, initializer_range) for matrices, ones for norms; created directly sharded on `mesh`."""
  specs = param_specs(config)
  dtype = jnp.dtype(config.param_dtype)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)

  def make(key):
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, spec in zip(keys, leaves):
      if spec.init == "ones":
        out.append(jnp.ones(spec.shape, dtype))
      else:
        out.append((config.initializer_range * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)

  if mesh is None:
    return jax.jit(make)(key)
  return jax.jit(make, out_shardings=param_shardings(config, mesh, rules))(key)


# ---- remat -------------------------------------------------------------------------------------------------------
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names("qkv", "attention_out"),
    "save_block_io": jax.checkpoint_policies.save_only_these_names("block_input"),
    # "full", and inside the recomputed block the attention half and the MLP half are checkpointed again: the
    # backward recomputes the block only up to the MLP's input, then each half just before its own backward, so
    # the attention's recomputed activations are not live during the MLP's backward. The attention forward runs
    # once more per step. QLoRA r64 at 331M: 1.120 -> 1.105 bytes per parameter, not slower (BENCHMARKS.md).
    "full_split": jax.checkpoint_policies.nothing_saveable,
}
NESTED_REMAT = ("full_split",)


def _maybe_remat(fn, policy_name: str):
  if policy_name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {policy_name!r}; choose one of {sorted(REMAT_POLICIES)}")
  if policy_name == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=False)


# ---- forward -----------------------------------------------------------------------------------------------------
def _block(x, layer, *, config: ModelConfig, cos, sin, q_index, segment_ids, rules, cache_kv=None, write_index=None):
  """One pre-norm decoder block. With `cache_kv` (k, v [B, S, K, D]) new keys/values are written at
  `write_index` [B] and attention reads the whole cache; returns (x, (k, v) or None)."""
  dtype = jnp.dtype(config.dtype)
  G = config.q_per_kv

  def attention_half(x, layer, cache_kv):
    x = checkpoint_name(x, "block_input")
    h = layers.rms_norm(x, layer["attention_norm"], config.rms_norm_eps)
    qkv = layers.project("bte,ekgd->btkgd", h, layer["wqkv"], dtype)
    qkv = checkpoint_name(qkv, "qkv")
    q, k, v = layers.split_qkv(qkv, G)
    q = layers.apply_rope(q, cos, sin)
    k = layers.apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "seq", "kv_heads", None, "head_dim"), rules)
    new_cache = None
    kv_segments = segment_ids
    if cache_kv is not None:
      cache_k, cache_v = cache_kv
      write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new, i, axis=0))
      k = write(cache_k, k.astype(cache_k.dtype), write_index)
      v = write(cache_v, v.astype(cache_v.dtype), write_index)
      new_cache = (k, v)
      k, v = k.astype(dtype), v.astype(dtype)
      kv_segments = None
    impl = config.attention_impl
    if cache_kv is not None and impl in ("chunked", "cudnn"):
      impl = "xla"  # both assume key slot t holds query t: true without a cache only
    out = attention_lib.attend(q, k, v, q_index, segment_ids, kv_segments, impl=impl,
                               **_attention_options(config.replace(attention_impl=impl)))
    out = checkpoint_name(out, "attention_out")
    B, T = out.shape[:2]
    out = out.reshape(B, T, config.num_heads, config.head_dim)
    x = x + layers.project("bthd,hde->bte", out, layer["wo"], dtype)
    x = constrain(x, ("batch", "seq", "embed"), rules)
    return x, new_cache

  def mlp_half(x, layer):
    h = layers.rms_norm(x, layer["ffn_norm"], config.rms_norm_eps)
    h = constrain(h, ("batch", "seq", "embed"), rules)
    x = x + layers.mlp(h, layer["w1"], layer["w3"], layer["w2"], dtype)
    x = constrain(x, ("batch", "seq", "embed"), rules)
    return x

  if config.remat_policy in NESTED_REMAT and cache_kv is None:
    policy = REMAT_POLICIES[config.remat_policy]
    attention_half = jax.checkpoint(attention_half, policy=policy, prevent_cse=False)
    mlp_half = jax.checkpoint(mlp_half, policy=policy, prevent_cse=False)
  x, new_cache = attention_half(x, layer, cache_kv)
  return mlp_half(x, layer), new_cache


def _attention_options(config: ModelConfig) -> dict:
  if config.attention_impl == "blockwise":
    return {"block_size": config.attention_block_size}
  if config.attention_impl == "chunked":
    return {"chunk_size": config.attention_block_size}
  return {}


def _run_layers(x, params, config, block_fn, cache_layers=None):
  """Applies every layer with a lax.scan (config.scan_layers) or an unrolled loop; same params either way."""
  block_fn = _maybe_remat(block_fn, config.remat_policy)
  stacked = params["layers"]
  if config.scan_layers:
    def body(carry, xs):
      layer, kv = xs
      carry, new_kv = block_fn(carry, layer, kv)
      return carry, new_kv
    x, new_cache = jax.lax.scan(body, x, (stacked, cache_layers))
    return x, new_cache
  new = []
  for i in range(config.num_layers):
    layer = jax.tree.map(lambda w: w[i], stacked)
    kv = None if cache_layers is None else jax.tree.map(lambda c: c[i], cache_layers)
    x, new_kv = block_fn(x, layer, kv)
    new.append(new_kv)
  if cache_layers is None:
    return x, None
  return x, jax.tree.map(lambda *xs: jnp.stack(xs), *new)


def _embed(params, tokens, config, rules):
  x = jnp.take(params["embed"], tokens, axis=0).astype(jnp.dtype(config.dtype))
  return constrain(x, ("batch", "seq", "embed"), rules)


def _head(params, x, config, rules):
  x = layers.rms_norm(x, params["norm"], config.rms_norm_eps)
  logits = jnp.einsum("bte,ev->btv", x, params["output"].astype(x.dtype), preferred_element_type=jnp.float32)
  return constrain(logits, ("batch", "seq", "vocab"), rules)


def hidden_states(params: Params, tokens: jax.Array, config: ModelConfig, *, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None, rules: ShardingRules | None = DEFAULT_RULES) -> jax.Array:
  """Final-norm input [B, T, E] (before the output head); see `forward`."""
  chex.assert_rank(tokens, 2)
  B, T = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  else:
    chex.assert_shape(positions, (B, T))
  if segment_ids is not None:
    chex.assert_shape(segment_ids, (B, T))
  q_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  # HF computes the dynamic-NTK base from the number of key slots, whatever the position ids.
  cos, sin = layers.rope_angles(config, positions, T)
  block = functools.partial(_block, config=config, cos=cos, sin=sin, q_index=q_index, segment_ids=segment_ids,
                            rules=rules)
  x = _embed(params, tokens, config, rules)
  x, _ = _run_layers(x, params, config, lambda x, layer, kv: block(x, layer))
  return x


def forward(params: Params, tokens: jax.Array, config: ModelConfig, *, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None, rules: ShardingRules | None = DEFAULT_RULES) -> jax.Array:
  """Logits float32 [B, T, V] for int32 tokens [B, T].

  segment_ids [B, T]: packed documents attend only within their own id. positions [B, T]: rotary positions
  (restarting per document when packed); default arange(T). Activations are constrained by `rules` when called
  under `jax.set_mesh(mesh)`.
  """
  return _head(params, hidden_states(params, tokens, config, segment_ids=segment_ids, positions=positions,
                                     rules=rules), config, rules)


# ---- KV cache decode ---------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Dense per-slot cache: k, v [L, B, S, K, D]; lengths [B] tokens already written per row."""
  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def forward_with_cache(params: Params, tokens: jax.Array, config: ModelConfig, cache: KVCache, *,
                       rules: ShardingRules | None = DEFAULT_RULES) -> tuple[jax.Array, KVCache]:
  """Appends tokens [B, T] to each row's cache (prefill when T > 1, decode when T == 1).

  Returns logits float32 [B, T, V] and the updated cache. Logits equal `forward` on the whole sequence while it
  stays within max_position_embeddings; past it the dynamic-NTK base follows the total length at each call and
  cached keys keep their rotation, as in HF's cached generation.
  """
  chex.assert_rank(tokens, 2)
  B, T = tokens.shape
  chex.assert_shape(cache.lengths, (B,))
  positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  cos, sin = layers.rope_angles(config, positions, cache.lengths + T)
  block = functools.partial(_block, config=config, cos=cos, sin=sin, q_index=positions, segment_ids=None,
                            rules=rules, write_index=cache.lengths)
  x = _embed(params, tokens, config, rules)
  x, (new_k, new_v) = _run_layers(x, params, config, lambda x, layer, kv: block(x, layer, cache_kv=kv),
                                  cache_layers=(cache.k, cache.v))
  logits = _head(params, x, config, rules)
  return logits, KVCache(new_k, new_v, cache.lengths + T)
