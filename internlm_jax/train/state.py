"""TrainState: everything a resumed run needs to continue bit-exactly (the data iterator's state lives beside it
in the checkpoint)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from internlm_jax.config import ModelConfig
from jax.sharding import NamedSharding, PartitionSpec as P

from internlm_jax.model import init_params, param_shardings
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer updates applied (skipped non-finite steps included)
  params: Any            # float32 master weights (ModelConfig.param_dtype)
  opt_state: Any
  rng: jax.Array         # uint32 [2] raw key data, so checkpoints hold a plain array
  skipped: jax.Array     # int32 scalar: updates skipped because loss or gradients were not finite


def create_train_state(config: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh=None,
                       rules: ShardingRules = DEFAULT_RULES, params=None) -> TrainState:
  """Fresh state with params born sharded; optimizer moments inherit each param's sharding. `params` (e.g. a
  pretrained model's, on the mesh) replace the random init; they are cast to config.param_dtype (the master
  weights) and donated."""
  init_key, rng = jax.random.split(jax.random.key(seed))
  if params is None:
    params = init_params(config, init_key, mesh=mesh, rules=rules)

  def build(params):
    params = jax.tree.map(lambda p: p.astype(config.param_dtype), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(rng), skipped=jnp.zeros((), jnp.int32))

  out_shardings = None
  if mesh is not None:
    out_shardings = train_state_shardings(jax.eval_shape(build, params), tx, mesh, param_shardings(config, mesh, rules))
  return jax.jit(build, out_shardings=out_shardings, donate_argnums=0)(params)


def train_state_shardings(abstract_state: TrainState, tx: optax.GradientTransformation, mesh, params_sharding):
  """Shardings for a whole TrainState: optimizer moments follow their parameter, scalars are replicated.

  (Sharding propagation does not carry a parameter's layout to the zeros of its Adam moments.)
  """
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state.opt_state, params_sharding,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated, params=params_sharding, opt_state=opt, rng=replicated, skipped=replicated)


def state_shardings(state: TrainState):
  return jax.tree.map(lambda x: x.sharding, state)
