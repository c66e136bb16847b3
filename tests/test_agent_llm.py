"""LLM backends: the OpenAI HTTP client against a fake server on 127.0.0.1 (agents and the benchmark over it),
and the in-process backend on a tiny random model (noise, but the loop must end cleanly within budget)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from internlm_jax.agent import (InProcessLLM, InternLM2Agent, LLMError, OpenAIClient, ReActAgent, ScriptedLLM,
                                calculator)
from internlm_jax.agent.bench import format_report, oracle_llm, run_benchmark
from internlm_jax.agent.llm import cut_at_stop


class FakeOpenAI:
  """An OpenAI-compatible /v1/chat/completions on 127.0.0.1: `answer(body) -> (http code, JSON payload)`."""

  def __init__(self, answer):
    self.requests = []
    outer = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        code, payload = answer(body)
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def completion(content=None, tool_calls=None):
  message = {"role": "assistant", "content": content}
  if tool_calls:
    message["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                              "function": {"name": n, "arguments": json.dumps(a)}}
                             for i, (n, a) in enumerate(tool_calls)]
  return 200, {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}]}


def test_cut_at_stop_and_scripted_llm():
  assert cut_at_stop("a STOP b END", ["END", "STOP"]) == ("a ", True)
  assert cut_at_stop("abc", None) == ("abc", False)
  llm = ScriptedLLM(["one Observation: two"])
  assert llm.chat([], stop=["Observation:"]).text == "one "
  with pytest.raises(LLMError, match="only 1 replies"):
    llm.chat([])


def test_internlm2_agent_over_http_tool_calls():
  replies = iter([completion(tool_calls=[("calculator", {"expression": "6 * 7"})]), completion("It is 42.")])
  server = FakeOpenAI(lambda body: next(replies))
  try:
    llm = OpenAIClient(server.url, "tiny", api_key="sk-test")
    result = InternLM2Agent(llm, [calculator]).run("6 times 7?")
  finally:
    server.close()
  assert result.final_answer == "It is 42." and result.status == "finished"
  first, second = (r["body"] for r in server.requests)
  assert server.requests[0]["path"] == "/v1/chat/completions" and server.requests[0]["auth"] == "Bearer sk-test"
  assert first["model"] == "tiny" and first["tools"][0]["function"]["name"] == "calculator"
  assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_0", "content": "42"}
  assert second["messages"][-2]["tool_calls"][0]["id"] == "call_0"


def test_http_retries_errors_and_unreachable():
  calls = {"n": 0}

  def flaky(body):
    calls["n"] += 1
    return (503, {"error": "busy"}) if calls["n"] == 1 else completion("Final Answer: ok")
  server = FakeOpenAI(flaky)
  try:
    result = ReActAgent(OpenAIClient(server.url, "m", backoff_s=0.01), [calculator]).run("q")
    assert result.final_answer == "ok" and calls["n"] == 2
    assert server.requests[-1]["body"]["stop"] == ["Observation:"]
  finally:
    server.close()

  bad = FakeOpenAI(lambda body: (400, {"error": {"message": "unknown model"}}))
  try:
    with pytest.raises(LLMError, match="HTTP 400.*unknown model"):
      OpenAIClient(bad.url, "m", backoff_s=0.01).chat([{"role": "user", "content": "x"}])
    assert len(bad.requests) == 1  # client errors are not retried
  finally:
    bad.close()

  down = OpenAIClient(bad.url, "m", retries=1, backoff_s=0.01, timeout_s=2)
  result = ReActAgent(down, [calculator]).run("q")
  assert result.status == "llm_error" and "cannot reach" in result.error
  with pytest.raises(ValueError, match="http"):
    OpenAIClient("127.0.0.1:8000", "m")


def test_benchmark_runs_against_an_endpoint():
  oracle = oracle_llm("react")  # the "model" behind the fake endpoint

  def answer(body):
    reply = oracle.chat(body["messages"], stop=body.get("stop"))
    return completion(reply.text)
  server = FakeOpenAI(answer)
  try:
    llm = OpenAIClient(server.url, "oracle")
    report = run_benchmark(lambda tools: ReActAgent(llm, tools, max_steps=4))
  finally:
    server.close()
  print(format_report(report))
  assert report["accuracy"] == 1.0 and report["valid_call_rate"] == 1.0 and report["tasks"] == 9


def test_in_process_backend_runs_agents_within_budget(tmp_path):
  from internlm_jax.serve.testing import tiny_model, tiny_tokenizer
  tok = tiny_tokenizer(tmp_path)
  config, params = tiny_model("tiny", max_position_embeddings=4096)
  llm = InProcessLLM(params, config, tok)
  start = time.monotonic()
  result = InternLM2Agent(llm, [calculator], max_turns=2, max_tokens=12, max_seconds=120).run("What is 2 + 2?")
  assert result.status in ("finished", "max_steps") and 1 <= result.llm_calls <= 2
  assert result.steps and time.monotonic() - start < 120
  result = ReActAgent(llm, [calculator], max_steps=1, max_tokens=8).run("2 + 2?")
  assert result.status in ("finished", "max_steps") and result.llm_calls == 1
  with pytest.raises(LLMError, match="fills the context"):
    InProcessLLM(params, config.replace(max_position_embeddings=8), tok).chat([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_agents_against_our_server_on_a_tiny_model(tmp_path):
  """Our OpenAI-compatible server (uvicorn on 127.0.0.1) with a tiny random model: its replies are noise, but each
  agent's loop must end cleanly within its budget."""
  uvicorn = pytest.importorskip("uvicorn")
  from internlm_jax.serve.api import create_app
  from internlm_jax.serve.engine import Engine, EngineConfig
  from internlm_jax.serve.scheduler import Scheduler
  from internlm_jax.serve.testing import tiny_model, tiny_tokenizer
  config, params = tiny_model("tiny", max_position_embeddings=4096)
  tok = tiny_tokenizer(tmp_path)
  engine = Engine(params, config, EngineConfig(max_slots=2, max_seq_len=1024, page_size=16, prefill_chunk=128,
                                               steps_per_call=8, sample_vocab=tok.vocab_size))
  sched = Scheduler(engine, tok, max_queue=4).start()
  server = uvicorn.Server(uvicorn.Config(create_app(sched, tok, "tiny"), host="127.0.0.1", port=0,
                                         log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  try:
    while not server.started:
      time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    llm = OpenAIClient(url, "tiny", timeout_s=120)
    result = InternLM2Agent(llm, [calculator], max_turns=2, max_tokens=16, max_seconds=180).run("2 + 2?")
    assert result.status in ("finished", "max_steps") and 1 <= result.llm_calls <= 2
    result = ReActAgent(llm, [calculator], max_steps=2, max_tokens=16, max_seconds=180).run("2 + 2?")
    assert result.status in ("finished", "max_steps") and result.llm_calls <= 2
  finally:
    server.should_exit = True
    thread.join()
    sched.stop()
