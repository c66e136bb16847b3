"""Peers for experiments/bench_serve.py: transformers' LlamaForCausalLM and llama.cpp (llama-cpp-python) decoding
our weights (float32 LlamaForCausalLM, and the same with PyTorch dynamic int8 Linear layers; GGUF f32 / q8_0 via
serve/gguf.py), timed the same way as our engine."""
import os

import numpy as np

from internlm_jax.train.metrics import median_seconds

_HF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def peer_device() -> str:
  """Where the torch peer runs: the GPU when torch sees one (our engine then runs on it too), else the CPU."""
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def llama_model(config, params):
  """transformers LlamaForCausalLM (float32) holding our weights: wqkv split into q/k/v as in gguf.py; on
  `peer_device()`."""
  import torch
  import transformers
  from internlm_jax.serve.gguf import llama_tensors
  hf = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
  state = {}
  for name, w in llama_tensors(config, params, rope_pairs=False).items():
    if name.startswith("blk."):
      _, i, kind, _ = name.split(".")
      name = f"model.layers.{i}.{_HF_NAMES[kind]}.weight"
    else:
      name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}[name]
    state[name] = torch.tensor(w)
  model = transformers.LlamaForCausalLM(hf).float().eval()
  model.load_state_dict(state, strict=True)
  return model.to(peer_device())


def quantize_int8(model):
  """`model` with every nn.Linear (q/k/v/o, gate/up/down, lm_head: the matmuls our int8 mode quantizes; the
  embedding stays float32 in both) replaced in place by PyTorch's dynamic int8 Linear: int8 weights per output
  channel (symmetric, per_channel_dynamic_qconfig), activations quantized per call (uint8 with reduce_range, i.e.
  7 bits, one scale per tensor), on the default quantized engine (x86: fbgemm kernels for linear) -> (model, a
  description). Raises when the build lacks dynamic quantization or a Linear was left float."""
  import warnings
  import torch
  from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
  from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
  with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao (not installed)
    warnings.simplefilter("ignore")
    model = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
  linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
  quantized = [m for m in model.modules() if isinstance(m, DynamicLinear)]
  if linears or not quantized:
    raise RuntimeError(f"quantize_dynamic left {len(linears)} float Linear layers, made {len(quantized)} int8 ones")
  scheme = str(quantized[0].weight().qscheme()).removeprefix("torch.")
  engine = torch.backends.quantized.engine
  return model, (f"torch.ao dynamic int8: {len(quantized)} Linear layers, weights qint8 {scheme} (symmetric, "
                 f"per output channel), activations quint8 per tensor per call (reduce_range: 7 bits), engine {engine}")


def _thread_counts():
  # Peers synchronise their threads by spinning: on a shared 2-core machine one thread can beat two, so each
  # peer is timed with both and credited with its better one.
  return sorted({1, os.cpu_count() or 1})


def bench_transformers(model, prompts, new_tokens):
  """Decode tokens/s of generate (greedy, no early stop): (time for n tokens - time for 1) / (n - 1), with the
  better torch thread count -> (tokens/s, threads)."""
  import torch
  ids = torch.tensor(prompts, dtype=torch.int64, device=model.device)
  default_threads, best = torch.get_num_threads(), (0.0, 0)
  for threads in _thread_counts():
    torch.set_num_threads(threads)
    best = max(best, (_transformers_rate(model, ids, new_tokens), threads))
  torch.set_num_threads(default_threads)
  return best


def _transformers_rate(model, ids, new_tokens):
  import torch

  def generate(n):
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return out.cpu()  # waits for a GPU's queued work

  generate(2)
  one = median_seconds(lambda: generate(1), 2)
  full = median_seconds(lambda: generate(new_tokens), 1)
  return ids.shape[0] * (new_tokens - 1) / (full - one)


def bench_llamacpp(config, params, prompt, new_tokens, file_type, directory):
  """Batch-1 greedy decode through llama-cpp-python on our weights exported to GGUF, with the better thread
  count -> (tokens/s, threads, tokens, logits of the prompt's next token, extra buffer types on).

  Each timing runs in a child process: a fresh llama-cpp-python 0.3.36 build with AVX-512 and AMX segfaulted in
  llama_decode on our q8_0 export for prompts over one token (its repacking "extra buffer types"), which would
  kill the benchmark. A crash is retried once with `use_extra_bufts=False`, and the result says which ran."""
  from internlm_jax.serve.gguf import export_gguf
  path = export_gguf(config, params, os.path.join(directory, f"bench-{file_type}.gguf"), file_type)
  best, extra_bufts = None, True
  try:
    for threads in _thread_counts():
      try:
        run = _llamacpp_child(path, prompt, new_tokens, threads, extra_bufts) if extra_bufts else None
      except _PeerCrashed as e:
        print(f"llama.cpp {file_type}: {e}; again with use_extra_bufts=False", flush=True)
        extra_bufts, run = False, None
      if run is None:
        try:
          run = _llamacpp_child(path, prompt, new_tokens, threads, False)
        except _PeerCrashed as e:
          raise RuntimeError(f"llama.cpp crashed on {path} even without extra buffer types: {e}") from None
      rate = new_tokens / run["seconds"]
      if best is None or rate > best[0]:
        best = (rate, threads, run["tokens"], np.array(run["first"], np.float32), extra_bufts)
  finally:
    os.remove(path)
  return best


class _PeerCrashed(RuntimeError):
  pass


# The child: load with the given extra-buffer setting, one untimed run, then the faster of two timed ones.
_LLAMACPP_CHILD = """
import json, sys, time
import llama_cpp
import numpy as np
path, prompt, new, threads, extra = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
default_params = llama_cpp.llama_cpp.llama_model_default_params
def model_params():
  params = default_params()
  params.use_extra_bufts = extra
  return params
llama_cpp.llama_cpp.llama_model_default_params = model_params
llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new + 16, n_batch=len(prompt), n_threads=threads,
                      n_threads_batch=threads, logits_all=True, verbose=False)
def run():
  llm.reset()
  llm.eval(prompt)
  first = np.array(llm.scores[llm.n_tokens - 1])
  start, tokens = time.perf_counter(), []
  for _ in range(new):
    tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    llm.eval([tokens[-1]])
  return time.perf_counter() - start, tokens, first
run()
seconds, tokens, first = min((run() for _ in range(2)), key=lambda r: r[0])
llm.close()
print(json.dumps({"seconds": seconds, "tokens": tokens, "first": first.tolist()}))
"""


def _llamacpp_child(path, prompt, new_tokens, threads, extra_bufts) -> dict:
  import json
  import subprocess
  import sys
  args = [sys.executable, "-c", _LLAMACPP_CHILD, path, json.dumps([int(t) for t in prompt]), str(new_tokens),
          str(threads), "1" if extra_bufts else "0"]
  out = subprocess.run(args, capture_output=True, text=True, timeout=900)
  if out.returncode < 0:
    raise _PeerCrashed(f"the llama.cpp child died with signal {-out.returncode}")
  if out.returncode:
    raise RuntimeError(f"the llama.cpp child failed: {out.stderr.strip().splitlines()[-1:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])
