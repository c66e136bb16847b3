"""GGUF export (llama.cpp / ollama): our InternLM2 params written as a GGUF of the Llama architecture.

InternLM2 is Llama with a fused wqkv, so the file is a plain `llama` GGUF: wqkv [E, K, G + 2, D] is split into
q [H * D, E], k and v [K * D, E] (query head h = k * G + g), every matmul weight is stored [out, in] as
llama.cpp expects, and q and k rows are reordered for llama.cpp's rope. Our rope rotates halves (x[:D/2] with
x[D/2:]); llama.cpp's `llama` rope rotates adjacent pairs (x[2i] with x[2i+1]), so row i of each head moves to
2i and row D/2 + i to 2i + 1, which makes both compute the same attention scores.

Types: f32, f16, or q8_0 (blocks of 32 int8 with an f16 scale, via gguf-py's reference quantizer). Norms stay
f32, as llama.cpp's own converter keeps them. The vocabulary comes from our sentencepiece tokenizer, padded
with unused pieces up to the model's vocab_size; without a tokenizer a placeholder vocabulary is written
(enough for llama.cpp to load the model and decode token ids, e.g. for benchmarks on random weights).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from internlm_jax.config import ModelConfig

FILE_TYPES = ("f32", "f16", "q8_0")


def _rope_pairs(w: np.ndarray, heads: int) -> np.ndarray:
  """[heads * D, E] rows in rotate-half order per head -> adjacent-pair order."""
  rows, cols = w.shape
  d = rows // heads
  return w.reshape(heads, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama_tensors(config: ModelConfig, params: dict[str, Any], rope_pairs: bool = True) -> dict[str, np.ndarray]:
  """GGUF tensor name -> float32 array ([out, in] for matmul weights), from our params tree. With
  `rope_pairs=False` q and k keep the rotate-half row order (what HF Llama expects)."""
  reorder = _rope_pairs if rope_pairs else lambda w, heads: np.ascontiguousarray(w)
  c = config
  E, H, K, G, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.q_per_kv, c.head_dim
  # A quantized weight (quant.QArray) is no array; its astype dequantizes, as the model reads it.
  f32 = lambda x: np.asarray(x if hasattr(x, "__array__") else x.astype(np.float32), np.float32)
  layers = {name: f32(w) for name, w in params["layers"].items()}
  out = {"token_embd.weight": f32(params["embed"]), "output_norm.weight": f32(params["norm"]),
         "output.weight": np.ascontiguousarray(f32(params["output"]).T)}
  for i in range(c.num_layers):
    wqkv = layers["wqkv"][i]  # [E, K, G + 2, D]
    q = wqkv[:, :, :G].reshape(E, H * D).T
    k = wqkv[:, :, G].reshape(E, K * D).T
    v = wqkv[:, :, G + 1].reshape(E, K * D).T
    blk = f"blk.{i}."
    out.update({
        blk + "attn_norm.weight": layers["attention_norm"][i],
        blk + "attn_q.weight": reorder(q, H),
        blk + "attn_k.weight": reorder(k, K),
        blk + "attn_v.weight": np.ascontiguousarray(v),
        blk + "attn_output.weight": np.ascontiguousarray(layers["wo"][i].reshape(H * D, E).T),
        blk + "ffn_norm.weight": layers["ffn_norm"][i],
        blk + "ffn_gate.weight": np.ascontiguousarray(layers["w1"][i].T),
        blk + "ffn_up.weight": np.ascontiguousarray(layers["w3"][i].T),
        blk + "ffn_down.weight": np.ascontiguousarray(layers["w2"][i].T),
    })
  return out


def _vocab(config: ModelConfig, tokenizer) -> tuple[list[bytes], list[float], list[int]]:
  import gguf
  T = gguf.TokenType
  pieces, scores, types = [], [], []
  if tokenizer is not None:
    sp = tokenizer._sp  # the sentencepiece processor: scores and piece kinds are not on our wrapper
    for i in range(min(sp.get_piece_size(), config.vocab_size)):
      kind = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.BYTE if sp.is_byte(i)
              else T.UNUSED if sp.is_unused(i) else T.NORMAL)
      pieces.append(sp.id_to_piece(i).encode("utf-8"))
      scores.append(float(sp.get_score(i)))
      types.append(int(kind))
    chat = set(tokenizer.special_ids.values())  # <|im_start|> etc. are user-defined pieces; llama.cpp's control
    types = [int(T.CONTROL) if i in chat else t for i, t in enumerate(types)]
  else:  # <unk> <s> </s>, the 256 byte pieces, then filler
    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [int(T.UNKNOWN), int(T.CONTROL), int(T.CONTROL)] + [int(T.BYTE)] * 256
    scores = [0.0] * len(pieces)
  for i in range(len(pieces), config.vocab_size):
    pieces.append(f"<unused{i}>".encode())
    scores.append(-1e9)
    types.append(int(T.UNUSED))
  return pieces, scores, types


def export_gguf(config: ModelConfig, params: dict[str, Any], path: str | os.PathLike, file_type: str = "f32",
                tokenizer=None, name: str = "internlm2") -> str:
  """Writes `path` (a llama-architecture GGUF) and returns it. `params` may live on device; they are copied
  to host float32 once."""
  import gguf
  if file_type not in FILE_TYPES:
    raise ValueError(f"file_type must be one of {FILE_TYPES}, got {file_type!r}")
  if config.rope_scaling_type == "linear" and config.rope_scaling_factor != 1.0:
    raise ValueError("linear rope scaling is not exported (llama.cpp would need rope.scaling keys)")
  c = config
  writer = gguf.GGUFWriter(os.fspath(path), "llama")
  writer.add_name(name)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_block_count(c.num_layers)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_heads)
  writer.add_head_count_kv(c.num_kv_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_rope_dimension_count(c.head_dim)
  writer.add_rope_freq_base(float(c.rope_theta))
  writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
  writer.add_vocab_size(c.vocab_size)
  writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
  pieces, scores, types = _vocab(c, tokenizer)
  writer.add_tokenizer_model("llama")
  writer.add_token_list(pieces)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  writer.add_bos_token_id(c.bos_token_id)
  writer.add_eos_token_id(c.eos_token_id)
  writer.add_pad_token_id(c.pad_token_id)
  writer.add_add_bos_token(False)  # callers pass ids; the chat template already writes <s>
  for tensor_name, w in llama_tensors(c, params).items():
    if w.ndim == 1 or file_type == "f32":
      writer.add_tensor(tensor_name, w)
    elif file_type == "f16":
      writer.add_tensor(tensor_name, w.astype(np.float16))
    else:
      q8 = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(tensor_name, gguf.quants.quantize(w, q8), raw_dtype=q8)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return os.fspath(path)
