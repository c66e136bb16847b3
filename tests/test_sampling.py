"""The batched sampler's logits processing against independent computations: HF's repetition penalty
processor, and jax.nn.log_softmax for the reported logprobs (which the engine computes without writing the
[B, V] log-softmax)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.serve import sampling

B, V = 4, 50


def _logits(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, V)) * 3, jnp.float32)


def _sample_greedy(logits, penalty, seen):
  zeros = jnp.zeros((B,), jnp.float32)
  keys = sampling.request_keys(jnp.zeros((B,), jnp.uint32), jnp.zeros((B,), jnp.int32))
  return sampling.sample(logits, keys, zeros, jnp.zeros((B,), jnp.int32), jnp.ones((B,)), zeros, penalty, seen)


def test_repetition_penalty_matches_transformers_and_only_rows_that_ask():
  torch = pytest.importorskip("torch")
  from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
  logits = _logits()
  history = np.asarray(jnp.argsort(-logits, axis=-1)[:, :3])  # each row has seen its three best tokens
  seen = np.zeros((B, V), bool)
  np.put_along_axis(seen, history, True, axis=-1)
  penalty = jnp.asarray([1.0, 1.3, 1.0, 2.0], jnp.float32)
  got = _sample_greedy(logits, penalty, jnp.asarray(seen))
  for b in range(B):
    scores = RepetitionPenaltyLogitsProcessor(float(penalty[b]))(torch.tensor(history[b:b + 1]),
                                                               torch.tensor(np.asarray(logits[b:b + 1])))
    assert int(got[b]) == int(scores.argmax(-1)[0]), b
  assert int(got[0]) == int(jnp.argmax(logits[0])) and int(got[3]) != int(jnp.argmax(logits[3]))
  # No row with a penalty: the penalty pass is skipped and tokens are the plain argmax.
  none = _sample_greedy(logits, jnp.ones((B,)), jnp.asarray(seen))
  np.testing.assert_array_equal(none, jnp.argmax(logits, axis=-1))


def test_chosen_logprobs_equal_log_softmax_and_top_search_only_when_asked():
  logits = _logits(1)
  tokens = jnp.asarray([3, 0, V - 1, 17], jnp.int32)
  want = jnp.asarray([False, True, False, False])
  chosen, top_ids, top_lp = jax.jit(sampling.chosen_logprobs, static_argnums=3)(logits, tokens, want, 5)
  reference = jax.nn.log_softmax(logits, axis=-1)
  np.testing.assert_allclose(chosen, reference[jnp.arange(B), tokens], rtol=0, atol=1e-6)
  ref_lp, ref_ids = jax.lax.top_k(reference, 5)
  np.testing.assert_array_equal(top_ids, ref_ids)
  np.testing.assert_allclose(top_lp, ref_lp, rtol=0, atol=1e-6)
  _, ids, lp = sampling.chosen_logprobs(logits, tokens, jnp.zeros((B,), bool), 5)
  assert not np.asarray(ids).any() and not np.asarray(lp).any()
