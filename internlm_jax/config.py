"""Model configuration: the frozen `ModelConfig`, named presets, HF config.json I/O and cost model.

One `ModelConfig` describes an InternLM2 network completely; everything else (weight shapes, sharding, HF
conversion, FLOP counts) is derived from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

ATTENTION_IMPLS = ("xla", "chunked", "blockwise", "pallas", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A configuration is invalid or is not an InternLM2 configuration."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of an InternLM2 model.

  `dtype` is the compute dtype of matmuls; `param_dtype` the storage dtype of the weights. Norms, softmax and the
  final logits always run in float32.
  """
  vocab_size: int = 92544
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  intermediate_size: int = 14336
  max_position_embeddings: int = 32768
  rope_theta: float = 1e6
  rope_scaling_type: str | None = "dynamic"  # None, "dynamic" (NTK) or "linear"
  rope_scaling_factor: float = 1.0
  rms_norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"  # see model.REMAT_POLICIES
  attention_impl: str = "xla"
  attention_block_size: int = 512  # kv block of `blockwise`, query chunk of `chunked` attention
  loss_chunk_size: int = 0  # tokens per chunk of the fused output head + loss in training (0: whole sequence)
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int = 2
  initializer_range: float = 0.02

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "max_position_embeddings"):
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    if self.rope_scaling_type not in (None, "dynamic", "linear"):
      raise ConfigError(f"rope_scaling_type must be None, 'dynamic' or 'linear', got {self.rope_scaling_type!r}")
    if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
      raise ConfigError(f"dtype and param_dtype must be one of {DTYPES}, got {self.dtype!r}, {self.param_dtype!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")

  @property
  def q_per_kv(self) -> int:
    """G: query heads served by each key/value head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---- cost model -------------------------------------------------------------------------------------------
  def num_params(self, include_embedding: bool = True) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * d
    per_layer = attn + 3 * d * f + 2 * d
    total = self.num_layers * per_layer + d  # + final norm
    if include_embedding:
      total += 2 * v * d  # token embedding and untied output head
    return total

  def flops_per_token(self, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 6N (or 2N) for the matmuls plus causal attention scores and values.

    N excludes the input embedding (a gather, not a matmul) but includes the output head. Attention counts
    the causal half of the T x T score and value matmuls, averaged per token.
    """
    n = self.num_params(include_embedding=False) + self.vocab_size * self.hidden_size
    attn = 2 * 2 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2  # QK^T and PV, causal half
    forward = 2 * n + attn
    return 3 * forward if training else forward


def _small(**kw) -> ModelConfig:
  base = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
              intermediate_size=128, max_position_embeddings=512)
  base.update(kw)
  return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    "internlm2-1.8b": ModelConfig(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=8,
                                  intermediate_size=8192),
    "internlm2-7b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                intermediate_size=14336),
    "internlm2-20b": ModelConfig(hidden_size=6144, num_layers=48, num_heads=48, num_kv_heads=8,
                                 intermediate_size=16384),
    "internlm2.5-7b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                  intermediate_size=14336, rope_theta=5e7, rope_scaling_factor=2.5),
    # CPU presets: shapes chosen so every parallelism (tensor over kv heads included) divides on 8 devices.
    "tiny": _small(),
    "tiny-g4": _small(num_heads=8, num_kv_heads=2),
    "small": _small(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                    intermediate_size=768, max_position_embeddings=2048),
    "50m": _small(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                  intermediate_size=1536, max_position_embeddings=2048),
    # The serving benchmarks' 125M Llama shape (experiments/bench_serve.py, bench_guided.py, bench_multi_lora.py).
    "125m": ModelConfig(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                        intermediate_size=2048, max_position_embeddings=2048, rope_scaling_type=None,
                        rope_theta=1e4),
}


def get_preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]


# ---- HF config.json --------------------------------------------------------------------------------------------
_REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def from_hf_config(hf: Mapping[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
  """Builds a ModelConfig from an HF InternLM2 config (a dict, a config.json path or a checkpoint folder).

  Reads every field explicitly: the HF class defaults differ from the released checkpoints.
  """
  source = "config"
  if not isinstance(hf, Mapping):
    path = os.fspath(hf)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    source = path
    try:
      with open(path) as f:
        hf = json.load(f)
    except FileNotFoundError:
      raise ConfigError(f"{path}: no config.json; an HF InternLM2 folder needs one") from None
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type != "internlm2" and not any("InternLM2" in a for a in archs):
    raise ConfigError(f"{source}: model_type is {model_type!r} (architectures {archs}), not an InternLM2 "
                      "config; expected model_type 'internlm2'")
  missing = [k for k in _REQUIRED_HF_FIELDS if k not in hf]
  if missing:
    raise ConfigError(f"{source}: InternLM2 config is missing field(s) {missing}")
  num_heads = int(hf["num_attention_heads"])
  hidden = int(hf["hidden_size"])
  # transformers 5 saves rope_scaling as rope_parameters (with rope_theta inside, rope_type "default" for none).
  scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or None
  scaling_type = (scaling.get("type") or scaling.get("rope_type")) if scaling else None
  if scaling_type == "default":
    scaling = scaling_type = None
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # the SwiGLU MLP is hard-wired
    raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (InternLM2 uses 'silu')")
  eos = hf.get("eos_token_id", 2)
  kwargs = dict(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=hidden,
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or hidden // num_heads),
      intermediate_size=int(hf["intermediate_size"]),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
      rope_scaling_type=scaling_type,
      rope_scaling_factor=float(scaling.get("factor", 1.0)) if scaling else 1.0,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      bos_token_id=int(hf.get("bos_token_id", 1)),
      eos_token_id=int(eos[0] if isinstance(eos, (list, tuple)) else eos),
      pad_token_id=int(hf.get("pad_token_id", 2) if hf.get("pad_token_id") is not None else 2),
      initializer_range=float(hf.get("initializer_range", 0.02)),
  )
  if hf.get("bias"):
    raise ConfigError(f"{source}: bias=True is not supported (released InternLM2 models have no biases)")
  torch_dtype = hf.get("torch_dtype") or hf.get("dtype")
  if torch_dtype in DTYPES:
    kwargs["param_dtype"] = torch_dtype
  kwargs.update(overrides)
  try:
    return ModelConfig(**kwargs)
  except ConfigError as e:  # name the file: the field names differ from config.json's
    raise ConfigError(f"{source}: {e}") from None


def to_hf_config(config: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
  """The config.json of an HF InternLM2 checkpoint (loads with InternLM2's remote modeling code)."""
  scaling = None
  if config.rope_scaling_type is not None:
    scaling = {"type": config.rope_scaling_type, "factor": config.rope_scaling_factor}
  return {
      "architectures": ["InternLM2ForCausalLM"],
      "auto_map": {
          "AutoConfig": "configuration_internlm2.InternLM2Config",
          "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
          "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
      },
      "model_type": "internlm2",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "intermediate_size": config.intermediate_size,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rope_theta": config.rope_theta,
      "rope_scaling": scaling,
      "rms_norm_eps": config.rms_norm_eps,
      "bias": False,
      "tie_word_embeddings": False,
      "use_cache": True,
      "initializer_range": config.initializer_range,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "pad_token_id": config.pad_token_id,
      "attn_implementation": "eager",
      "torch_dtype": torch_dtype or config.param_dtype,
  }
