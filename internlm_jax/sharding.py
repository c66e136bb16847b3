"""Device meshes and the logical-axis rules that place every weight and activation on them.

Logical axes (the one vocabulary): batch, seq, embed, q_heads, kv_heads, head_dim, mlp, vocab, layers.
Mesh axes: data, fsdp, tensor, sequence.

A `ShardingRules` maps each logical axis to zero, one or several mesh axes. A spec never uses one mesh axis twice:
the first logical axis that claims it wins, later ones fall back to replication. That is how one rule set serves
both weights (`embed` -> fsdp shards the parameters) and activations (`[batch, seq, embed]`: batch already holds
fsdp, so activations stay whole along embed, as FSDP wants).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
LOGICAL_AXES = ("batch", "seq", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")

MeshAxes = Union[None, str, tuple[str, ...]]


class ShardingError(ValueError):
  """A mesh or a sharding request that cannot be satisfied."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis -> mesh axes. The defaults give data + FSDP (ZeRO-3) + Megatron tensor + sequence parallelism."""
  batch: MeshAxes = ("data", "fsdp")
  seq: MeshAxes = "sequence"
  embed: MeshAxes = "fsdp"
  q_heads: MeshAxes = "tensor"
  kv_heads: MeshAxes = "tensor"
  head_dim: MeshAxes = None
  mlp: MeshAxes = "tensor"
  vocab: MeshAxes = "tensor"
  layers: MeshAxes = None

  def spec(self, logical_axes: Sequence[str | None]) -> P:
    """PartitionSpec for an array whose dimensions carry these logical names (None = never sharded)."""
    used: set[str] = set()
    parts = []
    for name in logical_axes:
      if name is None:
        parts.append(None)
        continue
      if name not in LOGICAL_AXES:
        raise ShardingError(f"unknown logical axis {name!r}; the vocabulary is {LOGICAL_AXES}")
      mesh_axes = getattr(self, name)
      if mesh_axes is None:
        parts.append(None)
        continue
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      free = tuple(a for a in mesh_axes if a not in used)
      used.update(free)
      parts.append(None if not free else free[0] if len(free) == 1 else free)
    return P(*parts)

  def sharding(self, mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, self.spec(logical_axes))


DEFAULT_RULES = ShardingRules()


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor, sequence); one size may be -1 to take the remaining devices.

  Axes are Auto-typed so `with_sharding_constraint` and GSPMD propagation apply (jax.make_mesh defaults to
  Explicit axes in this JAX version).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor, sequence]
  if sizes.count(-1) > 1:
    raise ShardingError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor} "
                        f"sequence={sequence}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ShardingError(f"{len(devices)} devices do not divide by the fixed mesh axes (product {known})")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ShardingError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} sequence={sizes[3]} needs "
                        f"{math.prod(sizes)} devices, but {len(devices)} are available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                       devices=devices)


def check_divisible(mesh: Mesh, rules: ShardingRules, shape: Sequence[int], logical_axes: Sequence[str | None],
                    what: str) -> None:
  """Raises a ShardingError naming `what` when a sharded dimension does not divide by its mesh axes."""
  for dim, part, name in zip(shape, rules.spec(logical_axes), logical_axes):
    if part is None:
      continue
    axes = (part,) if isinstance(part, str) else part
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size:
      raise ShardingError(f"{what}: dimension {name}={dim} is not divisible by mesh axes {axes} (size {size}); "
                          "change the mesh or the ShardingRules")


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: ShardingRules | None) -> jax.Array:
  """Pins an activation's sharding when a mesh is active (inside `jax.set_mesh`); a no-op otherwise."""
  if rules is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, rules.spec(logical_axes))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-process JAX where the environment asks for it; does nothing for a single process.

  TPU VMs and SLURM are detected by `jax.distributed.initialize()` itself (JAX_DISTRIBUTED=1 forces the call
  where detection here misses a cluster); an explicit coordinator (or the JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) covers plain multi-host CPU or GPU.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  cluster = any(v in os.environ for v in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID",
                                            "MEGASCALE_COORDINATOR_ADDRESS"))
  if coordinator_address is None and not cluster and os.environ.get("JAX_DISTRIBUTED") != "1":
    return  # a single process: nothing to join
  # Only the CPU client reads this; it must be set before the backend starts, so no backend query here.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def replicated_fraction(tree, mesh: Mesh) -> float:
  """Fraction of the tree's bytes that sit whole on every device (for memory accounting and tests)."""
  total = replicated = 0
  for leaf in jax.tree.leaves(tree):
    nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    total += nbytes
    if leaf.sharding.is_fully_replicated:
      replicated += nbytes
  return replicated / max(total, 1)
