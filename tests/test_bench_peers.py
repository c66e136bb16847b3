"""The transformers peers of experiments/bench_serve.py on a tiny model: the int8 peer really is int8 (every
Linear replaced, weights per output channel), stays close to the float32 peer, and generates under the timer.
The llama.cpp peer's GGUF export takes an int8-quantized model."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from internlm_jax import PRESETS  # noqa: E402
from internlm_jax.serve.bench_peers import bench_transformers, llama_model, quantize_int8  # noqa: E402
from internlm_jax.serve.testing import tiny_model  # noqa: E402


def test_int8_peer_quantizes_every_linear_per_channel_and_tracks_float32():
  from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
  config, params = tiny_model()
  model = llama_model(config, params)
  ids = torch.tensor([[5, 6, 7, 8, 9]])
  with torch.no_grad():
    f32 = model(input_ids=ids).logits[0, -1].numpy()
  model, scheme = quantize_int8(model)
  assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
  quantized = [m for m in model.modules() if isinstance(m, DynamicLinear)]
  assert len(quantized) == 7 * config.num_layers + 1  # q, k, v, o, gate, up, down per layer, and lm_head
  weight = model.lm_head.weight()
  assert weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
  assert weight.q_per_channel_scales().shape == (config.vocab_size,)
  assert int(weight.q_per_channel_zero_points().abs().max()) == 0  # symmetric
  assert "per_channel" in scheme
  with torch.no_grad():
    int8 = model(input_ids=ids).logits[0, -1].numpy()
  err = np.abs(int8 - f32).max() / np.abs(f32).max()
  assert 0 < err < 0.1, err  # changed by quantization, but not broken

  tokens_per_sec, threads = bench_transformers(model, [[5, 6, 7, 8]] * 2, 4)
  assert tokens_per_sec > 0 and threads >= 1


def test_gguf_export_of_an_int8_model_holds_its_dequantized_weights(tmp_path):
  gguf = pytest.importorskip("gguf")
  from internlm_jax.quant import quantize
  from internlm_jax.serve.gguf import export_gguf, llama_tensors
  from internlm_jax.model import param_specs
  config, rng = PRESETS["tiny"], np.random.default_rng(0)  # host arrays: no init_params compile
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), param_specs(config),
                        is_leaf=lambda x: hasattr(x, "logical_axes"))
  wqkv = quantize(params["layers"]["wqkv"], 1)  # as quant.quantize_params stores it (a QArray, not an array)
  path = export_gguf(config, dict(params, layers=dict(params["layers"], wqkv=wqkv)), tmp_path / "int8.gguf", "f32")
  stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
  dequantized = dict(params, layers=dict(params["layers"], wqkv=wqkv.astype(np.float32)))
  want = llama_tensors(config, dequantized)["blk.0.attn_q.weight"]
  np.testing.assert_array_equal(stored["blk.0.attn_q.weight"].reshape(want.shape), want)


def test_llamacpp_peer_retries_a_crash_without_extra_buffer_types(tmp_path, monkeypatch):
  """A llama.cpp build that segfaults with its repacking buffer types (seen with AMX) costs one retry, not the
  benchmark, and the result says which setting ran; a crash without them is an error naming the file."""
  from internlm_jax.serve import bench_peers
  config, params = tiny_model()
  calls = []

  def child(path, prompt, new_tokens, threads, extra_bufts):
    calls.append(extra_bufts)
    if extra_bufts:
      raise bench_peers._PeerCrashed("the llama.cpp child died with signal 11")
    return {"seconds": 0.5, "tokens": [1] * new_tokens, "first": [0.0] * config.vocab_size}

  monkeypatch.setattr(bench_peers, "_llamacpp_child", child)
  monkeypatch.setattr(bench_peers, "_thread_counts", lambda: [1, 2])
  rate, threads, tokens, first, extra_bufts = bench_peers.bench_llamacpp(config, params, [5, 6], 4, "f32", tmp_path)
  assert calls == [True, False, False] and extra_bufts is False and rate == 8.0 and first.shape == (config.vocab_size,)
  assert not list(tmp_path.iterdir())  # the exported file is removed

  monkeypatch.setattr(bench_peers, "_llamacpp_child",
                      lambda *a: (_ for _ in ()).throw(bench_peers._PeerCrashed("signal 11")))
  with pytest.raises(RuntimeError, match="even without extra buffer types"):
    bench_peers.bench_llamacpp(config, params, [5, 6], 4, "f32", tmp_path)
  assert not list(tmp_path.iterdir())
