"""Sharded forward on 8 simulated devices equals the unsharded one; params are born sharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax import PRESETS, forward, init_params, make_mesh
from internlm_jax.model import param_shardings
from internlm_jax.sharding import DEFAULT_RULES, ShardingError, ShardingRules, replicated_fraction

# tiny-g4-like shapes with 4 kv heads so tensor=4 still cuts whole kv groups.
CONFIG = PRESETS["tiny"].replace(num_heads=8, num_kv_heads=4, hidden_size=64, intermediate_size=128)
MESHES = {
    "data": dict(data=8, fsdp=1),
    "fsdp": dict(data=1, fsdp=8),
    "tensor": dict(data=2, fsdp=1, tensor=4),
    "mix_2x2x2": dict(data=2, fsdp=2, tensor=2),
    "sequence": dict(data=2, fsdp=2, sequence=2),
}


@pytest.fixture(scope="module")
def reference():
  params = init_params(CONFIG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CONFIG.vocab_size, dtype=jnp.int32)
  return params, tokens, forward(params, tokens, CONFIG)


def test_eight_devices_available():
  assert jax.device_count() == 8


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_forward_equals_unsharded(reference, name):
  params, tokens, expected = reference
  mesh = make_mesh(**MESHES[name])
  sharded_params = init_params(CONFIG, jax.random.key(0), mesh=mesh)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sharded_params, params)
  token_sharding = DEFAULT_RULES.sharding(mesh, ("batch", "seq"))
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda p, t: forward(p, t, CONFIG), in_shardings=(param_shardings(CONFIG, mesh), token_sharding)
                     )(sharded_params, jax.device_put(tokens, token_sharding))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_fsdp_replicates_at_most_two_percent_of_bytes():
  config = PRESETS["small"]
  mesh = make_mesh(fsdp=8)
  params = init_params(config, jax.random.key(0), mesh=mesh)
  assert replicated_fraction(params, mesh) <= 0.02
  assert params["layers"]["w1"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_tensor_parallel_cuts_whole_kv_groups():
  mesh = make_mesh(data=2, tensor=4, fsdp=1)
  params = init_params(CONFIG, jax.random.key(0), mesh=mesh)
  wqkv = params["layers"]["wqkv"]  # [L, E, K, G + 2, D]
  for shard in wqkv.addressable_shards:
    # Each device holds one whole kv group: all its G query heads, its key and its value.
    assert shard.data.shape[2:] == (1, CONFIG.q_per_kv + 2, CONFIG.head_dim)


def test_params_created_directly_sharded_with_full_size_shapes():
  config = PRESETS["internlm2-7b"]
  mesh = make_mesh(fsdp=4, tensor=2)
  shardings = param_shardings(config, mesh)
  lowered = jax.jit(lambda k: init_params(config, k), out_shardings=shardings).lower(jax.random.key(0))
  per_device = lowered.compile().memory_analysis()
  # Output bytes on one device are about 1/8 of the 31 GB float32 model: nothing is built whole.
  assert per_device.output_size_in_bytes < 1.1 * config.num_params() * 4 / 8


def test_indivisible_mesh_and_unknown_axis_are_named():
  mesh = make_mesh(data=1, fsdp=1, tensor=8)
  with pytest.raises(ShardingError, match="wqkv.*kv_heads=4.*tensor"):
    param_shardings(CONFIG, mesh)
  with pytest.raises(ShardingError, match="needs 12 devices"):
    make_mesh(data=3, fsdp=4)
  with pytest.raises(ShardingError, match="unknown logical axis 'heads'"):
    ShardingRules().spec(("batch", "heads"))


def test_rules_never_use_a_mesh_axis_twice():
  spec = DEFAULT_RULES.spec(("batch", "seq", "embed"))
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), "sequence", None)
  assert DEFAULT_RULES.spec(("vocab", "embed")) == jax.sharding.PartitionSpec("tensor", "fsdp")
