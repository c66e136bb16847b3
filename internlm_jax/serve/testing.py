"""Small fixtures for serving tests and demos: a tiny random model and a tokenizer trained on a few sentences."""
from __future__ import annotations

import contextlib
import os
import threading
import time

import jax

from internlm_jax.config import PRESETS, ModelConfig
from internlm_jax.model import init_params
from internlm_jax.tokenizer import Tokenizer, train_tokenizer

CORPUS = ("The quick brown fox jumps over the lazy dog. InternLM2 serves chat requests with tools.\n"
          'What is the weather in Paris? {"name": "get_weather", "parameters": {"city": "Paris"}}\n'
          "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ! ? ; : ( ) [ ] { } \" '\n")


def tiny_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """A ~400-piece InternLM2-style tokenizer (with the chat pieces) that fits the tiny presets' 1024 vocab."""
  return Tokenizer(train_tokenizer(os.path.join(os.fspath(directory), "tiny_tok"), 400, texts=[CORPUS * 8]))


def tiny_model(preset: str = "tiny", seed: int = 0, **overrides) -> tuple[ModelConfig, dict]:
  config = PRESETS[preset].replace(**overrides)
  return config, init_params(config, jax.random.key(seed))


def greedy_run(params, config: ModelConfig, prompt, new_tokens: int, max_slots: int = 1, steps: int = 4):
  """One greedy request (slot 0) on a small engine, for comparing decode paths -> (engine, prefix, tokens,
  final state); `new_tokens` a multiple of `steps`."""
  from internlm_jax.serve.engine import Engine, EngineConfig
  from internlm_jax.serve.sampling import SamplingParams
  ec = EngineConfig(max_slots=max_slots, max_seq_len=64, page_size=8, prefill_chunk=16, steps_per_call=steps)
  engine = Engine(params, config, ec)
  state, prefix = engine.prefill(engine.init_state(), prompt)
  greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
  state = engine.insert(prefix, state, 0, greedy, [], seed=0)
  tokens = []
  for _ in range(new_tokens // steps):
    engine.reserve(0, steps)
    state, result = engine.generate(state)
    tokens += result.tokens[:, 0].tolist()
  return engine, prefix, tokens, state


@contextlib.contextmanager
def loopback_server(app, **uvicorn_options):
  """Serves `app` with uvicorn from a thread on 127.0.0.1 (a port the OS picks); yields the base URL.
  `uvicorn_options` go to uvicorn.Config (e.g. limit_concurrency, backlog for load tests)."""
  import uvicorn
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_options))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      raise RuntimeError("uvicorn did not start within 30 s")
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(timeout=30)


@contextlib.contextmanager
def tiny_api(directory: str | os.PathLike, model_name: str = "tiny-internlm2", max_seq_len: int = 160):
  """The tiny model behind a running scheduler (2 slots, queue of 4) and its app in a TestClient; yields
  (client, scheduler, tokenizer, (config, params)) and stops the scheduler after."""
  from fastapi.testclient import TestClient

  from internlm_jax.serve.api import create_app
  from internlm_jax.serve.engine import Engine, EngineConfig
  from internlm_jax.serve.scheduler import Scheduler
  config, params = tiny_model()
  tok = tiny_tokenizer(directory)
  ec = EngineConfig(max_slots=2, max_seq_len=max_seq_len, page_size=8, prefill_chunk=32, steps_per_call=4,
                    sample_vocab=tok.vocab_size)
  sched = Scheduler(Engine(params, config, ec), tok, max_queue=4).start()
  try:
    with TestClient(create_app(sched, tok, model_name), raise_server_exceptions=False) as client:
      yield client, sched, tok, (config, params)
  finally:
    sched.stop()
