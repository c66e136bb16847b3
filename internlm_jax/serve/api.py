"""OpenAI-compatible HTTP API over a running Scheduler (FastAPI; serve with uvicorn).

GET /health, GET /v1/models[/{id}], POST /v1/completions (echo + logprobs score prompt tokens the way lm-eval's
local-completions does), POST /v1/chat/completions (InternLM2 chat template; tools through the plugin protocol,
returned as tool_calls; stream as server-sent events).

Every error is OpenAI JSON. Bad input is a 4xx: malformed or non-UTF-8 JSON and out-of-range parameters 400,
unknown model 404, prompt + max_tokens past the context 400, a full queue 429. A client that disconnects (or a
stream that is closed) cancels its request, which frees its slot and pages.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from internlm_jax.serve import protocol as P
from internlm_jax.serve.kv_cache import RequestTooLargeError
from internlm_jax.serve.scheduler import Delta, Finished, Scheduler, ServerBusyError, TokenInfo
from internlm_jax.tokenizer import ACTION_END, ACTION_START, PLUGIN, TokenizerError, parse_assistant

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class _Batch:
  """Requests submitted together (one per prompt); their events arrive tagged with the prompt's index."""

  def __init__(self, scheduler: Scheduler):
    self.scheduler = scheduler
    self.queue: asyncio.Queue = asyncio.Queue()
    self.handles = []
    self.open = set()

  def submit(self, prompts: list[list[int]], params, param: str = "messages") -> None:
    loop = asyncio.get_running_loop()
    try:
      for i, prompt in enumerate(prompts):
        sink = lambda event, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
        self.handles.append(self.scheduler.submit(prompt, params, sink=sink))
        self.open.add(i)
    except ServerBusyError as e:
      self.cancel()
      raise P.APIError(429, str(e), type="server_busy", code="server_busy") from None
    except RequestTooLargeError as e:
      self.cancel()
      code = "context_length_exceeded" if "context" in str(e) else None
      raise P.APIError(400, str(e), param=param if code else None, code=code) from None
    except ValueError as e:  # sampling parameters
      self.cancel()
      raise P.APIError(400, str(e)) from None

  async def events(self, http: Request | None = None) -> AsyncIterator[tuple[int, Any]]:
    """Yields (index, event) until every request has finished; cancels whatever is left if interrupted."""
    try:
      while self.open:
        try:
          i, event = await asyncio.wait_for(self.queue.get(), POLL_S)
        except asyncio.TimeoutError:
          if http is not None and await http.is_disconnected():
            return
          continue
        if isinstance(event, Finished):
          self.open.discard(i)
          if event.reason == "error":
            raise P.APIError(500, f"generation failed: {event.error}", type="internal_error")
        yield i, event
    finally:
      self.cancel()

  def cancel(self) -> None:
    for i, handle in enumerate(self.handles):
      if i in self.open:
        handle.cancel()


def _sse(payload: dict[str, Any]) -> str:
  return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(scheduler: Scheduler, tokenizer, model_name: str) -> FastAPI:
  app = FastAPI(title="internlm_jax", description="OpenAI-compatible InternLM2 server")
  engine = scheduler.engine
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

  def check_model(name: str) -> None:
    if name != model_name:
      raise P.APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                       type="not_found_error", param="model", code="model_not_found")

  def max_tokens_for(req, prompt_len: int, default: int | None) -> int:
    value = req.max_tokens if req.max_tokens is not None else default
    if value is None:
      value = engine.max_request_tokens - prompt_len
      if value <= 0:
        raise P.APIError(400, f"the prompt ({prompt_len} tokens) fills the context length "
                         f"{engine.max_request_tokens}", param="messages", code="context_length_exceeded")
    return value

  # ---- routes -----------------------------------------------------------------------------------------------
  @app.get("/health")
  async def health():
    return {"status": "ok", **scheduler.stats()}

  def model_card():
    return {"id": model_name, "object": "model", "created": created, "owned_by": "internlm_jax",
            "max_model_len": engine.max_seq_len}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{name:path}")  # openai's client.models.retrieve(); :path, as model ids may hold "/"
  async def model(name: str):
    check_model(name)
    return model_card()

  @app.post("/v1/completions")
  async def completions(req: P.CompletionRequest, http: Request):
    check_model(req.model)
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
    max_queue = getattr(scheduler, "max_queue", None)
    if max_queue is not None and len(prompts) > max_queue:  # a 429 here would never clear on retry
      raise P.APIError(400, f"prompt holds {len(prompts)} prompts; this server queues at most {max_queue} "
                       "(--max_queue): send smaller batches", param="prompt")
    longest = max(len(p) for p in prompts)
    scoring = req.echo and req.logprobs is not None
    params = req.sampling(max_tokens_for(req, longest, 16), req.logprobs, req.logprobs if scoring else None)
    batch = _Batch(scheduler)
    batch.submit(prompts, params, param="prompt")
    rid = P.new_id("cmpl")
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}

    def prompt_text(i):
      return raw[i] if isinstance(raw[i], str) else tokenizer.decode([t for t in prompts[i] if
                                                                       t < tokenizer.vocab_size])

    def prompt_logprobs(i, finished: Finished):
      infos = [TokenInfo(prompts[i][0])] + (finished.prompt_logprobs or [])
      return P.completion_logprobs(infos, token_text, first_has_none=True)

    if req.stream:
      include_usage = bool(req.stream_options and req.stream_options.include_usage)

      async def stream():
        finished = []
        if req.echo:  # the prompt first; its logprobs (known once prefilled) come with the finishing chunk
          for i in range(len(prompts)):
            yield _sse({**head, "choices": [{"index": i, "text": prompt_text(i), "logprobs": None,
                                             "finish_reason": None}]})
        async for i, event in batch.events():
          choice = {"index": i, "text": "", "logprobs": None, "finish_reason": None}
          if isinstance(event, Delta):
            choice["text"] = event.text
            if req.logprobs is not None:
              choice["logprobs"] = P.completion_logprobs(event.tokens, token_text)
          else:
            if scoring:
              choice["logprobs"] = prompt_logprobs(i, event)
            choice["finish_reason"] = event.reason
            finished.append(event)
          yield _sse({**head, "choices": [choice]})
        if include_usage:  # OpenAI's last chunk: no choices, the whole request's usage
          use = P.usage(sum(map(len, prompts)), sum(len(f.token_ids) for f in finished),
                        sum(f.cached_tokens for f in finished))
          yield _sse({**head, "choices": [], "usage": use})
        yield "data: [DONE]\n\n"
      return StreamingResponse(_guard(stream()), media_type="text/event-stream")

    tokens = [[] for _ in prompts]
    done: dict[int, Finished] = {}
    async for i, event in batch.events(http):
      if isinstance(event, Delta):
        tokens[i].extend(event.tokens)
      else:
        done[i] = event
    if len(done) < len(prompts):
      return JSONResponse(P.error_body("client disconnected"), status_code=499)
    choices, total_out = [], 0
    for i in range(len(prompts)):
      fin = done[i]
      text, lp = fin.text, None
      if req.logprobs is not None:
        lp = P.completion_logprobs(tokens[i], token_text, offset=len(prompt_text(i)) if req.echo else 0)
      if req.echo:
        text = prompt_text(i) + text
        if scoring:
          first = prompt_logprobs(i, fin)
          lp = {k: first[k] + lp[k] for k in first}
      choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": fin.reason})
      total_out += len(fin.token_ids)
    cached = sum(d.cached_tokens for d in done.values())
    return {**head, "choices": choices, "usage": P.usage(sum(map(len, prompts)), total_out, cached)}

  @app.post("/v1/chat/completions")
  async def chat(req: P.ChatRequest, http: Request):
    check_model(req.model)
    req.check_supported()
    for name in ("messages", "tools", "stop"):
      _check_unicode(getattr(req, name), name)
    tools = req.tools if req.tool_choice != "none" else None
    forced = ""
    if isinstance(req.tool_choice, P.NamedToolChoice):
      name = req.tool_choice.function.name
      tools = [t for t in tools if (t.get("function") or t).get("name") == name]
      if not tools:
        raise P.APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
      forced = f"{ACTION_START}{PLUGIN}\n" + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "parameters": '
    elif req.tool_choice == "required":
      forced = f"{ACTION_START}{PLUGIN}\n"
    try:
      prompt = tokenizer.encode_chat(req.messages, tools=tools) + tokenizer.encode(forced)
    except (TokenizerError, ValueError, TypeError, AttributeError) as e:
      raise P.APIError(400, f"messages: {e}", param="messages") from None
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    req.max_tokens = limit
    n_top = (req.top_logprobs or 0) if req.logprobs else None
    extra_stop = (tokenizer.special_id(ACTION_END),) if tools else ()
    params = req.sampling(max_tokens_for(req, len(prompt), None), n_top, extra_stop_ids=extra_stop,
                          skip_special_tokens=False if tools else None)
    batch = _Batch(scheduler)
    batch.submit([prompt], params)
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
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield _sse({**chunk, "choices": [first]})
        shown, text = 0, ""
        async for _, event in batch.events():
          if isinstance(event, Delta):
            text += event.text
            # With tools, content stops at the first action: the call itself comes back as tool_calls.
            if not tools:
              visible = text
            elif forced:
              visible = ""
            else:
              visible = text.split(ACTION_START, 1)[0]
            delta = {"content": visible[shown:]} if len(visible) > shown else {}
            shown = max(shown, len(visible))
            lp = P.chat_logprobs(event.tokens, token_text) if n_top is not None else None
            if delta or lp:
              yield _sse({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}]})
            continue
          content, calls = parse(event.text)
          delta = {}
          if calls:
            delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(calls)]
          rest = (content or "")[shown:] if not forced else (content or "")
          if rest and tools:
            delta["content"] = rest
          reason = "tool_calls" if calls else event.reason
          yield _sse({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]})
          if include_usage:
            use = P.usage(event.prompt_tokens, len(event.token_ids), event.cached_tokens)
            yield _sse({**chunk, "choices": [], "usage": use})
        yield "data: [DONE]\n\n"
      return StreamingResponse(_guard(stream()), media_type="text/event-stream")

    tokens: list[TokenInfo] = []
    fin = None
    async for _, event in batch.events(http):
      if isinstance(event, Delta):
        tokens.extend(event.tokens)
      else:
        fin = event
    if fin is None:
      return JSONResponse(P.error_body("client disconnected"), status_code=499)
    content, calls = parse(fin.text)
    message = {"role": "assistant", "content": content}
    if calls:
      message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else fin.reason,
              "logprobs": P.chat_logprobs(tokens, token_text) if n_top is not None else None}
    return {**head, "object": "chat.completion", "choices": [choice],
            "usage": P.usage(fin.prompt_tokens, len(fin.token_ids), fin.cached_tokens)}

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


async def _guard(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
  """A failure after the stream started can no longer change the status: report it as a last SSE event."""
  try:
    async for chunk in chunks:
      yield chunk
  except P.APIError as e:
    yield _sse(e.body())
    yield "data: [DONE]\n\n"
