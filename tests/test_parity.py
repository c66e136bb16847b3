"""Logit parity with an independent implementation: transformers' LlamaForCausalLM (float32, eager attention).

transformers has no InternLM2 model type, but InternLM2 is Llama with a fused wqkv. Our exported HF InternLM2
tensors are split into Llama's q/k/v here, directly from the layout described in DESIGN.md (rows grouped per kv
head: G query heads, then the key head, then the value head, D rows each); a wrong fused layout anywhere in
model.py or hf_io.py cannot survive this comparison.
"""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from internlm_jax import PRESETS, forward, init_params
from internlm_jax import hf_io
from internlm_jax.config import to_hf_config

TOLERANCE = 1e-4  # max |ours - theirs| / max |theirs|

_RENAMES = {  # HF InternLM2 suffix -> HF Llama suffix (wqkv is split separately)
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


def internlm2_to_llama(tensors, num_heads, num_kv_heads, head_dim):
  """HF InternLM2 state dict -> HF Llama state dict (torch tensors)."""
  group = num_heads // num_kv_heads
  out = {}
  for name, w in tensors.items():
    if name == "model.tok_embeddings.weight":
      out["model.embed_tokens.weight"] = w
    elif name == "output.weight":
      out["lm_head.weight"] = w
    elif name == "model.norm.weight":
      out[name] = w
    elif name.endswith("attention.wqkv.weight"):
      prefix = name[:-len("attention.wqkv.weight")]
      q_rows, k_rows, v_rows = [], [], []
      for kv in range(num_kv_heads):
        start = kv * (group + 2) * head_dim
        for j in range(group):  # query head kv * group + j
          q_rows.append(w[start + j * head_dim:start + (j + 1) * head_dim])
        k_rows.append(w[start + group * head_dim:start + (group + 1) * head_dim])
        v_rows.append(w[start + (group + 1) * head_dim:start + (group + 2) * head_dim])
      out[prefix + "self_attn.q_proj.weight"] = torch.cat(q_rows)
      out[prefix + "self_attn.k_proj.weight"] = torch.cat(k_rows)
      out[prefix + "self_attn.v_proj.weight"] = torch.cat(v_rows)
    else:
      suffix = next(s for s in _RENAMES if name.endswith(s))
      out[name[:-len(suffix)] + _RENAMES[suffix]] = w
  return out


def llama_model(hf_config, tensors, rope_theta=None):
  """A float32 eager LlamaForCausalLM from an HF InternLM2 config.json dict and its tensors (strict load)."""
  config = transformers.LlamaConfig(
      vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
      intermediate_size=hf_config["intermediate_size"], num_hidden_layers=hf_config["num_hidden_layers"],
      num_attention_heads=hf_config["num_attention_heads"], num_key_value_heads=hf_config["num_key_value_heads"],
      head_dim=hf_config["head_dim"], max_position_embeddings=hf_config["max_position_embeddings"],
      rms_norm_eps=hf_config["rms_norm_eps"], hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
      mlp_bias=False, attn_implementation="eager",
      # transformers 5 keeps the rotary base in rope_parameters (rope_theta/rope_scaling are gone).
      rope_parameters={"rope_type": "default", "rope_theta": rope_theta or hf_config["rope_theta"]})
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  state = internlm2_to_llama(tensors, hf_config["num_attention_heads"], hf_config["num_key_value_heads"],
                             hf_config["head_dim"])
  model.load_state_dict(state, strict=True)
  return model


def llama_logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def random_params(config, seed):
  """Random weights, norms included (a swapped attention_norm/ffn_norm would hide behind all-ones)."""
  params = init_params(config, jax.random.key(seed))
  keys = jax.random.split(jax.random.key(seed + 1), 3)
  perturb = lambda k, w: w * (1.0 + 0.2 * jax.random.normal(k, w.shape, w.dtype))
  params["layers"]["attention_norm"] = perturb(keys[0], params["layers"]["attention_norm"])
  params["layers"]["ffn_norm"] = perturb(keys[1], params["layers"]["ffn_norm"])
  params["norm"] = perturb(keys[2], params["norm"])
  return params


def tokens_for(config, batch, length, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size, dtype=jnp.int32)


def relative_error(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-g4"])
def test_logits_match_llama(preset):
  # A larger init than the default 0.02 so attention is far from uniform and every head matters.
  config = PRESETS[preset].replace(initializer_range=0.1)
  assert config.q_per_kv == {"tiny": 2, "tiny-g4": 4}[preset]
  params = random_params(config, seed=3)
  tokens = tokens_for(config, batch=2, length=24)
  tensors = {k: torch.from_numpy(v) for k, v in hf_io.to_hf_state_dict(config, params).items()}
  model = llama_model(to_hf_config(config), tensors)
  theirs = llama_logits(model, tokens)
  ours = forward(params, tokens, config)
  assert ours.dtype == jnp.float32 and ours.shape == theirs.shape
  assert relative_error(ours, theirs) <= TOLERANCE


def test_saved_folder_loads_into_llama(tmp_path):
  """What save_hf_checkpoint writes (config.json + sharded safetensors) is the HF InternLM2 layout."""
  config = PRESETS["tiny-g4"].replace(initializer_range=0.1)
  params = random_params(config, seed=5)
  hf_io.save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=200_000)
  with open(tmp_path / "config.json") as f:
    hf_config = json.load(f)
  assert hf_config["model_type"] == "internlm2" and hf_config["architectures"] == ["InternLM2ForCausalLM"]
  files = glob.glob(os.path.join(tmp_path, "*.safetensors"))
  assert len(files) > 1 and os.path.exists(tmp_path / hf_io.INDEX_FILE)
  tensors = {}
  for path in files:
    tensors.update(load_file(path))
  tokens = tokens_for(config, batch=1, length=20, seed=1)
  theirs = llama_logits(llama_model(hf_config, tensors), tokens)
  assert relative_error(forward(params, tokens, config), theirs) <= TOLERANCE


def ntk_base(base, factor, seq_len, max_pos, head_dim):
  """HF InternLM2's dynamic NTK rotary base for one full forward of seq_len tokens (float64 reference)."""
  if seq_len <= max_pos:
    return base
  return base * (factor * seq_len / max_pos - (factor - 1)) ** (head_dim / (head_dim - 2))


def test_dynamic_ntk_past_max_position_embeddings():
  config = PRESETS["tiny"].replace(initializer_range=0.1, max_position_embeddings=32, rope_theta=10000.0,
                                   rope_scaling_type="dynamic", rope_scaling_factor=2.0)
  params = random_params(config, seed=7)
  T = 56
  tokens = tokens_for(config, batch=1, length=T, seed=2)
  tensors = {k: torch.from_numpy(v) for k, v in hf_io.to_hf_state_dict(config, params).items()}
  hf_config = to_hf_config(config)
  scaled = ntk_base(config.rope_theta, 2.0, T, 32, config.head_dim)
  assert scaled > 2 * config.rope_theta
  ours = forward(params, tokens, config)
  # Dynamic NTK over a single full forward is plain RoPE with the grown base.
  assert relative_error(ours, llama_logits(llama_model(hf_config, tensors, rope_theta=scaled), tokens)) <= TOLERANCE
  # ... and the test can tell: the unscaled base is far off past max_position_embeddings.
  assert relative_error(ours, llama_logits(llama_model(hf_config, tensors), tokens)) > 100 * TOLERANCE
  # Within max_position_embeddings the base stays put.
  short = tokens[:, :32]
  assert relative_error(forward(params, short, config),
                        llama_logits(llama_model(hf_config, tensors), short)) <= TOLERANCE
