"""InternLM2 forward passes over the paged KV cache, built from model.py's helpers on serving-layout weights.

Shapes: B slots, C chunk tokens, E embed, V vocab, H query heads, K kv heads, G = H / K, D head_dim,
P pages, ps page_size, pps pages per sequence (page-table width), n context pages gathered for a prefill chunk.

  serving_params: model params -> the same weights laid out for decoding (see below), once at engine start-up
  prefill_chunk: tokens [1, C] of one sequence at positions start .. start + C - 1 (the first n_valid real, the
                 rest padding), table [n] that sequence's first n pages -> logits [1, C, V], cache
  decode_step:   tokens [B] one per slot, lengths [B], page_table [B, w], active [B] -> logits [B, V], cache

Serving layout: "layers" is a tuple of per-layer dicts (XLA:CPU copies a weight sliced out of a stacked [L, ...]
array inside jit before every dot: 5x the bytes of a batch-1 step), and every matmul weight is 2-D [out, in],
contraction last, which XLA:CPU's dot reads fastest (up to 3x at batch 32 against [in, out]). Quantized weights
stay QArrays in the same [out, in] form; on one device they are dequantized a block of output rows at a time
(separate arrays, so XLA cannot merge the converts into one), so the float copy of a block stays in cache
instead of a whole dequantized matrix going through memory: XLA:CPU does not fuse an int8 -> float convert into
a dot (measured: 12 int8 [2048, 768] matvecs 4.9 ms whole, 1.2 ms in blocks, 2.1 ms for the float32 ones).
Better still, on one CPU device with float32 activations, int8 weights stay whole (native.qmatmul.Int8Weight,
packed once, with a scale per row, or per row and head for wo) and run on the native FFI kernel, which streams
the int8 bytes once (native/qmatmul.py; falls back to the blocks when it cannot be built). int4 keeps the
blocks. float32 weights become native.fmatmul.F32Weights there (packed once in strips of 64 outputs): every
step, decode and prefill, takes that native kernel (native/fmatmul.py). Where w1 and w3 are both native, they
are stacked into one weight "w13" (one call). Decode attention on one CPU device reads the pages in place
(native/decode_attention.py; the gather-based reference elsewhere). An int4 KV cache (packed pages with scales
and zero points) is read by the reference or the Pallas kernel, never the native kernel (float32 and int8 only).

Numerics follow model._block (same products, dtypes and rope), so paged logits equal `model.forward`.
Idle slots and padding tokens write their keys/values to the scratch page 0 and attend to nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from internlm_jax import attention as attention_lib
from internlm_jax import layers
from internlm_jax.config import ModelConfig
from internlm_jax.model import _embed
from internlm_jax.native import decode_attention as native_attention
from internlm_jax.native import fmatmul, qmatmul
from internlm_jax.quant import QArray
from internlm_jax.serve import adapters as adapters_lib
from internlm_jax.serve.kv_cache import SCRATCH_PAGE, PagedKVCache
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules, constrain
from kernels.paged_attention_reference import (dequantize_kv_int4, paged_attention_reference, quantize_kv,
                                               quantize_kv_int4)

# Matmul weight -> (permutation of its per-layer axes to [out..., in...], number of out axes, logical axes of the
# 2-D [out, in] form). The quantization groups split the last input axis (head_dim for wo).
_LAYOUT = {"wqkv": ((1, 2, 3, 0), 3, ("kv_heads", "embed")), "wo": ((2, 0, 1), 1, ("embed", "q_heads")),
           "w1": ((1, 0), 1, ("mlp", "embed")), "w3": ((1, 0), 1, ("mlp", "embed")),
           "w2": ((1, 0), 1, ("embed", "mlp")), "output": ((1, 0), 1, ("vocab", "embed"))}
_BLOCK_ELEMENTS = 1 << 18  # a quantized weight's row block: 1 MB dequantized (best measured at batch 1 and 32)


def _serving_weight(w, perm, n_out, blocks: bool = False, native: bool = False, native_f32: bool = False):
  """One per-layer weight -> [out, in] (dense) or a QArray with q [out, m, g], scale [out, m, 1]; with `native`
  an int8 one becomes an Int8Weight (q [out, in], a scale per row and quantization group); else with `blocks` a quantized one
  becomes a tuple of QArrays of consecutive rows, ~_BLOCK_ELEMENTS each."""
  if not isinstance(w, QArray):
    w = jnp.transpose(w, perm)
    w = w.reshape(math.prod(w.shape[:n_out]), -1)
    return fmatmul.pack(w) if native_f32 and w.dtype == jnp.float32 else w
  c = w.q.ndim + w.group_axis  # q's (groups, group) axes are c, c + 1; dense axis c is the contraction
  assert perm[-1] == c, "the quantized (contraction) axis must end up last"
  qperm = [a for d in perm for a in ((d,) if d < c else (c, c + 1) if d == c else (d + 1,))]
  q, scale = jnp.transpose(w.q, qperm), jnp.transpose(w.scale, qperm)
  out = math.prod(q.shape[:n_out])
  w = QArray(q.reshape(out, -1, q.shape[-1]), scale.reshape(out, -1, 1), -2)
  if native and w.q.dtype == jnp.int8 and qmatmul.group_ok(w.q.shape[2], w.q.shape[1] * w.q.shape[2]):
    return qmatmul.pack(w.q.reshape(out, -1), w.scale.reshape(out, -1))
  if not blocks:
    return w
  size = w.shape[1]
  rows = max(d for d in range(1, min(out, max(1, _BLOCK_ELEMENTS // size)) + 1) if out % d == 0)
  return tuple(QArray(w.q[i:i + rows], w.scale[i:i + rows], -2) for i in range(0, out, rows))


def _weight_sharding(w, logical, mesh, rules):
  out, inp = logical
  if not isinstance(w, QArray):
    return rules.sharding(mesh, logical)
  # wo's groups axis is (heads, groups of head_dim): it carries the heads' sharding; elsewhere groups are whole.
  mid = inp if out == "embed" and inp == "q_heads" else None
  return QArray(rules.sharding(mesh, (out, mid, None if mid else inp)), rules.sharding(mesh, (out, mid, None)), -2)


def serving_params(params, config: ModelConfig, mesh=None, rules: ShardingRules = DEFAULT_RULES):
  """Model params (stacked [L, ...] layers, float or quant.QArray weights) -> the serving layout: "layers" a tuple
  of per-layer dicts, matmul weights [out, in]. Without a mesh, quantized weights are split into row blocks
  (dequantized one at a time in `linear`) on CPU; on `mesh` or an accelerator they stay whole, and on `mesh`
  everything is placed with the weights' logical-axis shardings. Without a mesh, on CPU, with float32 activations, int8 weights become
  Int8Weights for the native kernel when it is available (`native_int8`), and float32 ones packed F32Weights
  for the native float32 kernel (`native_float32`)."""
  is_q = lambda x: isinstance(x, QArray)
  # Row blocks answer XLA:CPU's cache behaviour; on a GPU they would only multiply the launches (an H200 ran int8
  # weights in blocks at 0.6x the float32 speed, BENCHMARKS.md), so there each weight stays whole.
  stacked, blocks = params["layers"], mesh is None and jax.default_backend() == "cpu"
  native = native_int8(params, config, mesh)
  native_f32 = native_float32(config, mesh)

  @jax.jit
  def one_layer(stacked, i):
    layer = jax.tree.map(lambda w: w[i], stacked)
    return _fuse_gate_up({k: (_serving_weight(w, *_LAYOUT[k][:2], blocks, native, native_f32) if k in _LAYOUT else w)
                          for k, w in layer.items()})

  head = lambda w: _serving_weight(w, *_LAYOUT["output"][:2], blocks, native, native_f32)
  out = {"embed": params["embed"], "norm": params["norm"], "output": jax.jit(head)(params["output"]),
         "layers": tuple(one_layer(stacked, i) for i in range(config.num_layers))}
  if mesh is None:
    return out
  def sharding(path, w):
    name = path[-1].key if hasattr(path[-1], "key") else None
    if name in _LAYOUT:
      return _weight_sharding(w, _LAYOUT[name][2], mesh, rules)
    if name == "embed":
      return rules.sharding(mesh, ("vocab", "embed"))
    return rules.sharding(mesh, (None,) * w.ndim)
  shardings = jax.tree_util.tree_map_with_path(sharding, out, is_leaf=is_q)
  return jax.device_put(out, shardings)


def _fuse_gate_up(layer: dict) -> dict:
  """w1 and w3 stacked into one native weight "w13" ([2F, E]: one call on the same input instead of two;
  every output is computed exactly as in its own call), when both are native weights that stack."""
  w1, w3 = layer.get("w1"), layer.get("w3")
  if isinstance(w1, qmatmul.Int8Weight) and isinstance(w3, qmatmul.Int8Weight) and w1.shape == w3.shape:
    fused = qmatmul.concat([w1, w3])
  elif (isinstance(w1, fmatmul.F32Weight) and isinstance(w3, fmatmul.F32Weight) and w1.shape == w3.shape
        and w1.n % fmatmul.WIDTH == 0):
    fused = fmatmul.F32Weight(jnp.concatenate([w1.packed, w3.packed]), 2 * w1.n)
  else:
    return layer
  layer = {k: w for k, w in layer.items() if k not in ("w1", "w3")}
  layer["w13"] = fused
  return layer


def native_float32(config: ModelConfig, mesh=None) -> bool:
  """Whether `serving_params` packs float32 weights for the native float32 kernel (one device, float32)."""
  return mesh is None and jnp.dtype(config.dtype) == jnp.float32 and fmatmul.available()


def native_int8(params, config: ModelConfig, mesh=None) -> bool:
  """Whether `serving_params` gives int8 weights to the native kernel: one device (the kernel is
  not partitioned), float32 activations, int8 weights present, and the kernel built (compiled on first use)."""
  has_int8 = any(isinstance(x, QArray) and x.q.dtype == jnp.int8
                 for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))
  return (mesh is None and has_int8 and jnp.dtype(config.dtype) == jnp.float32 and qmatmul.available())


def linear(x, w, dtype):
  """x [..., in] times a serving-layout weight [out, in] (or a tuple of row blocks) -> [..., out]."""
  if isinstance(w, qmatmul.Int8Weight):
    if x.dtype == jnp.float32 and dtype == jnp.float32:
      return qmatmul.qmatmul(x, w)
    return jnp.einsum("...i,oi->...o", x, w.astype(dtype))
  if isinstance(w, tuple):  # blocks of a quantized weight: each dequantized copy stays in cache for its dot
    return jnp.concatenate([linear(x, block, dtype) for block in w], axis=-1)
  if isinstance(w, fmatmul.F32Weight) and dtype == jnp.float32:
    return fmatmul.linear(x, w)
  return jnp.einsum("...i,oi->...o", x, w.astype(dtype))


def _qkv(x, layer, config: ModelConfig, cos, sin, rules, route=None):
  """Pre-norm and fused projection, then rope: q [B, T, K, G, D], k and v [B, T, K, D]. `route` [B, 1, R]: each
  row's LoRA adapter (adapters.py), with the stacked adapters in layer["lora"]."""
  dtype = jnp.dtype(config.dtype)
  G, K, D = config.q_per_kv, config.num_kv_heads, config.head_dim
  h = layers.rms_norm(x, layer["attention_norm"], config.rms_norm_eps)
  qkv = adapters_lib.add_delta(linear(h, layer["wqkv"], dtype), h, layer.get("lora", {}), "wqkv", route)
  qkv = qkv.reshape(*h.shape[:2], K, G + 2, D)
  q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]
  q = layers.apply_rope(q, cos, sin)
  k = layers.apply_rope(k, cos, sin)
  q = constrain(q, ("batch", "seq", "kv_heads", None, "head_dim"), rules)
  return q, k, v


def _finish(x, out, layer, config: ModelConfig, rules, route=None):
  """Output projection of attention `out` [B, T, H, D], residual, then the SwiGLU half of the block."""
  dtype = jnp.dtype(config.dtype)
  pairs = layer.get("lora", {})
  mm = lambda v, name: adapters_lib.add_delta(linear(v, layer[name], dtype), v, pairs, name, route)
  out = out.reshape(*out.shape[:2], -1)
  x = x + mm(out, "wo")
  x = constrain(x, ("batch", "seq", "embed"), rules)
  h = layers.rms_norm(x, layer["ffn_norm"], config.rms_norm_eps)
  h = constrain(h, ("batch", "seq", "embed"), rules)
  if "w13" in layer:
    gate, up = jnp.split(linear(h, layer["w13"], dtype), 2, axis=-1)
    gate = adapters_lib.add_delta(gate, h, pairs, "w1", route)
    up = adapters_lib.add_delta(up, h, pairs, "w3", route)
  else:
    gate, up = mm(h, "w1"), mm(h, "w3")  # as layers.swiglu
  hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(h.dtype)
  x = x + mm(hidden, "w2")
  return constrain(x, ("batch", "seq", "embed"), rules)


def _head(params, x, config: ModelConfig, rules, route=None):
  x = layers.rms_norm(x, params["norm"], config.rms_norm_eps)
  if x.dtype == jnp.float32:
    logits = linear(x, params["output"], x.dtype)
  else:  # as model._head: float32 accumulation
    ws = params["output"] if isinstance(params["output"], tuple) else (params["output"],)
    logits = jnp.concatenate([jnp.einsum("bte,ve->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
                              for w in ws], axis=-1)
  if "lora_output" in params:
    logits = adapters_lib.add_delta(logits, x, {"output": params["lora_output"]}, "output", route)
  return constrain(logits, ("batch", "seq", "vocab"), rules)


def _write(cache: PagedKVCache, i: int, k, v, page_ids, offsets) -> PagedKVCache:
  """Stores k, v [N, K, D] at (page_ids[n], offsets[n]) of layer i (quantizing per token for int8 and int4)."""
  def put(name, new):
    layers = list(getattr(cache, name))
    layers[i] = layers[i].at[:, page_ids, offsets].set(jnp.swapaxes(new, 0, 1).astype(layers[i].dtype))
    return tuple(layers)

  if cache.int4:
    (kq, k_scale, k_zero), (vq, v_scale, v_zero) = quantize_kv_int4(k), quantize_kv_int4(v)
    new = {"k": kq, "v": vq, "k_scale": k_scale, "v_scale": v_scale, "k_zero": k_zero, "v_zero": v_zero}
  elif cache.quantized:
    (kq, k_scale), (vq, v_scale) = quantize_kv(k), quantize_kv(v)
    new = {"k": kq, "v": vq, "k_scale": k_scale, "v_scale": v_scale}
  else:
    new = {"k": k, "v": v}
  return dataclasses.replace(cache, **{name: put(name, x) for name, x in new.items()})


def _gather(cache: PagedKVCache, i: int, table, num_tokens, dtype):
  """Dense k, v [1, n * ps, K, D] of one sequence's first n pages; slots at or past num_tokens are zeroed so
  whatever a stale or scratch page holds cannot reach the output (0 * NaN would)."""
  def dense(pages, scales, zeros):
    x = pages[:, table]  # [K, n, ps, D] (int4: D // 2 packed bytes)
    if zeros is not None:
      x = dequantize_kv_int4(x, scales[:, table], zeros[:, table])
    elif scales is not None:
      x = x.astype(jnp.float32) * scales[:, table][..., None]
    K, n, ps, D = x.shape
    x = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, n * ps, K, D)
    keep = jnp.arange(n * ps) < num_tokens
    return jnp.where(keep[None, :, None, None], x, 0).astype(dtype)

  k_scale, v_scale, k_zero, v_zero = _aux(cache, i)
  return dense(cache.k[i], k_scale, k_zero), dense(cache.v[i], v_scale, v_zero)


def _aux(cache: PagedKVCache, i: int):
  """Layer i's (k_scale, v_scale, k_zero, v_zero), None where the cache has none."""
  pick = lambda arrays: None if arrays is None else arrays[i]
  return pick(cache.k_scale), pick(cache.v_scale), pick(cache.k_zero), pick(cache.v_zero)


def prefill_chunk(params, cache: PagedKVCache, tokens, start, n_valid, table, *, config: ModelConfig,
                  rules: ShardingRules | None, head_at=None, adapter_id=None):
  """Appends one chunk of a sequence to its pages and returns (logits [1, C, V] float32, cache).

  With `head_at` (an int32 chunk index) the output head runs on that position only: logits [1, 1, V]. The head
  is a quarter of a ~125M model's prefill FLOPs, and serving needs only the last prompt token's logits.
  `adapter_id` (int32; 0 the base) picks a LoRA adapter when params carry stacked ones (adapters.attach).

  `params` are in the serving layout (`serving_params`). Queries see every earlier position of the sequence (cached prefix pages, earlier chunks) and the chunk itself
  causally. The dynamic-NTK base follows the length reached at the end of the chunk, as the dense cache does.
  """
  chex.assert_rank([tokens, table], [2, 1])
  chex.assert_axis_dimension(tokens, 0, 1)
  C = tokens.shape[1]
  ps = cache.page_size
  dtype = jnp.dtype(config.dtype)
  t = jnp.arange(C, dtype=jnp.int32)
  positions = (start + t)[None, :]
  valid = t < n_valid
  end = start + n_valid
  cos, sin = layers.rope_angles(config, positions, end)
  page_ids = jnp.where(valid, table[jnp.minimum(positions[0] // ps, table.shape[0] - 1)], SCRATCH_PAGE)
  offsets = jnp.where(valid, positions[0] % ps, 0)
  # Past a few thousand context slots the dense score matrix [C, n * ps] per head gets large: the blockwise
  # kernel reads only the kv blocks up to the chunk's last position.
  long_context = table.shape[0] * ps > 2048
  impl = "blockwise" if config.attention_impl == "blockwise" or long_context else "xla"
  options = {"block_size": config.attention_block_size} if impl == "blockwise" else {}
  route = adapters_lib.route(params, None if adapter_id is None else jnp.reshape(adapter_id, (1,)), dtype)
  x = _embed(params, tokens, config, rules)
  for i in range(config.num_layers):
    layer = params["layers"][i]
    q, k, v = _qkv(x, layer, config, cos, sin, rules, route)
    cache = _write(cache, i, k[0], v[0], page_ids, offsets)
    kc, vc = _gather(cache, i, table, end, dtype)
    out = attention_lib.attend(q, kc, vc, positions, impl=impl, **options)
    x = _finish(x, out.reshape(1, C, config.num_heads, config.head_dim), layer, config, rules, route)
  if head_at is not None:
    x = jax.lax.dynamic_slice_in_dim(x, head_at, 1, axis=1)
  return _head(params, x, config, rules, route), cache


def _decode_attention(q, k_pages, v_pages, table, lengths, k_scale, v_scale, k_zero=None, v_zero=None, *,
                      use_kernel: bool, native: bool = False):
  if use_kernel:
    from kernels.paged_attention import paged_attention
    return paged_attention(q, k_pages, v_pages, table, lengths, k_scale, v_scale, k_zero, v_zero)
  # The native kernel reads float32 and int8 pages only: it would take packed int4 bytes for values.
  if native and k_zero is None and native_attention.available() and native_attention.supports(q, k_pages):
    return native_attention.decode_attention(q, k_pages, v_pages, table, lengths, k_scale, v_scale).astype(q.dtype)
  return paged_attention_reference(q, k_pages, v_pages, table, lengths, k_scale, v_scale, k_zero, v_zero)


def decode_attention(q, cache: PagedKVCache, i: int, table, lengths, *, use_kernel: bool, mesh=None,
                     rules: ShardingRules | None = None):
  """q [B, H, D] over layer i's pages -> [B, H, D]. On a mesh whose kv-head axis is split, each device runs the
  attention of its own heads (shard_map): queries of kv group k are heads k*G .. k*G + G - 1, so splitting H and
  K the same way keeps every group with its keys."""
  scales = _aux(cache, i) if cache.int4 else _aux(cache, i)[:2]
  fn = functools.partial(_decode_attention, use_kernel=use_kernel)
  axis = None if rules is None else rules.kv_heads
  if mesh is None:  # one device on CPU: the native kernel reads the pages in place (native/decode_attention.py)
    return fn(q, cache.k[i], cache.v[i], table, lengths, *scales, native=True)
  if axis is None or all(mesh.shape[a] == 1 for a in ((axis,) if isinstance(axis, str) else axis)):
    return fn(q, cache.k[i], cache.v[i], table, lengths, *scales)
  heads, pages, scale = P(None, axis, None), P(axis, None, None, None), P(axis, None, None)
  scale_specs = tuple(None if s is None else scale for s in scales)
  return jax.shard_map(fn, mesh=mesh, in_specs=(heads, pages, pages, P(), P()) + scale_specs, out_specs=heads,
                       check_vma=False)(q, cache.k[i], cache.v[i], table, lengths, *scales)


def decode_step(params, cache: PagedKVCache, tokens, lengths, page_table, active, *, config: ModelConfig,
                rules: ShardingRules | None, mesh=None, use_kernel: bool = False, adapter_ids=None):
  """One token per slot: writes its key/value at position lengths[b] and returns (logits [B, V], cache).

  `params` are in the serving layout (`serving_params`). The page table may be narrower than pages_per_seq: it
  needs only the pages that hold each active slot's tokens, this step's included (attention reads all of them).

  Inactive slots write to the scratch page and attend to nothing; their logits are meaningless. `adapter_ids`
  [B] int32 (0: the base) picks each slot's LoRA adapter when params carry stacked ones (adapters.attach).
  """
  chex.assert_rank([tokens, lengths, page_table, active], [1, 1, 2, 1])
  B = tokens.shape[0]
  chex.assert_shape([lengths, active], (B,))
  chex.assert_axis_dimension(page_table, 0, B)
  ps = cache.page_size
  positions = lengths[:, None]
  cos, sin = layers.rope_angles(config, positions, lengths + 1)
  rows = jnp.arange(B)
  page_ids = jnp.where(active, page_table[rows, jnp.minimum(lengths // ps, page_table.shape[1] - 1)], SCRATCH_PAGE)
  offsets = jnp.where(active, lengths % ps, 0)
  attend_len = jnp.where(active, lengths + 1, 0)
  route = adapters_lib.route(params, adapter_ids, jnp.dtype(config.dtype))
  x = _embed(params, tokens[:, None], config, rules)
  for i in range(config.num_layers):
    layer = params["layers"][i]
    q, k, v = _qkv(x, layer, config, cos, sin, rules, route)
    cache = _write(cache, i, k[:, 0], v[:, 0], page_ids, offsets)
    q = q.reshape(B, config.num_heads, config.head_dim)
    out = decode_attention(q, cache, i, page_table, attend_len, use_kernel=use_kernel, mesh=mesh, rules=rules)
    x = _finish(x, out.reshape(B, 1, config.num_heads, config.head_dim), layer, config, rules, route)
  return _head(params, x, config, rules, route)[:, 0], cache
