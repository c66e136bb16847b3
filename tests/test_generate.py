"""Greedy continuation equals repeated full forwards; ragged prompts and stop tokens behave."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from internlm_jax import PRESETS, forward, init_params
from internlm_jax.generate import generate

TINY = PRESETS["tiny"]


def _greedy_reference(params, prompt, n):
  tokens = list(prompt)
  for _ in range(n):
    logits = forward(params, jnp.asarray([tokens], jnp.int32), TINY)
    tokens.append(int(jnp.argmax(logits[0, -1])))
  return tokens[len(prompt):]


def test_greedy_generate_matches_full_forward_for_ragged_prompts():
  params = init_params(TINY, jax.random.key(0))
  prompts = [[5, 9, 13, 2 + 100, 7], [11, 3]]
  out = generate(params, TINY, prompts, max_new_tokens=6, stop_ids=(-1,))
  assert out == [_greedy_reference(params, p, 6) for p in prompts]


def test_generation_stops_at_stop_ids_and_sampling_is_seeded():
  params = init_params(TINY, jax.random.key(0))
  first = generate(params, TINY, [[5, 9]], max_new_tokens=4, stop_ids=(-1,))[0]
  assert generate(params, TINY, [[5, 9]], max_new_tokens=4, stop_ids=(first[1],)) == [first[:first.index(first[1])]]
  a = generate(params, TINY, [[5, 9]], 8, temperature=1.0, seed=3)
  assert a == generate(params, TINY, [[5, 9]], 8, temperature=1.0, seed=3)
  with pytest.raises(ValueError, match="at least one token"):
    generate(params, TINY, [[]], 4)


def test_script_errors_are_one_line(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join(root, "experiments", "generate.py"),
                         f"--hf_checkpoint={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing'}: no such checkpoint folder"
