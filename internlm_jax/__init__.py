"""internlm_jax: InternLM2 in JAX, from data to agents. Public API only; see DESIGN.md's Contracts."""
from internlm_jax.config import PRESETS, ConfigError, ModelConfig, from_hf_config, get_preset, to_hf_config
from internlm_jax.model import KVCache, abstract_params, forward, forward_with_cache, init_cache, init_params
from internlm_jax.hf_io import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from internlm_jax.sharding import MESH_AXES, ShardingRules, make_mesh
from internlm_jax.tokenizer import ChatTemplateError, Tokenizer, TokenizerError

__all__ = [
    "PRESETS", "ConfigError", "ModelConfig", "from_hf_config", "get_preset", "to_hf_config",
    "KVCache", "abstract_params", "forward", "forward_with_cache", "init_cache", "init_params",
    "CheckpointError", "load_hf_checkpoint", "save_hf_checkpoint",
    "MESH_AXES", "ShardingRules", "make_mesh",
    "ChatTemplateError", "Tokenizer", "TokenizerError",
]
