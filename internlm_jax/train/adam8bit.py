"""AdamW with 8-bit moments: block-wise quantized optimizer state (Dettmers et al., 2022, "8-bit Optimizers via
Block-wise Quantization"; bitsandbytes' AdamW8bit). Opt in with OptimizerConfig(moments="int8").

    tx = adamw_8bit(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, mask=decay_mask)
    state = tx.init(params); updates, state = tx.update(grads, state, params)

Shapes: P a parameter leaf's shape, N = prod(P), B = block_size, K = ceil(N / B) blocks of the flattened leaf
(the last one zero-padded), S = the sum of K over the 8-bit leaves (at least 1).
  state.mu         per leaf: int8 [*P] codes of the first moment (signed map); float moments for a small leaf
  state.nu         per leaf: uint8 [*P] codes of the second moment (unsigned map); likewise
  state.mu_absmax  float32 [S]: one scale per block of every 8-bit leaf, leaves in tree-flatten order
  state.nu_absmax  float32 [S]
  state.count      int32 []
A moment element is code_map[code] * absmax[its block]: 2 + 8 / B bytes per parameter for both moments instead
of 8. Each update decodes, runs Adam in float32 (bias-corrected, as optax.scale_by_adam) and re-encodes to the
nearest code. Leaves under `min_8bit_size` elements (norm scales, biases) keep optax's float moments unchanged, as
bitsandbytes does: their memory is negligible and their statistics are the least uniform.

Why this layout: train.state.train_state_shardings gives every params-shaped tree in an optimizer state its
parameter's sharding (optax.tree_map_params), so codes shaped like the parameter shard exactly as the float32
moments did. A [K] scale array cannot take an [L, E, r] parameter's spec, so the scales of all leaves live in one
flat vector outside those trees (replicated: 4 / B bytes per parameter and moment). Orbax refuses zero-size
arrays, hence at least one entry. Every leaf is a plain array, so orbax saves and restores the state as is.
Under a mesh the update of an 8-bit leaf runs whole on every device (see _replicated): right for adapters; for
full fine-tuning of a large FSDP-sharded model, blocks aligned to the shards would be needed to avoid that.
The leaves are updated one at a time, each to its new parameter under adamw_8bit (see _adam_8bit_update).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

BLOCK_SIZE = 256        # bitsandbytes' block for 8-bit optimizer states
MIN_8BIT_SIZE = 4096    # bitsandbytes' min_8bit_size: smaller leaves keep float moments


@functools.lru_cache(maxsize=2)
def dynamic_code_map(signed: bool) -> np.ndarray:
  """The 256 values of the dynamic 8-bit data type, sorted ascending: in [-1, 1] signed, [0, 1] unsigned.

  After the sign bit (signed only), a code spends e zero bits and one indicator bit on a decimal exponent 10^-e
  (e = 0..6); the bits left form a linear fraction: 2^(6 - e) levels (2^(7 - e) unsigned, whose sign bit
  becomes a fraction bit) at the centres of equal bins of [0.1, 1]. So precision is finest near the block's
  absmax and the range still reaches ~3e-7 of it, which matters for Adam's second moment (squares span many
  decades). The all-zero code is exactly 0 (untouched and padded elements stay 0); one code is exactly 1.0.
  """
  top = 64 if signed else 128   # fraction levels of the first decade [0.1, 1]
  magnitudes = []
  for e in range(7):
    edges = np.linspace(0.1, 1.0, (top >> e) + 1)
    magnitudes.append(10.0 ** -e * (edges[:-1] + edges[1:]) / 2)
  mags = np.concatenate(magnitudes)                       # 127 signed, 254 unsigned
  values = np.concatenate([mags, -mags, [0.0, 1.0]] if signed else [mags, [0.0, 1.0]])
  assert values.size == 256, values.size
  return np.sort(values).astype(np.float32)


# Codes are indices into the sorted map; int8 codes are shifted by 128 so they fit (the signed map's 0.0 is at
# sorted index 127, code -1).
def _offset(signed: bool) -> int:
  return 128 if signed else 0


def _num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


def _replicated(x: jax.Array) -> jax.Array:
  """x gathered whole on every device when a mesh is active (inside jax.set_mesh); a no-op otherwise.

  Blocks run along the flattened leaf, so a block of a leaf sharded on a later dimension spans devices; XLA would
  otherwise replicate such leaves itself, with an "involuntary full rematerialization" warning per leaf. So an
  8-bit leaf's gradient and codes are gathered, its update runs whole on each device (float32 temporaries of the
  leaf's size), and each device keeps its shard of the results.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """[*P] -> [K, B], the flattened leaf zero-padded to whole blocks."""
  flat = _replicated(x).reshape(-1)
  k = _num_blocks(flat.size, block_size)
  return jnp.pad(flat, (0, k * block_size - flat.size)).reshape(k, block_size)


def _from_blocks(blocks: jax.Array, shape) -> jax.Array:
  """[K, B] -> [*P], dropping the padding."""
  return _replicated(blocks).reshape(-1)[:int(np.prod(shape))].reshape(shape)


# The nearest code without a binary search (jnp.searchsorted: 8 dependent gathers per element, which made the
# update of 12.8M adapter weights 1.2 s on 2 CPU cores instead of 0.06 s): a float32's bits, reordered so integer
# order is value order, pick one of 65027 buckets of 2^-8 relative width covering [-1, 1]; a table holds the
# number of code midpoints below each bucket, and as no bucket is wider than a gap between midpoints, one
# comparison with the next midpoint completes the count, which is the index of the nearest code.
_SHIFT = 15


def _order_key(bits):
  """float32 bits as int32 -> int32 ordered like the floats (negative floats have their magnitude bits flipped)."""
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


_LOWEST = int(_order_key(np.array([-1.0], np.float32).view(np.int32))[0]) >> _SHIFT


@functools.lru_cache(maxsize=2)
def _nearest_tables(signed: bool) -> tuple[np.ndarray, np.ndarray]:
  """(midpoints float32 [256] with +inf last, midpoints below each bucket uint8 [buckets over [-1, 1]])."""
  code_map = dynamic_code_map(signed)
  midpoints = (code_map[1:] + code_map[:-1]) / 2
  highest = int(_order_key(np.array([1.0], np.float32).view(np.int32))[0]) >> _SHIFT
  starts = _order_key(np.arange(_LOWEST, highest + 1, dtype=np.int32) << _SHIFT).view(np.float32)
  below = np.searchsorted(midpoints, starts, side="left")
  assert np.diff(below).max() <= 1, "a bucket holds two midpoints"
  return np.append(midpoints, np.float32(np.inf)), below.astype(np.uint8)


def nearest_code_index(y: jax.Array, signed: bool) -> jax.Array:
  """Index of the code nearest to each y in [-1, 1] (ties to the smaller); int32, same shape as y."""
  midpoints, below = _nearest_tables(signed)
  bucket = _order_key(jax.lax.bitcast_convert_type(y, jnp.int32)) >> _SHIFT
  count = jnp.asarray(below)[bucket - _LOWEST].astype(jnp.int32)
  return count + (jnp.asarray(midpoints)[count] < y).astype(jnp.int32)


def quantize_blocks(blocks: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
  """float [K, B] -> (codes int8 (signed) / uint8 [K, B], absmax float32 [K]); each element to its nearest code."""
  absmax = jnp.max(jnp.abs(blocks), axis=1).astype(jnp.float32)
  scaled = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]   # an all-zero block encodes as zeros
  index = nearest_code_index(jnp.clip(scaled, -1.0, 1.0), signed)
  return (index - _offset(signed)).astype(jnp.int8 if signed else jnp.uint8), absmax


def dequantize_blocks(codes: jax.Array, absmax: jax.Array) -> jax.Array:
  """codes int8 / uint8 [K, B] and absmax [K] -> float32 [K, B]; int8 codes use the signed map."""
  signed = codes.dtype == jnp.int8
  values = jnp.asarray(dynamic_code_map(signed))[codes.astype(jnp.int32) + _offset(signed)]
  return values * absmax[:, None]


def _fence(arrays, count: jax.Array) -> jax.Array:
  """A float32 zero that XLA can only compute after every array of `arrays` exists whole: a while loop that reads
  them and never iterates (count >= 1), so it cannot be hoisted, folded or fused with their producers. Adding it to
  the next leaf's inputs orders the leaves. Exact: it is 0.0 (were the loop to run, it would add x * 0 for
  finite x). The values themselves are used as computed (the loop only reads them): a loop output in their place
  made XLA compute the codes twice, and a plain slice of them (the `_decode_after` tie) split the code search
  in two fusions whose float32 gather results were materialized."""
  def body(carry):
    i, tie = carry
    for x in arrays:
      x = jax.lax.dynamic_slice(x, (i,) * x.ndim, (1,) * x.ndim)
      tie = tie + x.reshape(()).astype(jnp.float32) * 0.0
    return i + 1, tie
  return jax.lax.while_loop(lambda carry: carry[0] < 0, body, (count, jnp.zeros((), jnp.float32)))[1]


class ScaleByAdam8bitState(NamedTuple):
  count: jax.Array          # int32 []: updates so far (bias correction)
  mu: Any                   # params-shaped: int8 codes, or float moments for small leaves
  nu: Any                   # params-shaped: uint8 codes, or float moments for small leaves
  mu_absmax: jax.Array      # float32 [S]
  nu_absmax: jax.Array      # float32 [S]


def _adam_8bit_update(b1: float, b2: float, eps: float, eps_root: float, block_size: int):
  """update(updates, state, finish=None) -> (updates, state) of scale_by_adam_8bit.

  The 8-bit leaves are updated one after another (see `_fence`): leaf i + 1 decodes its moments only once leaf
  i's codes, scales and `finish(i, update)` (default: the update itself) exist, so the float32 temporaries of
  one leaf at a time are live. Left to itself XLA:CPU's memory scheduler computed every leaf's moments before it
  quantized any (QLoRA r64: 158 MiB of temporaries in the update, 74 MiB ordered, 49 of them the gradients).
  The arithmetic is unchanged, op for op, and so are the results, bit for bit. Slices of a leaf in a loop would
  bound the temporaries further but changed the last bit: LLVM contracts `a * b + c * d` into an FMA on either
  product depending on the kernel around it (the second moment's came out the other way).
  """
  def update(updates, state, finish=None):
    count = optax.safe_increment(state.count)

    def adam(g, m, v):  # optax.scale_by_adam's arithmetic, in the moments' dtype
      m = optax.tree.update_moment(g, m, b1, 1)
      v = optax.tree.update_moment_per_elem_norm(g, v, b2, 2)
      m_hat = optax.tree.bias_correction(m, b1, count)
      v_hat = optax.tree.bias_correction(v, b2, count)
      return m, v, m_hat / (jnp.sqrt(v_hat + eps_root) + eps)

    grads, treedef = jax.tree.flatten(updates)
    mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    out, new_mu, new_nu, mu_scales, nu_scales = [], [], [], [], []
    start, tie = 0, None
    for i, (g, m, v) in enumerate(zip(grads, mus, nus)):
      if m.dtype != jnp.int8:  # a small leaf: float moments, exactly optax's
        m, v, u = adam(g, m, v)
        out.append(u)
        new_mu.append(m)
        new_nu.append(v)
        continue
      k = _num_blocks(g.size, block_size)
      m_scale, v_scale = state.mu_absmax[start:start + k], state.nu_absmax[start:start + k]
      start += k
      if tie is not None:  # the previous 8-bit leaf first
        m_scale, v_scale = m_scale + tie, v_scale + tie
      m32 = dequantize_blocks(_to_blocks(m, block_size), m_scale)
      v32 = dequantize_blocks(_to_blocks(v, block_size), v_scale)
      # Padding holds zero gradients, so it stays zero and never raises a block's absmax.
      m32, v32, u = adam(_to_blocks(g.astype(jnp.float32), block_size), m32, v32)
      m_codes, m_absmax = quantize_blocks(m32, signed=True)
      v_codes, v_absmax = quantize_blocks(v32, signed=False)
      u = _from_blocks(u, g.shape).astype(g.dtype)
      m_codes, v_codes = _from_blocks(m_codes, g.shape), _from_blocks(v_codes, g.shape)
      tie = _fence((u if finish is None else finish(i, u), m_codes, v_codes, m_absmax, v_absmax), count)
      out.append(u)
      new_mu.append(m_codes)
      new_nu.append(v_codes)
      mu_scales.append(m_absmax)
      nu_scales.append(v_absmax)
    mu_absmax = jnp.concatenate(mu_scales) if mu_scales else state.mu_absmax
    nu_absmax = jnp.concatenate(nu_scales) if nu_scales else state.nu_absmax
    new_state = ScaleByAdam8bitState(count=count, mu=treedef.unflatten(new_mu), nu=treedef.unflatten(new_nu),
                                     mu_absmax=mu_absmax, nu_absmax=nu_absmax)
    return treedef.unflatten(out), new_state
  return update


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                       block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE
                       ) -> optax.GradientTransformation:
  """optax.scale_by_adam with block-wise 8-bit moments for leaves of at least `min_8bit_size` elements."""
  if block_size < 1 or min_8bit_size < 1:
    raise ValueError(f"block_size and min_8bit_size must be positive, got {block_size}, {min_8bit_size}")

  def is_8bit(x) -> bool:
    return x.size >= min_8bit_size

  def init_fn(params):
    # With optax.masked, masked-out leaves are MaskedNodes (no leaves) and are skipped here and in update_fn.
    leaves, treedef = jax.tree.flatten(params)
    mu = [jnp.zeros(x.shape, jnp.int8 if is_8bit(x) else x.dtype) for x in leaves]
    nu = [jnp.zeros(x.shape, jnp.uint8 if is_8bit(x) else x.dtype) for x in leaves]
    total = sum(_num_blocks(x.size, block_size) for x in leaves if is_8bit(x))
    absmax = lambda: jnp.zeros((max(total, 1),), jnp.float32)  # two buffers: a donated state may not share one
    return ScaleByAdam8bitState(count=jnp.zeros([], jnp.int32), mu=treedef.unflatten(mu),
                                nu=treedef.unflatten(nu), mu_absmax=absmax(), nu_absmax=absmax())

  update = _adam_8bit_update(b1, b2, eps, eps_root, block_size)

  def update_fn(updates, state, params=None):
    del params
    return update(updates, state)

  return optax.GradientTransformation(init_fn, update_fn)


def _leaf_masks(mask, params, treedef) -> list:
  """optax.masked's mask (None, a tree or prefix tree of bools, or a callable on params) as one entry per leaf."""
  if mask is None:
    return [None] * treedef.num_leaves
  tree = mask(params) if callable(mask) else mask
  return treedef.flatten_up_to(jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params))


def adamw_8bit(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
               weight_decay: float = 1e-4, mask=None, block_size: int = BLOCK_SIZE,
               min_8bit_size: int = MIN_8BIT_SIZE) -> optax.GradientTransformation:
  """optax.adamw (decoupled weight decay under `mask`, then the learning rate) over scale_by_adam_8bit.

  State and updates are those of optax.chain(scale_by_adam_8bit, add_decayed_weights, scale_by_learning_rate).
  With params, each 8-bit leaf's step ends with its new parameter, optax.apply_updates(param, update), before
  the next leaf starts (see `_adam_8bit_update`): the caller's apply_updates is the same computation, which XLA
  merges with it (CSE), so the float32 update of a leaf dies at once. Otherwise XLA applied every update at the
  end of the step, after all of them had been computed (QLoRA r64: 49 MiB more live).
  """
  later = (optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))
  init = optax.chain(scale_by_adam_8bit(b1, b2, eps, eps_root, block_size, min_8bit_size), *later).init
  adam = _adam_8bit_update(b1, b2, eps, eps_root, block_size)

  def update_fn(updates, state, params=None):
    adam_state, *later_state = state
    later_state = tuple(later_state)
    finish = None
    treedef = jax.tree.structure(updates)
    if params is not None and jax.tree.structure(params) == treedef:
      param_leaves, masks = treedef.flatten_up_to(params), _leaf_masks(mask, params, treedef)

      def finish(i, u):  # leaf i's new parameter: the later transformations on this leaf alone, the same ops
        alone = optax.chain(optax.add_decayed_weights(weight_decay, masks[i]), later[1])
        step, _ = alone.update(u, later_state, param_leaves[i])
        return optax.apply_updates(param_leaves[i], step)
    updates, adam_state = adam(updates, adam_state, finish)
    updates, later_state = optax.chain(*later).update(updates, later_state, params)
    return updates, (adam_state, *later_state)

  return optax.GradientTransformation(init, update_fn)


def state_bytes(opt_state) -> int:
  """Bytes held by an optimizer state's arrays (for tests and benchmarks)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
