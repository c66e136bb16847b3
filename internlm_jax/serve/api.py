"""OpenAI-compatible HTTP API over a running Scheduler (FastAPI; serve with uvicorn).

GET /health, GET /v1/models[/{id}], POST /v1/completions (echo + logprobs score prompt tokens the way lm-eval's
local-completions does), POST /v1/chat/completions (InternLM2 chat template; tools through the plugin protocol,
returned as tool_calls; stream as server-sent events). n > 1 choices (and completions' best_of) are one
scheduler request each, submitted, seeded and cancelled together (fanout.py).

Every error is OpenAI JSON. Bad input is a 4xx: malformed or non-UTF-8 JSON and out-of-range parameters 400,
unknown model 404, prompt + max_tokens past the context 400, a full queue 429. A client that disconnects (or a
stream that is closed) cancels its request, which frees its slot and pages.

GET /metrics (unless create_app(metrics=False), serve.py's --nometrics: then a 404) is Prometheus's text format
(metrics.py): `internlm_jax_`-prefixed counters of HTTP requests by route and status, prompt, generated and
prefix-cache-hit tokens, finish reasons and preemptions; gauges of running/queued requests, free slots and KV
pages read from Scheduler.stats() at scrape time; histograms of time to first token (from the HTTP request's
arrival), end-to-end latency, time per output token and prompt/generation lengths, one observation per choice.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from internlm_jax.serve import guided
from internlm_jax.serve import protocol as P
from internlm_jax.serve.fanout import Batch, best, check_fits, guard, sse, usage
from internlm_jax.serve.metrics import ServerMetrics
from internlm_jax.serve.scheduler import Delta, Finished, Scheduler, TokenInfo
from internlm_jax.tokenizer import ACTION_END, ACTION_START, PLUGIN, TokenizerError, parse_assistant

log = logging.getLogger(__name__)


def create_app(scheduler: Scheduler, tokenizer, model_name: str, *, metrics: bool = True,
               adapter_names: tuple[str, ...] = ()) -> FastAPI:
  """`adapter_names`: the names of the LoRA adapters the engine serves beside the base (Engine(adapters=...), in
  that order); a request's `model` picks one of them or the base (`model_name`)."""
  app = FastAPI(title="internlm_jax", description="OpenAI-compatible InternLM2 server")
  engine = scheduler.engine
  server_metrics = ServerMetrics(scheduler) if metrics else None
  if server_metrics is not None:
    server_metrics.install(app)
  token_text = P.TokenText(tokenizer)
  created = int(time.time())

  # ---- errors -----------------------------------------------------------------------------------------------
  @app.exception_handler(P.APIError)
  async def _api_error(request, exc: P.APIError):
    return JSONResponse(exc.body(), status_code=exc.status)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request, exc: RequestValidationError):
    parts, param = [], None
    for err in exc.errors():
      loc = [str(x) for x in err.get("loc", ()) if x != "body"]
      if err.get("type") == "json_invalid":
        parts.append(f"the request body is not valid JSON: {err.get('msg')}")
        continue
      if not loc and err.get("type") == "model_attributes_type":  # FastAPI reads JSON only when the header says so
        kind = request.headers.get("content-type")
        came = f"this one came as {kind!r}" if kind else "this one had no Content-Type"
        sent = "" if kind and "json" in kind else f" sent with Content-Type: application/json ({came})"
        parts.append(f"the request body must be a JSON object{sent}")
        continue
      param = param or (".".join(loc) or None)
      parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return JSONResponse(P.error_body("; ".join(parts[:5]) or "invalid request", param=param), status_code=400)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(P.error_body(_body_error(exc), type=kind), status_code=exc.status_code)

  @app.exception_handler(Exception)
  async def _internal_error(request, exc: Exception):
    log.exception("unhandled error")
    return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}", type="internal_error"),
                        status_code=500)

  served = {model_name: 0, **{name: j + 1 for j, name in enumerate(adapter_names)}}

  def check_model(name: str) -> int:
    """The adapter a model name selects (0: the base); 404 for a name this server does not serve."""
    if name not in served:
      raise P.APIError(404, f"model {name!r} does not exist; this server serves "
                       f"{', '.join(repr(n) for n in served)}", type="not_found_error", param="model",
                       code="model_not_found")
    return served[name]

  def max_tokens_for(req, prompt_len: int, default: int | None) -> int:
    value = req.max_tokens if req.max_tokens is not None else default
    if value is None:
      value = engine.max_request_tokens - prompt_len
      if value <= 0:
        raise P.APIError(400, f"the prompt ({prompt_len} tokens) fills the context length "
                         f"{engine.max_request_tokens}", param="messages", code="context_length_exceeded")
    return value

  async def grammar_for(req, tools=None, tool_name=None):
    """The guided-decoding grammar of a request (guided.py): its response_format, or the forced tool call's;
    compiled off the event loop (a large schema takes milliseconds to compile)."""
    if tools is None and req.response_format is None:
      return None
    vocab = engine.config.vocab_size
    try:
      if tools is not None:
        return await asyncio.to_thread(guided.tool_call_grammar, tools, tool_name, tokenizer, vocab)
      return await asyncio.to_thread(guided.compile_response_format, req.response_format.as_dict(), tokenizer,
                                     vocab)
    except guided.GrammarError as e:
      raise P.APIError(400, str(e), param="tools" if tools is not None else "response_format") from None

  def new_batch(http: Request) -> Batch:
    return Batch(scheduler, server_metrics.tracker(http) if server_metrics is not None else None)

  # ---- routes -----------------------------------------------------------------------------------------------
  @app.get("/health")
  async def health():
    return {"status": "ok", **scheduler.stats()}

  def model_card(name: str = model_name):
    card = {"id": name, "object": "model", "created": created, "owned_by": "internlm_jax",
            "max_model_len": engine.max_seq_len}
    return card if name == model_name else {**card, "parent": model_name}  # a LoRA adapter, as vLLM lists them

  @app.post("/v1/encode")
  async def encode(req: P.EncodeRequest):
    """Token ids and counts of text, as LMDeploy's endpoint: clients size prompts against max_model_len."""
    _check_unicode(req.input, "input")
    texts = [req.input] if isinstance(req.input, str) else req.input
    try:
      if req.do_preprocess:
        ids = [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
      else:
        ids = [tokenizer.encode(t, add_bos=req.add_bos) for t in texts]
    except (TokenizerError, ValueError) as e:
      raise P.APIError(400, str(e), param="input") from None
    if isinstance(req.input, str):
      return {"input_ids": ids[0], "length": len(ids[0])}
    return {"input_ids": ids, "length": [len(x) for x in ids]}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card(name) for name in served]}

  @app.get("/v1/models/{name:path}")  # openai's client.models.retrieve(); :path, as model ids may hold "/"
  async def model(name: str):
    check_model(name)
    return model_card(name)

  @app.post("/v1/completions")
  async def completions(req: P.CompletionRequest, http: Request):
    adapter = check_model(req.model)
    req.check_supported()
    _check_unicode(req.prompt, "prompt")
    _check_unicode(req.stop, "stop")
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
      raw = [raw]
    if not raw:
      raise P.APIError(400, "prompt must not be empty", param="prompt")
    try:
      prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in raw]
    except TokenizerError as e:
      raise P.APIError(400, str(e), param="prompt") from None
    if any(not p for p in prompts):
      raise P.APIError(400, "prompt must not be empty", param="prompt")
    n = req.n
    m = req.best_of or n  # generated per prompt (check_supported: best_of >= n, and no stream when best_of > n)
    check_fits(scheduler, len(prompts), m, "best_of" if m > n else "n")
    longest = max(len(p) for p in prompts)
    scoring = req.echo and req.logprobs is not None
    # best_of ranks candidates by their tokens' logprobs, which the sampler reports only when asked for.
    logprobs = req.logprobs if req.logprobs is not None or m == n else 0
    params = req.sampling(max_tokens_for(req, longest, 16), logprobs, req.logprobs if scoring else None,
                          grammar=await grammar_for(req), adapter=adapter)
    batch = new_batch(http)
    batch.submit(prompts, params, m, param="prompt")
    rid = P.new_id("cmpl")
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
    lens = [len(p) for p in prompts]

    def prompt_text(i):
      return raw[i] if isinstance(raw[i], str) else tokenizer.decode([t for t in prompts[i] if
                                                                       t < tokenizer.vocab_size])

    def prompt_logprobs(i, finished: Finished):
      infos = [TokenInfo(prompts[i][0])] + (finished.prompt_logprobs or [])
      return P.completion_logprobs(infos, token_text, first_has_none=True)

    if req.stream:  # m == n: choice k is sub-request k
      include_usage = bool(req.stream_options and req.stream_options.include_usage)

      async def stream():
        done: dict[int, Finished] = {}
        if req.echo:  # the prompt first; its logprobs (known once prefilled) come with the finishing chunk
          for k in range(len(prompts) * n):
            yield sse({**head, "choices": [{"index": k, "text": prompt_text(k // n), "logprobs": None,
                                            "finish_reason": None}]})
        async for k, event in batch.events():
          choice = {"index": k, "text": "", "logprobs": None, "finish_reason": None}
          if isinstance(event, Delta):
            choice["text"] = event.text
            if req.logprobs is not None:
              choice["logprobs"] = P.completion_logprobs(event.tokens, token_text)
          else:
            if scoring:
              choice["logprobs"] = prompt_logprobs(k // n, event)
            choice["finish_reason"] = event.reason
            done[k] = event
          yield sse({**head, "choices": [choice]})
        if include_usage:  # OpenAI's last chunk: no choices, the whole request's usage
          yield sse({**head, "choices": [], "usage": usage(lens, done, n)})
        yield "data: [DONE]\n\n"
      return StreamingResponse(guard(stream(), batch), media_type="text/event-stream")

    tokens = [[] for _ in range(len(prompts) * m)]
    done: dict[int, Finished] = {}
    async for k, event in batch.events(http):
      if isinstance(event, Delta):
        tokens[k].extend(event.tokens)
      else:
        done[k] = event
    if len(done) < len(tokens):
      return JSONResponse(P.error_body("client disconnected"), status_code=499)
    choices = []
    for i in range(len(prompts)):
      candidates = range(i * m, (i + 1) * m)
      for j, k in enumerate(best(candidates, tokens, n) if m > n else candidates):
        fin = done[k]
        text, lp = fin.text, None
        if req.logprobs is not None:
          lp = P.completion_logprobs(tokens[k], token_text, offset=len(prompt_text(i)) if req.echo else 0)
        if req.echo:
          text = prompt_text(i) + text
          if scoring:
            first = prompt_logprobs(i, fin)
            lp = {key: first[key] + lp[key] for key in first}
        choices.append({"index": i * n + j, "text": text, "logprobs": lp, "finish_reason": fin.reason})
    return {**head, "choices": choices, "usage": usage(lens, done, m)}

  @app.post("/v1/chat/completions")
  async def chat(req: P.ChatRequest, http: Request):
    adapter = check_model(req.model)
    req.check_supported()
    for name in ("messages", "tools", "stop"):
      _check_unicode(getattr(req, name), name)
    n = req.n
    check_fits(scheduler, 1, n)
    tools = req.tools if req.tool_choice != "none" else None
    forced, forced_call = "", None  # a forced call is guided by its schema: (tools, function name or None)
    forced_segments = []
    if isinstance(req.tool_choice, P.NamedToolChoice):
      name = req.tool_choice.function.name
      tools = [t for t in tools if (t.get("function") or t).get("name") == name]
      if not tools:
        raise P.APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
      forced_segments = [(f"{ACTION_START}{PLUGIN}\n" + '{"name": ', False),  # the name is the client's text
                         (json.dumps(name, ensure_ascii=False), True), (', "parameters": ', False)]
      forced = "".join(text for text, _ in forced_segments)
      forced_call = (tools, name)
    elif req.tool_choice == "required":
      forced = f"{ACTION_START}{PLUGIN}\n"
      forced_segments = [(forced, False)]
      forced_call = (tools, None)
    try:
      prompt = tokenizer.encode_chat(req.messages, tools=tools) + tokenizer.encode_segments(forced_segments)
    except (TokenizerError, ValueError, TypeError, AttributeError) as e:
      raise P.APIError(400, f"messages: {e}", param="messages") from None
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    req.max_tokens = limit
    n_top = (req.top_logprobs or 0) if req.logprobs else None
    extra_stop = (tokenizer.special_id(ACTION_END),) if tools else ()
    grammar = await grammar_for(req, *forced_call) if forced_call else await grammar_for(req)
    params = req.sampling(max_tokens_for(req, len(prompt), None), n_top, extra_stop_ids=extra_stop,
                          skip_special_tokens=False if tools else None, grammar=grammar, adapter=adapter)
    batch = new_batch(http)
    batch.submit([prompt], params, n)
    rid = P.new_id("chatcmpl")
    head = {"id": rid, "created": int(time.time()), "model": model_name}

    def parse(text: str) -> tuple[str | None, list]:
      if not tools:
        return text, []
      content, calls = parse_assistant(forced + text)
      tool_calls, leftover = P.openai_tool_calls(calls)
      content = "\n".join(x for x in (content, leftover) if x)
      return (content or None), tool_calls

    if req.stream:
      include_usage = bool(req.stream_options and req.stream_options.include_usage)

      async def stream():
        chunk = {**head, "object": "chat.completion.chunk"}
        for k in range(n):  # every choice opens with the role, as OpenAI's streams do
          first = {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
          yield sse({**chunk, "choices": [first]})
        shown, text, done = [0] * n, [""] * n, {}
        async for k, event in batch.events():
          if isinstance(event, Delta):
            text[k] += event.text
            # With tools, content stops at the first action: the call itself comes back as tool_calls.
            if not tools:
              visible = text[k]
            elif forced:
              visible = ""
            else:
              visible = text[k].split(ACTION_START, 1)[0]
            delta = {"content": visible[shown[k]:]} if len(visible) > shown[k] else {}
            shown[k] = max(shown[k], len(visible))
            lp = P.chat_logprobs(event.tokens, token_text) if n_top is not None else None
            if delta or lp:
              yield sse({**chunk, "choices": [{"index": k, "delta": delta, "logprobs": lp, "finish_reason": None}]})
            continue
          done[k] = event
          content, calls = parse(event.text)
          delta = {}
          if calls:
            delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(calls)]
          rest = (content or "")[shown[k]:] if not forced else (content or "")
          if rest and tools:
            delta["content"] = rest
          reason = "tool_calls" if calls else event.reason
          yield sse({**chunk, "choices": [{"index": k, "delta": delta, "logprobs": None, "finish_reason": reason}]})
        if include_usage:
          yield sse({**chunk, "choices": [], "usage": usage([len(prompt)], done, n)})
        yield "data: [DONE]\n\n"
      return StreamingResponse(guard(stream(), batch), media_type="text/event-stream")

    tokens: list[list[TokenInfo]] = [[] for _ in range(n)]
    done: dict[int, Finished] = {}
    async for k, event in batch.events(http):
      if isinstance(event, Delta):
        tokens[k].extend(event.tokens)
      else:
        done[k] = event
    if len(done) < n:
      return JSONResponse(P.error_body("client disconnected"), status_code=499)
    choices = []
    for k in range(n):
      content, calls = parse(done[k].text)
      message = {"role": "assistant", "content": content}
      if calls:
        message["tool_calls"] = calls
      choices.append({"index": k, "message": message, "finish_reason": "tool_calls" if calls else done[k].reason,
                      "logprobs": P.chat_logprobs(tokens[k], token_text) if n_top is not None else None})
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage([len(prompt)], done, n)}

  return app


def _body_error(exc: StarletteHTTPException) -> str:
  """FastAPI answers any failure to read the body with one vague sentence; name the cause instead."""
  cause = exc.__cause__
  if isinstance(cause, UnicodeDecodeError):
    return (f"the request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset "
            f"{cause.start}); send JSON encoded as UTF-8")
  if isinstance(cause, RecursionError):
    return "the request body is not valid JSON: it is nested too deeply"
  return str(exc.detail)


def _check_unicode(value: Any, param: str) -> None:
  """json.loads accepts escaped lone surrogates ("\\ud800"), which are not text and which the tokenizer
  cannot encode (a RuntimeError inside sentencepiece): reject them as bad input."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      raise P.APIError(400, f"{param}: not valid Unicode (lone surrogate {value[e.start]!r} at character "
                       f"{e.start})", param=param) from None
  elif isinstance(value, dict):  # keys too: tool schemas are rendered into the prompt whole
    for k, v in value.items():
      _check_unicode(k, param)
      _check_unicode(v, param)
  elif isinstance(value, list):
    for v in value:
      _check_unicode(v, param)

