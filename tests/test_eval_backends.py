"""The in-process backend against training's loss, and the OpenAI HTTP backend against the in-process one."""
import jax
import numpy as np
import pytest

from internlm_jax.data import pipeline
from internlm_jax.eval import backends, inferencers
from internlm_jax.eval.cache import SampleCache
from internlm_jax.eval.openai_backend import OpenAIBackend
from internlm_jax.eval.testing import CORPUS, fake_openai_server, tiny_backend
from internlm_jax.train.step import cross_entropy_sums

REQUESTS = [("Question: What is 2 + 3? Answer:", " 5"), ("ROMEO: But soft", ", what light"), ("", "hello"),
            ("Which option is right? A. red B. green C. blue D. yellow. Answer:", " B")]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  return tiny_backend(str(tmp_path_factory.mktemp("tok")), batch_size=4)


def test_loglikelihood_equals_the_training_loss(local):
  doc = "ROMEO: But soft, what light through yonder window breaks? It is the east."
  ds = pipeline.make_pretrain_dataset([doc], local.tokenizer, seq_len=64, batch_size=1, shuffle=False,
                                      num_epochs=1, shard_index=0, shard_count=1)
  batch = next(iter(ds))
  loss_sum, count = jax.jit(lambda p, b: cross_entropy_sums(p, b, local.config))(local.params, batch)
  # Training scores <s> doc </s>: the same tokens as an empty context and the continuation doc + "</s>".
  (lp, _), = backends.loglikelihood(local, [("", doc + "</s>")])
  assert int(count) == len(local.tokenizer.encode(doc)) + 1
  assert lp == pytest.approx(-float(loss_sum), rel=1e-5)
  # Perplexity scoring covers the document's tokens (everything but the final </s>).
  (total, n), = backends.rolling_loglikelihood(local, [doc])
  assert n == int(count) - 1 and total > lp


def test_rolling_windows_cover_every_token_once():
  ids = list(range(10, 47))
  for max_length, stride in [(8, None), (8, 3), (64, None), (2, 1)]:
    wins = backends.rolling_windows(ids, 1, max_length, stride)
    assert [t for _, cont in wins for t in cont] == ids
    assert all(len(ctx) + len(cont) <= max_length and ctx for ctx, cont in wins)


def test_long_documents_score_through_windows(tmp_path):
  short = tiny_backend(str(tmp_path), batch_size=4, max_length=32)
  text = CORPUS
  (total, n), = backends.rolling_loglikelihood(short, [text])
  assert n == len(short.tokenizer.encode(text)) and np.isfinite(total) and total < 0


def test_greedy_flag_matches_generation(local):
  prompt = [local.tokenizer.bos_id] + local.tokenizer.encode("ROMEO: But soft")
  new, = local.generate_tokens([prompt], 4)
  assert new, "the random model stopped at once; pick another prompt"
  # Greedy decoding produced these tokens, so scoring them says greedy; change the last one and it does not.
  (lp, greedy), = local.loglikelihood_tokens([(prompt, new)])
  assert greedy and lp < 0
  other = new[:-1] + [(new[-1] + 1) % local.tokenizer.vocab_size]
  (_, greedy), = local.loglikelihood_tokens([(prompt, other)])
  assert not greedy


def test_http_backend_gives_the_same_numbers(local, tmp_path):
  prompts = ["Question: What", "ROMEO:", "def add(a, b):"]
  chats = [[{"role": "user", "content": "What is 2 + 3?"}]]
  with fake_openai_server(local, model="tiny", fail_first=2) as url:  # two 503s first: retried
    remote = OpenAIBackend(url, "tiny", tokenizer=local.tokenizer, batch_size=2, max_retries=3)
    assert remote.max_length == local.max_length  # read from /v1/models
    assert backends.loglikelihood(remote, REQUESTS) == backends.loglikelihood(local, REQUESTS)
    assert remote.generate(prompts, max_tokens=6, stop=["\n"]) == local.generate(prompts, max_tokens=6, stop=["\n"])
    assert remote.chat(chats, max_tokens=5) == local.chat(chats, max_tokens=5)
    texts = [CORPUS, "A short one."]
    assert backends.rolling_loglikelihood(remote, texts) == backends.rolling_loglikelihood(local, texts)
    # Through the cached inferencer as well (the runner's path).
    a = inferencers.loglikelihood(remote, REQUESTS, cache=SampleCache(str(tmp_path / "a.jsonl")), progress=False)
    b = inferencers.loglikelihood(local, REQUESTS, cache=SampleCache(str(tmp_path / "b.jsonl")), progress=False)
    assert a == b


def test_http_errors_are_clear(local):
  with fake_openai_server(local, model="tiny") as url:
    wrong = OpenAIBackend(url, "other", tokenizer=local.tokenizer, max_length=512)
    with pytest.raises(backends.BackendError, match="HTTP 404 .* model 'other' not found"):
      wrong.generate(["hi"], max_tokens=2)
    no_tok = OpenAIBackend(url, "tiny")
    with pytest.raises(backends.BackendError, match="pass --tokenizer"):
      backends.loglikelihood(no_tok, REQUESTS[:1])
  dead = OpenAIBackend("http://127.0.0.1:9/v1", "tiny", max_retries=1, timeout_s=2, max_length=64)
  with pytest.raises(backends.BackendError, match="giving up after 2 attempts"):
    dead.generate(["hi"], max_tokens=2)
  with pytest.raises(backends.BackendError, match="must be an http"):
    OpenAIBackend("127.0.0.1:9", "tiny")


def test_a_server_that_is_not_an_openai_endpoint_is_a_backend_error():
  import http.server
  import threading

  class Handler(http.server.BaseHTTPRequestHandler):  # /html/...: a web page; else JSON without choices
    def log_message(self, *args):
      pass

    def do_POST(self):  # noqa: N802
      self.rfile.read(int(self.headers["Content-Length"]))
      body = b"<html>\n<body>Jupyter</body>\n</html>" if self.path.startswith("/html/") else b'{"data": []}'
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{server.server_address[1]}"
  try:
    page = OpenAIBackend(base + "/html/v1", "m", max_length=64, max_retries=0)
    with pytest.raises(backends.BackendError, match="not JSON .*'<html> <body>Jupyter"):
      page.generate(["hi"], max_tokens=2)
    other = OpenAIBackend(base + "/v1", "m", max_length=64, max_retries=0)
    with pytest.raises(backends.BackendError, match="has no 'choices'"):
      other.generate(["hi"], max_tokens=2)
    with pytest.raises(backends.BackendError, match="has no 'choices'"):
      other.chat([[{"role": "user", "content": "hi"}]], max_tokens=2)
  finally:
    server.shutdown()
    server.server_close()


def test_train_eval_hook_returns_loggable_metrics(local):
  from internlm_jax.eval import presets, runner
  cfg = presets.eval_config({"shakespeare": presets.shakespeare_ppl(limit=1, max_chars=300)})
  hook = runner.train_eval_hook(cfg, local.tokenizer, batch_size=2)
  out = hook(local.params, local.config, 10)
  assert set(out) == {"eval/shakespeare/perplexity", "eval/shakespeare/bits_per_byte"}
  assert all(np.isfinite(v) and v > 0 for v in out.values())


@pytest.mark.parametrize("timeout_s,retries", [(0.0, 4), (30.0, -1)])
def test_endpoint_timeout_and_retries_are_checked(timeout_s, retries):
  with pytest.raises(backends.BackendError, match="timeout must be > 0 s and retries >= 0"):
    OpenAIBackend("http://127.0.0.1:9/v1", "m", timeout_s=timeout_s, max_retries=retries, max_length=64)
