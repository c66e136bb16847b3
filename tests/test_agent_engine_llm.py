"""EngineLLM: agents over our model through the serving engine, on a tiny random model (its replies are noise, but
each loop must end cleanly within budget)."""
import time

import pytest

from internlm_jax.agent import InternLM2Agent, LLMError, ReActAgent, calculator
from internlm_jax.agent.llm import EngineLLM
from internlm_jax.serve.testing import tiny_model, tiny_tokenizer


def test_engine_llm_runs_agents_within_budget(tmp_path):
  tok = tiny_tokenizer(tmp_path)
  config, params = tiny_model("tiny", max_position_embeddings=4096)  # the tool prompt outgrows 512 tokens
  llm = EngineLLM(params, config, tok)
  try:
    start = time.monotonic()
    result = InternLM2Agent(llm, [calculator], max_turns=2, max_tokens=12, max_seconds=120).run("What is 2 + 2?")
    assert result.status in ("finished", "max_steps") and 1 <= result.llm_calls <= 2
    assert result.steps and time.monotonic() - start < 120
    result = ReActAgent(llm, [calculator], max_steps=1, max_tokens=8).run("2 + 2?")
    assert result.status in ("finished", "max_steps") and result.llm_calls == 1
    reply = llm.chat([{"role": "user", "content": "hi"}], max_tokens=5)
    assert reply.finish_reason in ("stop", "length") and "<|im_end|>" not in reply.text
    # A special piece as a stop string stops on device; plain stop strings are matched in the text.
    params_ = llm.session.sampling_params(8, ["<|action_end|>", "Observation:"])
    assert params_.stop_token_ids == (tok.special_ids["<|action_end|>"],)
    assert llm.session.scheduler.stats()["running"] == 0
  finally:
    llm.close()
  short = EngineLLM(params, config, tok, max_seq_len=16)
  try:
    with pytest.raises(LLMError, match="fills the context"):
      short.chat([{"role": "user", "content": "hi"}])
  finally:
    short.close()
