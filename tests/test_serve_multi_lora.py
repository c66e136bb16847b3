"""Several LoRA adapters served beside one base (serve/adapters.py): each slot's logits equal the dense forward of
the base with its own adapter applied (lora.apply_lora), base rows stay bitwise the base's, prefix pages are not
shared across adapters, and the HTTP API routes by model name."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax import forward
from internlm_jax.lora import LoraConfig, apply_lora, init_lora
from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.kv_cache import RequestTooLargeError
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.testing import tiny_model

EC = EngineConfig(max_slots=4, max_seq_len=64, page_size=8, prefill_chunk=16, steps_per_call=4)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _adapter(config, lcfg, seed):
  # A fresh adapter has b = 0 (the base exactly): random values everywhere, so each adapter changes the logits.
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_lora(config, lcfg, jax.random.key(seed)))
  return jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32), shapes)


@pytest.fixture(scope="module")
def setup():
  config, params = tiny_model()
  adapters = [(LoraConfig(rank=4, alpha=8.0), None), (LoraConfig(rank=8, alpha=4.0, targets=("wqkv", "w2")), None)]
  adapters = [(lcfg, _adapter(config, lcfg, j)) for j, (lcfg, _) in enumerate(adapters)]
  engine = Engine(params, config, EC, adapters=adapters)
  plain = Engine(params, config, EC)
  return config, params, adapters, engine, plain


_forward = jax.jit(forward, static_argnums=2)


def _dense_logits(config, params, tokens):
  return np.asarray(_forward(params, jnp.asarray([tokens], jnp.int32), config)[0])


def _run(engine, prompts_and_adapters, steps=4):
  """Greedy requests in slots 0..n-1 -> (first-token logits per slot, generated tokens per slot)."""
  state = engine.init_state()
  firsts = []
  for slot, (prompt, adapter) in enumerate(prompts_and_adapters):
    state, prefix = engine.prefill(state, prompt, adapter=adapter)
    firsts.append(np.asarray(prefix.logits))
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, adapter=adapter)
    state = engine.insert(prefix, state, slot, params, [], seed=0)
    engine.reserve(slot, steps)
  state, result = engine.generate(state, steps=steps)
  tokens = [result.tokens[:, slot].tolist() for slot in range(len(prompts_and_adapters))]
  for slot in range(len(prompts_and_adapters)):
    state = engine.free(state, slot)
  return firsts, tokens


def test_each_slot_decodes_with_its_own_adapter(setup):
  config, params, adapters, engine, plain = setup
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, 1000, 11).tolist()
  firsts, tokens = _run(engine, [(prompt, 0), (prompt, 1), (prompt, 2), (prompt, 1)])
  base_firsts, base_tokens = _run(plain, [(prompt, 0)])
  np.testing.assert_array_equal(firsts[0], base_firsts[0])  # the base row: bitwise the adapter-free engine's
  assert tokens[0] == base_tokens[0]
  for slot, adapter in ((1, 1), (2, 2), (3, 1)):
    lcfg, lora = adapters[adapter - 1]
    merged = apply_lora(params, lora, lcfg)
    dense = _dense_logits(config, merged, prompt + tokens[slot][:-1])
    np.testing.assert_allclose(firsts[slot], dense[len(prompt) - 1], rtol=2e-4, atol=2e-4)
    # Greedy decode agrees with the dense forward of the same adapter at every step.
    assert tokens[slot] == np.argmax(dense[len(prompt) - 1:], axis=-1).tolist()
    assert np.max(np.abs(firsts[slot] - firsts[0])) > 1e-2  # the adapter changes the model
  assert tokens[1] == tokens[3]


def test_prefix_pages_are_not_shared_across_adapters(setup):
  _, _, _, engine, _ = setup
  prompt = list(range(3, 3 + 24))  # three full pages
  state = engine.init_state()
  state, a = engine.prefill(state, prompt, adapter=1)
  state = engine.insert(a, state, 0, GREEDY, [], seed=0)
  state, b = engine.prefill(state, prompt, adapter=2)
  state, c = engine.prefill(state, prompt, adapter=1)
  assert b.cached_tokens == 0 and c.cached_tokens == 16  # the same adapter shares; another does not
  engine.release(b)
  engine.release(c)
  engine.free(state, 0)


def test_unknown_adapter_is_refused(setup):
  _, _, _, engine, plain = setup
  with pytest.raises(RequestTooLargeError, match="adapter 3"):
    engine.check_request([5, 6], 4, adapter=3)
  with pytest.raises(RequestTooLargeError, match="adapter 1"):
    plain.check_request([5, 6], 4, adapter=1)


def test_http_routes_by_model_name(setup, tmp_path):
  from fastapi.testclient import TestClient

  from internlm_jax.serve.api import create_app
  from internlm_jax.serve.scheduler import Scheduler
  from internlm_jax.serve.testing import tiny_tokenizer
  _, _, _, engine, _ = setup
  tok = tiny_tokenizer(tmp_path)
  sched = Scheduler(engine, tok, max_queue=8).start()
  try:
    with TestClient(create_app(sched, tok, "base", adapter_names=("one", "two"))) as client:
      listed = client.get("/v1/models").json()["data"]
      assert [m["id"] for m in listed] == ["base", "one", "two"] and listed[1]["parent"] == "base"
      assert client.get("/v1/models/two").json()["id"] == "two"
      body = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "temperature": 0.0, "logprobs": 0}
      texts = {}
      for model in ("base", "one", "two", "one"):
        r = client.post("/v1/completions", json={**body, "model": model})
        assert r.status_code == 200, r.text
        texts.setdefault(model, []).append(r.json()["choices"][0]["logprobs"]["token_logprobs"])
      assert texts["one"][0] == texts["one"][1]  # the same adapter: the same greedy logprobs
      assert texts["base"][0] != texts["one"][0] != texts["two"][0]
      r = client.post("/v1/completions", json={**body, "model": "three"})
      assert r.status_code == 404 and "'one'" in r.json()["error"]["message"]
  finally:
    sched.stop()


def test_adapters_flag_items_are_checked(setup, tmp_path):
  from internlm_jax.serve.loading import load_served_adapters
  config = setup[0]
  for spec, needle in ((["x"], "NAME=DIR"), (["=a"], "NAME=DIR"), ([f"a={tmp_path}/none"], "no such folder")):
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
      load_served_adapters(spec, config, base="b")


@pytest.mark.slow
def test_tensor_parallel_adapters_equal_single_device(setup):
  from internlm_jax import make_mesh
  config, params, adapters, engine, _ = setup
  mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
  sharded = Engine(params, config, EC, mesh=mesh, adapters=adapters)
  prompt = list(range(3, 14))
  want_firsts, want = _run(engine, [(prompt, 0), (prompt, 2), (prompt, 1)])
  got_firsts, got = _run(sharded, [(prompt, 0), (prompt, 2), (prompt, 1)])
  assert got == want
  np.testing.assert_allclose(np.stack(got_firsts), np.stack(want_firsts), rtol=1e-4, atol=1e-4)
