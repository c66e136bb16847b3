"""Several LoRA adapters served beside one base model, each request choosing one by its `model` name (LMDeploy's
`--adapters name=path`, vLLM's LoRA modules; the batched LoRA of S-LoRA and Punica).

Shapes: N adapters, r the largest rank (a smaller rank is zero-padded: exact), R = N * r, rows the sequences of a
call (decode slots, or the one sequence of a prefill chunk), in / out a projection's flattened input / output.

  stack_adapters: [(LoraConfig, lora tree)] -> per layer {target: (A [in, R], B [R, out])}, and the head's pair
  route(ids [rows], N, r) -> [rows, 1, R]: ones over the rank block of each row's adapter (id 1..N), zeros
                 elsewhere (id 0: the base model alone)
  delta(x [rows, T, in], (A, B), route) -> [rows, T, out] = ((x A) * route) B

Why one dense product over every adapter's rank block, masked, instead of a gather of each row's matrices: the
masked product is two small matmuls with R columns whatever the rows ask (no [rows, in, r] gathered copies per
step), and a row's delta is exactly its own adapter's, since the others' blocks are multiplied by zero. B holds
(alpha / r) * b, each adapter's own scale. The base weights are not touched (the base can be quantized); a row
with id 0 gets exactly the base's logits (its delta is +0). The pairs follow serving_params' [out, in] input
orders: wqkv's outputs grouped per kv head, wo's inputs head-major, as lora.py's a / b layouts.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.lora import TARGETS, LoraConfig

LAYER_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")


def _widths(config: ModelConfig) -> dict[str, tuple[int, int]]:
  E, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
  H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
  return {"wqkv": (E, (H + 2 * K) * D), "wo": (H * D, E), "w1": (E, F), "w3": (E, F), "w2": (F, E), "output": (E, V)}


def stack_adapters(config: ModelConfig, adapters: Sequence[tuple[LoraConfig, dict]], dtype=None) -> dict:
  """{"layers": tuple of per-layer {target: (A, B)}, "output": (A, B) (only when an adapter targets the head),
  "rank": r, "count": N} from adapter trees as lora_io.load_adapter returns them (stacked [L, ...] leaves)."""
  if not adapters:
    raise ValueError("stack_adapters needs at least one adapter")
  dtype = jnp.dtype(dtype or config.dtype)
  r = max(lcfg.rank for lcfg, _ in adapters)
  N, L, widths = len(adapters), config.num_layers, _widths(config)
  targets = [t for t in (*LAYER_TARGETS, "output") if any(t in lcfg.targets for lcfg, _ in adapters)]
  out = {"layers": [dict() for _ in range(L)], "rank": r, "count": N}
  for target in targets:
    n_in, n_out = widths[target]
    lead = () if target == "output" else (L,)
    a_all = np.zeros(lead + (n_in, N * r), np.float32)
    b_all = np.zeros(lead + (N * r, n_out), np.float32)
    for j, (lcfg, lora) in enumerate(adapters):
      if target not in lcfg.targets:
        continue
      node = lora
      for key in TARGETS[target][0]:
        node = node[key]
      a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
      a = a.reshape(lead + (n_in, lcfg.rank))
      b = b.reshape(lead + (lcfg.rank, n_out))
      a_all[..., j * r:j * r + lcfg.rank] = a
      b_all[..., j * r:j * r + lcfg.rank, :] = lcfg.scale * b
    if target == "output":
      out["output"] = (jnp.asarray(a_all, dtype), jnp.asarray(b_all, dtype))
    else:
      for i in range(L):
        out["layers"][i][target] = (jnp.asarray(a_all[i], dtype), jnp.asarray(b_all[i], dtype))
  out["layers"] = tuple(out["layers"])
  return out


def attach(params: dict, stacks: dict) -> dict:
  """Serving-layout params (paged_model.serving_params) with the stacked adapters added: each layer dict gains
  "lora" {target: (A, B)}, the top level "lora_output" (when the head is adapted) and "lora_block" [R] int32, the
  adapter id (1..N) that owns each rank column (what `route` compares a row's id against)."""
  out = dict(params)
  out["layers"] = tuple({**layer, "lora": pairs} for layer, pairs in zip(params["layers"], stacks["layers"]))
  if "output" in stacks:
    out["lora_output"] = stacks["output"]
  R = stacks["count"] * stacks["rank"]
  out["lora_block"] = jnp.arange(R, dtype=jnp.int32) // stacks["rank"] + 1
  return out


def with_adapters(params: dict, config: ModelConfig, adapters: Sequence[tuple[LoraConfig, dict]], mesh=None) -> dict:
  """Serving-layout params with `adapters` stacked and attached (replicated on every device of `mesh`: small)."""
  stacks = stack_adapters(config, adapters)
  if mesh is not None:
    stacks = jax.device_put(stacks, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return attach(params, stacks)


def route(params: dict, ids: jax.Array | None, dtype) -> jax.Array | None:
  """[rows, 1, R] routing mask of adapter ids [rows] (0: the base alone), or None when no adapter is served."""
  if ids is None or "lora_block" not in params:
    return None
  return (params["lora_block"][None, :] == ids[:, None]).astype(dtype)[:, None, :]


def add_delta(y: jax.Array, x: jax.Array, pairs: dict, target: str, mask: jax.Array | None) -> jax.Array:
  """y + the routed adapters' delta of projection `target` on input x (y unchanged without adapters)."""
  if mask is None or target not in pairs:
    return y
  return y + delta(x, pairs[target], mask).astype(y.dtype)


def delta(x: jax.Array, pair, mask: jax.Array) -> jax.Array:
  a, b = pair
  down = jnp.einsum("...i,ir->...r", x, a.astype(x.dtype)) * mask.astype(x.dtype)
  return jnp.einsum("...r,ro->...o", down, b.astype(x.dtype))


def nbytes(stacks: dict) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(stacks) if hasattr(x, "shape"))
