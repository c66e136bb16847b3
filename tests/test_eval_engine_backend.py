"""EngineBackend on a tiny random model: the same greedy tokens as the dense InProcessBackend, stop strings that end
decoding early, seeded samples independent of the batch, and scoring unchanged."""
import pytest

from internlm_jax.eval import backends
from internlm_jax.eval.engine_backend import EngineBackend
from internlm_jax.eval.testing import tiny_backend

PROMPTS = ["Question: What is 2 + 3? Answer:", "ROMEO: But soft", "def add(a, b):", "The quick brown fox",
           "Which option is right? A. red"]  # one more than the slots: a prompt waits for a free slot


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  dense = tiny_backend(str(tmp_path_factory.mktemp("tok")), batch_size=4, max_length=128)
  engine = EngineBackend(dense.params, dense.config, dense.tokenizer, name="tiny", batch_size=4, max_length=128)
  yield dense, engine
  engine.close()


def test_greedy_generations_equal_the_dense_path(pair):
  dense, engine = pair
  ids = [[dense.tokenizer.bos_id] + dense.tokenizer.encode(p) for p in PROMPTS]
  want = dense.generate_tokens(ids, 10)
  assert engine.generate_tokens(ids, 10) == want
  assert any(len(w) == 10 for w in want)  # not all cut short by a stop token
  assert engine.generate(PROMPTS, max_tokens=10) == dense.generate(PROMPTS, max_tokens=10)
  assert engine.fingerprint == dense.fingerprint  # same generations, so one per-sample cache
  assert engine.generate(PROMPTS[:1], max_tokens=0) == [""]
  with pytest.raises(backends.BackendError, match="no room for a prompt"):
    engine.generate(PROMPTS[:1], max_tokens=128)


def test_stop_strings_end_decoding_early(pair):
  dense, engine = pair
  session, tok = engine.session, dense.tokenizer
  ids = [tok.bos_id] + tok.encode(PROMPTS[1])
  full, = session.run([ids], session.sampling_params(24))
  assert len(full.token_ids) == 24 and full.reason == "length"
  # A stop string that first shows within the first three tokens' text.
  early = tok.decode([t for t in full.token_ids[:3] if t < tok.vocab_size], skip_special_tokens=True).strip()
  assert early, "the random model's first tokens have no text; pick another prompt"
  stop = early[-1]
  cut, = session.run([ids], session.sampling_params(24, stop=[stop]))
  assert cut.reason == "stop" and cut.text == full.text[:full.text.find(stop)]
  # Decoding ended within one engine call (steps_per_call tokens) of the stop, not at max_tokens.
  assert len(cut.token_ids) <= 3 + session.engine.ec.steps_per_call < 24
  assert engine.generate([PROMPTS[1]], max_tokens=24, stop=[stop]) == dense.generate([PROMPTS[1]], max_tokens=24,
                                                                                      stop=[stop])


def test_seeded_samples_do_not_depend_on_the_batch(pair):
  _, engine = pair
  alone = engine.generate(PROMPTS[2:3], max_tokens=8, temperature=1.0, seed=3)
  together = engine.generate(PROMPTS, max_tokens=8, temperature=1.0, seed=3)
  assert together[2] == alone[0]
  assert engine.generate(PROMPTS[2:3], max_tokens=8, temperature=1.0, seed=4) != alone


def test_loglikelihood_is_the_dense_forward(pair):
  dense, engine = pair
  requests = [("Question: What is 2 + 3? Answer:", " 5"), ("ROMEO: But soft", ", what light")]
  assert backends.loglikelihood(engine, requests) == backends.loglikelihood(dense, requests)
