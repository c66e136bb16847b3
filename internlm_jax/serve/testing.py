"""Small fixtures for serving tests and demos: a tiny random model and a tokenizer trained on a few sentences."""
from __future__ import annotations

import os

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
