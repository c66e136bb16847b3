"""HF checkpoint I/O: bit-exact round trips, sharded files, loading onto a mesh, streaming reads, bad inputs,
and the convert script (HF -> params checkpoint -> HF)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from internlm_jax import PRESETS, ConfigError, init_params, make_mesh
from internlm_jax import hf_io
from internlm_jax.config import to_hf_config
from internlm_jax.model import param_shardings
from internlm_jax.params_io import load_params_checkpoint, save_params_checkpoint

TINY = PRESETS["tiny"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _assert_same(a, b):
  """Same tree, dtypes and bit patterns."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Tiny float32 params and a single-file HF folder of them."""
  params = init_params(TINY, jax.random.key(0))
  folder = str(tmp_path_factory.mktemp("hf") / "tiny")
  hf_io.save_hf_checkpoint(folder, TINY, params)
  return params, folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_then_load_is_bit_exact(tmp_path, dtype):
  config = TINY.replace(param_dtype=dtype)
  params = init_params(config, jax.random.key(1))
  hf_io.save_hf_checkpoint(tmp_path, config, params)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["torch_dtype"] == dtype
  loaded_config, loaded = hf_io.load_hf_checkpoint(tmp_path)
  assert loaded_config == config
  _assert_same(params, loaded)


def test_float16_files_and_dtype_casts(tmp_path, saved):
  params, _ = saved
  hf_io.save_hf_checkpoint(tmp_path, TINY, params, dtype="float16")
  config, loaded = hf_io.load_hf_checkpoint(tmp_path)  # keeps the checkpoint's dtype
  assert config.param_dtype == "float16"
  _assert_same(jax.tree.map(lambda x: np.asarray(x).astype(np.float16), params), loaded)
  config, loaded = hf_io.load_hf_checkpoint(tmp_path, dtype="float32")  # float16 -> float32 is exact
  assert config.param_dtype == "float32" and loaded["embed"].dtype == np.float32
  _assert_same(jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), params), loaded)


def test_sharded_save_writes_index_and_reference_reader_agrees(tmp_path, saved):
  params, _ = saved
  limit = 100_000  # the tiny model is ~0.8 MB in float32: several files
  hf_io.save_hf_checkpoint(tmp_path, TINY, params, max_shard_bytes=limit)
  with open(tmp_path / hf_io.INDEX_FILE) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files == sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
  reference = {}  # the safetensors library itself reads what we wrote
  for name in files:
    tensors = safetensors.numpy.load_file(tmp_path / name)
    assert all(index["weight_map"][k] == name for k in tensors)
    assert sum(t.nbytes for t in tensors.values()) <= limit or len(tensors) == 1
    reference.update(tensors)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in reference.values())
  expected = hf_io.to_hf_state_dict(TINY, params)
  assert sorted(reference) == sorted(expected)
  for k in expected:
    np.testing.assert_array_equal(reference[k], expected[k], err_msg=k)
  _, loaded = hf_io.load_hf_checkpoint(tmp_path)
  _assert_same(params, loaded)
  # Saving again with one file must not leave the old shards or index to shadow it.
  hf_io.save_hf_checkpoint(tmp_path, TINY, params)
  assert not any(p.startswith("model-") or p == hf_io.INDEX_FILE for p in os.listdir(tmp_path))


@pytest.mark.parametrize("axes", [dict(fsdp=8), dict(fsdp=4, tensor=2)], ids=["fsdp8", "fsdp4_tensor2"])
def test_load_onto_mesh_gives_intended_shardings(saved, axes):
  params, folder = saved
  mesh = make_mesh(**axes)
  _, loaded = hf_io.load_hf_checkpoint(folder, mesh=mesh)
  expected = param_shardings(TINY, mesh)
  for (path, x), want in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(expected)):
    assert x.sharding == want, jax.tree_util.keystr(path)
  assert not loaded["layers"]["wqkv"].sharding.is_fully_replicated
  _assert_same(params, loaded)


def test_loading_streams_one_shard_slice_at_a_time(saved, monkeypatch):
  """On fsdp=4 x tensor=2 every matrix is split 8 ways: each read is one layer's 1/8 slice, every matrix byte is
  read exactly once, and no read covers a whole tensor, let alone a stacked weight."""
  _, folder = saved
  reads = []
  original = hf_io._Source.read

  def recording_read(self, name, view, index):
    out = original(self, name, view, index)
    reads.append((name, out.nbytes))
    return out

  monkeypatch.setattr(hf_io._Source, "read", recording_read)
  hf_io.load_hf_checkpoint(folder, mesh=make_mesh(fsdp=4, tensor=2))
  full = {k: v.nbytes for k, v in safetensors.numpy.load_file(os.path.join(folder, "model.safetensors")).items()}
  matrices = {k for k in full if not k.endswith("norm.weight")}
  for name, nbytes in reads:
    assert name in full  # per-layer names only: reads never span layers
    if name in matrices:
      assert nbytes * 8 == full[name], name
  read_total = {}
  for name, nbytes in reads:
    read_total[name] = read_total.get(name, 0) + nbytes
  assert all(read_total[k] == full[k] for k in matrices)


def _write_folder(folder, tensors, hf_config=None):
  """An HF folder written with the reference safetensors writer."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config or to_hf_config(TINY), f)
  safetensors.numpy.save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _bad(kind, tensors):
  tensors = dict(tensors)
  hf_config = None
  if kind == "missing":
    del tensors["model.layers.1.feed_forward.w3.weight"]
  elif kind == "misshaped":
    tensors["model.layers.0.attention.wqkv.weight"] = np.zeros((64, 64), np.float32)
  elif kind == "llama":
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)
  elif kind == "extra_layer":
    tensors["model.layers.2.ffn_norm.weight"] = np.ones((64,), np.float32)
  elif kind == "not_internlm2":
    hf_config = dict(to_hf_config(TINY), model_type="llama", architectures=["LlamaForCausalLM"])
  return tensors, hf_config


@pytest.mark.parametrize("kind,error,words", [
    ("missing", hf_io.CheckpointError, ["missing tensor", "model.layers.1.feed_forward.w3.weight"]),
    ("misshaped", hf_io.CheckpointError, ["model.layers.0.attention.wqkv.weight", "[64, 64]", "[128, 64]"]),
    ("llama", hf_io.CheckpointError, ["model.layers.0.self_attn.q_proj.weight", "not an InternLM2"]),
    ("extra_layer", hf_io.CheckpointError, ["unexpected", "model.layers.2.ffn_norm.weight"]),
    ("not_internlm2", ConfigError, ["config.json", "model_type", "'llama'"]),
])
def test_bad_checkpoint_gives_one_line_error_naming_it(tmp_path, saved, kind, error, words):
  params, _ = saved
  tensors, hf_config = _bad(kind, hf_io.to_hf_state_dict(TINY, params))
  _write_folder(tmp_path / "ckpt", tensors, hf_config)
  with pytest.raises(error) as info:
    hf_io.load_hf_checkpoint(tmp_path / "ckpt")
  message = str(info.value)
  assert "\n" not in message and all(w in message for w in words), message
  if kind != "not_internlm2":  # the in-memory path gives the same errors
    with pytest.raises(error, match="tensor"):
      hf_io.from_hf_state_dict(TINY, tensors)


def test_missing_folder_or_config_names_the_path(tmp_path, saved):
  with pytest.raises(hf_io.CheckpointError, match="no such checkpoint folder"):
    hf_io.load_hf_checkpoint(tmp_path / "nowhere")
  _, folder = saved
  os.makedirs(tmp_path / "noconfig")
  os.link(os.path.join(folder, "model.safetensors"), tmp_path / "noconfig" / "model.safetensors")
  with pytest.raises(hf_io.CheckpointError, match=r"noconfig/config\.json: missing"):
    hf_io.load_hf_checkpoint(tmp_path / "noconfig")
  os.makedirs(tmp_path / "noweights")
  with open(tmp_path / "noweights" / "config.json", "w") as f:
    json.dump(to_hf_config(TINY), f)
  with pytest.raises(hf_io.CheckpointError, match=r"no \*\.safetensors"):
    hf_io.load_hf_checkpoint(tmp_path / "noweights")
  open(tmp_path / "noweights" / "pytorch_model.bin", "wb").close()
  with pytest.raises(hf_io.CheckpointError, match=r"only pytorch_model\*\.bin weights.*save_pretrained"):
    hf_io.load_hf_checkpoint(tmp_path / "noweights")


def test_tied_head_loads_from_the_embedding_and_quantized_params_are_refused(tmp_path, saved):
  params, _ = saved
  tensors = hf_io.to_hf_state_dict(TINY, params)
  del tensors["output.weight"]  # what save_pretrained writes for a tied model
  _write_folder(tmp_path / "tied", tensors, dict(to_hf_config(TINY), tie_word_embeddings=True))
  _, loaded = hf_io.load_hf_checkpoint(tmp_path / "tied")
  np.testing.assert_array_equal(np.asarray(loaded["output"]), np.asarray(params["embed"]).T)
  from internlm_jax.quant import quantize_params
  with pytest.raises(hf_io.CheckpointError, match="layers/wqkv is quantized"):
    hf_io.save_hf_checkpoint(tmp_path / "q", TINY, quantize_params(params, "int8"))


def test_state_dict_round_trip_in_memory(saved):
  params, _ = saved
  tensors = hf_io.to_hf_state_dict(TINY, params)
  assert tensors["model.layers.0.attention.wqkv.weight"].shape == (8 * 16, 64)  # (H + 2K) * D rows
  assert tensors["output.weight"].shape == (TINY.vocab_size, 64)
  _assert_same(params, hf_io.from_hf_state_dict(TINY, tensors))


def _convert_module():
  # The library function behind experiments/convert.py (importing the script would redefine absl flags).
  from internlm_jax import params_io
  return params_io


def test_convert_hf_to_params_checkpoint_and_back_is_bit_exact(tmp_path):
  config = TINY.replace(param_dtype="bfloat16")
  params = init_params(config, jax.random.key(2))
  hf_io.save_hf_checkpoint(tmp_path / "hf", config, params)
  # The chat pieces' names (tokenizer_config.json) and the remote code must survive both directions.
  carried = {"tokenizer_config.json": '{"added_tokens_decoder": {}}', "modeling_internlm2.py": "# remote code\n"}
  for name, text in carried.items():
    (tmp_path / "hf" / name).write_text(text)
  # The command line (absl flags) for one direction, the function for the other.
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "convert.py"), f"--from_hf={tmp_path / 'hf'}",
                  f"--to={tmp_path / 'ckpt'}"], check=True, capture_output=True, timeout=120)
  ckpt_config, ckpt_params = load_params_checkpoint(tmp_path / "ckpt")
  assert ckpt_config == config
  _assert_same(params, ckpt_params)
  _convert_module().convert(from_ckpt=str(tmp_path / "ckpt"), to_hf=str(tmp_path / "hf2"))
  for name in ("model.safetensors", "config.json", *carried):
    with open(tmp_path / "hf" / name, "rb") as a, open(tmp_path / "hf2" / name, "rb") as b:
      assert a.read() == b.read(), name
  # --to_gguf (issue: GGUF export from convert.py): the llama-layout tensors, and the checkpoint's vocabulary.
  import gguf
  from internlm_jax.serve.gguf import llama_tensors
  from internlm_jax.serve.testing import tiny_tokenizer
  tok = tiny_tokenizer(tmp_path / "tok")
  for ext in (".model", ".vocab"):
    os.replace(str(tmp_path / "tok" / "tiny_tok") + ext, tmp_path / "ckpt" / f"tokenizer{ext}")
  _convert_module().convert(from_ckpt=str(tmp_path / "ckpt"), to_gguf=str(tmp_path / "m.gguf"), gguf_type="f32")
  reader = gguf.GGUFReader(tmp_path / "m.gguf")
  expected = llama_tensors(config, ckpt_params)
  assert {t.name for t in reader.tensors} == set(expected)
  for t in reader.tensors:
    np.testing.assert_array_equal(np.asarray(t.data).reshape(expected[t.name].shape), expected[t.name])
  tokens = reader.fields["tokenizer.ggml.tokens"]
  pieces = [bytes(tokens.parts[i]).decode() for i in tokens.data]
  assert len(pieces) == config.vocab_size and pieces[tok.special_ids["<|im_end|>"]] == "<|im_end|>"
  with pytest.raises(ValueError, match="--to_gguf=FILE takes one source"):
    _convert_module().convert(from_ckpt=str(tmp_path / "ckpt"), from_hf=str(tmp_path / "hf"),
                              to_gguf=str(tmp_path / "x.gguf"))


@pytest.mark.parametrize("file_type,tol", [("f16", 1e-3), ("q8_0", 1e-2)])  # of each weight's largest value
def test_gguf_f16_and_q8_0_store_matmul_weights_in_that_type(tmp_path, saved, file_type, tol):
  # The slow llama.cpp test runs f32 and q8_0 files; here only what is written (norms stay f32, as llama.cpp's
  # own converter keeps them).
  import gguf
  from internlm_jax.serve.gguf import export_gguf, llama_tensors
  params, _ = saved
  reader = gguf.GGUFReader(export_gguf(TINY, params, tmp_path / "m.gguf", file_type))
  expected = llama_tensors(TINY, params)
  want_type = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[file_type]
  for t in reader.tensors:
    w = expected[t.name]
    assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if w.ndim == 1 else want_type), t.name
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    assert np.abs(got - w).max() <= tol * np.abs(w).max(), t.name


def test_params_checkpoint_restores_onto_mesh(tmp_path, saved):
  params, _ = saved
  save_params_checkpoint(tmp_path, TINY, params)
  mesh = make_mesh(fsdp=4, tensor=2)
  config, restored = load_params_checkpoint(tmp_path, mesh=mesh)
  assert config == TINY
  assert restored["layers"]["w1"].sharding == param_shardings(TINY, mesh)["layers"]["w1"]
  _assert_same(params, restored)
