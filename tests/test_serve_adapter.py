"""`--adapter=DIR` of serve.py, chat.py and evaluate.py: a saved LoRA adapter merged into its base at load time
(serve.loading.load_model, lora_io), exactly as apply_lora runs it, before the dtype cast and quantization, and
one-line errors for an adapter that does not fit the base."""
import contextlib
import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax import forward, hf_io
from internlm_jax import lora as L
from internlm_jax import lora_io as LIO
from internlm_jax.quant import quantize_params
from internlm_jax.serve import loading
from internlm_jax.serve.testing import tiny_model

LCFG = L.LoraConfig(rank=4, alpha=8.0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _adapter(config, lcfg=LCFG, seed=1, scale=0.05):
  """A random adapter with nonzero b, built on the host (no compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32),
                      L.lora_specs(config, lcfg), is_leaf=lambda x: isinstance(x, L.ParamSpec))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """The tiny base as an HF folder and an adapter for it, as experiments/finetune.py leaves them."""
  root = tmp_path_factory.mktemp("adapter")
  config, params = tiny_model()
  lora = _adapter(config)
  hf_io.save_hf_checkpoint(root / "hf", config, params)
  LIO.save_adapter(root / "adapter", config, LCFG, lora, base_model_name_or_path=str(root / "hf"))
  return types.SimpleNamespace(root=root, hf=str(root / "hf"), adapter=str(root / "adapter"), config=config,
                               params=params, lora=lora)


def _mismatched(a, b) -> float:
  return float(np.mean(np.asarray(a) != np.asarray(b)))


def test_adapter_merged_at_load_gives_apply_lora_logits(saved):
  config, merged = loading.load_model(saved.hf, adapter=saved.adapter)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)), jnp.int32)
  fwd = jax.jit(lambda p: forward(p, tokens, saved.config))
  want = fwd(L.apply_lora(saved.params, saved.lora, LCFG))
  np.testing.assert_allclose(fwd(merged), want, atol=1e-5, rtol=1e-5)
  base = jax.device_put(saved.params, jax.devices()[0])  # committed like the loaded weights: no second compile
  assert float(jnp.abs(want - fwd(base)).max()) > 1e-2  # the adapter does change the model


def test_merge_in_float32_before_the_dtype_cast(saved):
  merged = L.merge(saved.params, saved.lora, LCFG)  # float32
  config, bf16 = loading.load_model(saved.hf, adapter=saved.adapter, dtype="bfloat16")
  assert config.param_dtype == config.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
  for got, want in zip(jax.tree.leaves(bf16), jax.tree.leaves(merged)):
    # Rounded once from the float32 merge (a merge into bfloat16 weights rounds twice: ~3 in 10 differ).
    assert _mismatched(got, want.astype(jnp.bfloat16)) < 1e-3


def test_merge_before_int8_quantization(saved):
  merged = L.merge(saved.params, saved.lora, LCFG)
  _, q8 = loading.load_model(saved.hf, adapter=saved.adapter, quant="int8")
  want, base = quantize_params(merged, "int8"), quantize_params(saved.params, "int8")
  assert jax.tree.structure(q8) == jax.tree.structure(want)
  for path in (("layers", "wqkv"), ("layers", "w2"), ("output",)):
    got, w, b = (L._get(t, path) for t in (q8, want, base))
    assert _mismatched(got.q, w.q) < 1e-3 and _mismatched(got.q, b.q) > 0.05
    np.testing.assert_allclose(got.scale, w.scale, rtol=1e-5)


def test_adapter_for_another_base_is_one_line_before_the_base_loads(saved, monkeypatch):
  def no_load(*args, **kwargs):
    raise AssertionError("the base was loaded before the adapter was checked")
  monkeypatch.setattr(loading, "_load", no_load)
  cases = {"hidden": ({"hidden_size": 32}, "trained for hidden 32, base .* has 64"),
           "layers": ({"num_layers": 3}, "trained for 3 layers, base .* has 2"),
           "mlp": ({"intermediate_size": 96}, "trained for mlp 96, base .* has 128"),
           "vocab": ({"vocab_size": 512}, "trained for vocab 512, base .* has 1024")}
  for name, (overrides, message) in cases.items():
    other = saved.config.replace(**overrides)
    folder = str(saved.root / f"for_{name}")
    LIO.save_adapter(folder, other, LCFG, _adapter(other), base_model_name_or_path="elsewhere/base")
    with pytest.raises(ValueError, match=message) as e:
      loading.load_model(saved.hf, adapter=folder)
    assert folder in str(e.value) and "\n" not in str(e.value) and "(elsewhere/base)" in str(e.value)
  with pytest.raises(FileNotFoundError, match="no such folder") as e:
    loading.load_model(saved.hf, adapter=str(saved.root / "missing"))
  assert str(saved.root / "missing") in str(e.value)
  os.makedirs(saved.root / "empty")
  with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
    loading.load_model(saved.hf, adapter=str(saved.root / "empty"))
  (saved.root / "empty" / LIO.ADAPTER_CONFIG).write_text((saved.root / "adapter" / LIO.ADAPTER_CONFIG).read_text())
  with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors") as e:
    loading.load_model(saved.hf, adapter=str(saved.root / "empty"))
  assert str(saved.root / "empty") in str(e.value) and "\n" not in str(e.value)


def test_missing_tensor_and_wrong_rank_name_the_tensor(saved):
  from safetensors.numpy import load_file, save_file
  config = saved.config
  tensors = load_file(os.path.join(saved.adapter, LIO.ADAPTER_WEIGHTS))
  folder = saved.root / "broken"
  os.makedirs(folder)
  (folder / LIO.ADAPTER_CONFIG).write_text((saved.root / "adapter" / LIO.ADAPTER_CONFIG).read_text())
  key = "base_model.model.model.layers.1.feed_forward.w2.lora_B.weight"
  save_file({k: v for k, v in tensors.items() if k != key}, str(folder / LIO.ADAPTER_WEIGHTS))
  with pytest.raises(ValueError, match=f"has no tensor {key}"):
    loading.load_model(saved.hf, adapter=str(folder))
  save_file({**tensors, key: np.zeros((config.hidden_size, 3), np.float32)}, str(folder / LIO.ADAPTER_WEIGHTS))
  with pytest.raises(ValueError, match=f"tensor {key} has rank 3, its adapter_config.json says r=4"):
    loading.load_model(saved.hf, adapter=str(folder))


@contextlib.contextmanager
def _script(name, monkeypatch):
  """experiments/NAME.py imported in-process (its absl flags defined), and its flags removed afterwards."""
  from absl import flags
  before = set(flags.FLAGS)
  monkeypatch.chdir(REPO)  # evaluate.py loads its default --config at import, relative to the checkout
  monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))  # ... and imports _launch from there
  spec = importlib.util.spec_from_file_location(f"_{name}_script", os.path.join(REPO, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    yield module, flags.FLAGS
  finally:
    flags.FLAGS.unparse_flags()
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)


def _assert_merged(params, saved):
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(L.merge(saved.params, saved.lora, LCFG))):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_serve_flags_merge_the_adapter_and_name_the_model_after_it(saved, monkeypatch):
  """experiments/serve.py's flags end to end, the engine and HTTP server stubbed out (nothing compiles)."""
  import uvicorn

  from internlm_jax.serve import api, scheduler
  seen = {}
  stub = types.SimpleNamespace(stop=lambda: None)
  stub.start = lambda: stub
  monkeypatch.setattr(loading, "find_tokenizer", lambda checkpoint, tok: types.SimpleNamespace(vocab_size=400))
  monkeypatch.setattr(loading, "build_engine", lambda config, params, ec, **kw: seen.update(params=params))
  monkeypatch.setattr(scheduler, "Scheduler", lambda *args, **kw: stub)
  monkeypatch.setattr(api, "create_app", lambda sched, tok, name, **kw: seen.update(name=name))
  monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
  with _script("serve", monkeypatch) as (serve, FLAGS):
    FLAGS(["serve.py", f"--checkpoint={saved.hf}", f"--adapter={saved.adapter}", "--port=0"])
    serve.main(["serve.py"])
    assert seen["name"] == "adapter"  # the adapter folder's name, unless --model_name
    _assert_merged(seen["params"], saved)
    FLAGS["adapter"].value = str(saved.root / "nope")
    with pytest.raises(SystemExit, match=r"^error: adapter .*nope: no such folder") as e:
      serve.main(["serve.py"])
    assert "\n" not in str(e.value.code)


def test_evaluate_flags_merge_the_adapter(saved, monkeypatch, tmp_path):
  """experiments/evaluate.py --checkpoint=BASE --adapter=DIR: the backend gets the merged weights."""
  from internlm_jax.eval import engine_backend
  from internlm_jax.eval import loading as eval_loading
  seen = {}
  monkeypatch.setattr(eval_loading, "Tokenizer", lambda path: "tokenizer")  # the tiny HF folder has none
  monkeypatch.setattr(engine_backend, "EngineBackend", lambda params, config, tok, name, **kw: seen.update(
      params=params, name=name))
  with _script("evaluate", monkeypatch) as (evaluate, FLAGS):
    FLAGS(["evaluate.py", f"--workdir={tmp_path}", f"--checkpoint={saved.hf}", f"--adapter={saved.adapter}",
           f"--tokenizer={saved.adapter}/{LIO.ADAPTER_CONFIG}"])
    evaluate._backend({})
    assert seen["name"] == "adapter"
    _assert_merged(seen["params"], saved)
    FLAGS["adapter"].value = str(saved.root / "nope")
    with pytest.raises(SystemExit, match=r"^error: adapter .*nope: no such folder"):
      evaluate._backend({})
