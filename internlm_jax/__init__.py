"""internlm_jax: InternLM2 in JAX, from data to agents. Public API only; see DESIGN.md's Contracts."""
from internlm_jax.config import PRESETS, ConfigError, ModelConfig, from_hf_config, get_preset, to_hf_config
from internlm_jax.model import KVCache, abstract_params, forward, forward_with_cache, init_cache, init_params
from internlm_jax.sharding import MESH_AXES, ShardingRules, make_mesh

__all__ = [
    "PRESETS", "ConfigError", "ModelConfig", "from_hf_config", "get_preset", "to_hf_config",
    "KVCache", "abstract_params", "forward", "forward_with_cache", "init_cache", "init_params",
    "MESH_AXES", "ShardingRules", "make_mesh",
]
