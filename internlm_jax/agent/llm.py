"""The small LLM interface agents talk to, and its backends: an OpenAI-compatible HTTP client, our model in-process
(through the serving engine, or on the dense path), and a scripted fake for deterministic tests.

    llm.chat(messages, tools=None, stop=None, max_tokens=512, temperature=0.0) -> Reply

`messages` are OpenAI-style dicts (roles system/user/assistant/tool, plus InternLM2's environment). A text backend
returns the raw assistant text (special tokens kept, so the native protocol can parse `<|action_start|>` spans);
the OpenAI backend also returns the endpoint's parsed `tool_calls`. Stop strings are cut from the end of `text`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Protocol, Sequence

Messages = Sequence[Mapping[str, Any]]


class LLMError(RuntimeError):
  """The model could not answer (endpoint down, bad response, script exhausted); agents end the run cleanly."""


@dataclasses.dataclass
class Reply:
  text: str
  tool_calls: list[dict[str, Any]] | None = None  # OpenAI backend: [{"id", "name", "arguments": str}]
  finish_reason: str | None = None


class LLM(Protocol):
  def chat(self, messages: Messages, *, tools: Sequence[Mapping] | None = None, stop: Sequence[str] | None = None,
           max_tokens: int = 512, temperature: float = 0.0) -> Reply:
    ...


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
  """`text` up to the earliest stop string (excluded), and whether one was found."""
  cut = min((i for i in (text.find(s) for s in stop or () if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


# ---- scripted ---------------------------------------------------------------------------------------------------
class ScriptedLLM:
  """Replays fixed replies in order, or asks `script(messages, tools)` for each one. Records every request in
  `calls` so tests can check prompts, tools and stop words. Stop strings are applied as a real server would."""

  def __init__(self, script: Sequence[str | Reply] | Callable[..., str | Reply]):
    self.script = script if callable(script) else list(script)
    self.calls: list[dict[str, Any]] = []

  def chat(self, messages, *, tools=None, stop=None, max_tokens=512, temperature=0.0) -> Reply:
    self.calls.append({"messages": [dict(m) for m in messages], "tools": tools, "stop": list(stop or [])})
    if callable(self.script):
      reply = self.script(messages, tools)
    elif len(self.calls) <= len(self.script):
      reply = self.script[len(self.calls) - 1]
    else:
      raise LLMError(f"scripted LLM has only {len(self.script)} replies; request {len(self.calls)} asked for more")
    reply = reply if isinstance(reply, Reply) else Reply(str(reply))
    text, stopped = cut_at_stop(reply.text, stop)
    return Reply(text, reply.tool_calls, "stop" if stopped else (reply.finish_reason or "stop"))


# ---- OpenAI-compatible HTTP -------------------------------------------------------------------------------------
class OpenAIClient:
  """POSTs `{api_base}/chat/completions` (api_base like "http://127.0.0.1:23333/v1"); retries connection errors,
  429 and 5xx with exponential backoff; other HTTP errors fail at once with the server's message."""

  def __init__(self, api_base: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
               retries: int = 2, backoff_s: float = 0.5, extra_body: Mapping[str, Any] | None = None):
    if not api_base.startswith(("http://", "https://")):
      raise ValueError(f"api_base must be an http(s) URL such as http://127.0.0.1:23333/v1, got {api_base!r}")
    self.url = api_base.rstrip("/") + "/chat/completions"
    self.model = model
    self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
    self.extra_body = dict(extra_body or {})

  def _post(self, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    data = json.dumps(body).encode()
    last = None
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          return json.loads(response.read().decode("utf-8"))
      except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:300]
        last = f"HTTP {e.code} from {self.url}: {detail}"
        if e.code != 429 and e.code < 500:
          break
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        last = f"cannot reach {self.url}: {getattr(e, 'reason', e)}"
      except json.JSONDecodeError:
        last = f"{self.url} returned a response that is not JSON"
        break
    raise LLMError(last)

  def chat(self, messages, *, tools=None, stop=None, max_tokens=512, temperature=0.0) -> Reply:
    body: dict[str, Any] = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens,
                            "temperature": temperature, **self.extra_body}
    if tools:
      body["tools"] = list(tools)
    if stop:
      body["stop"] = list(stop)
    out = self._post(body)
    try:
      choice = out["choices"][0]
      message = choice["message"]
    except (KeyError, IndexError, TypeError):
      raise LLMError(f"{self.url} returned no choices: {json.dumps(out)[:200]}") from None
    calls = []
    for call in message.get("tool_calls") or []:
      function = call.get("function", {})
      args = function.get("arguments", "{}")
      calls.append({"id": call.get("id"), "name": function.get("name"),
                    "arguments": args if isinstance(args, str) else json.dumps(args)})
    text, _ = cut_at_stop(message.get("content") or "", stop)  # some servers ignore `stop`
    return Reply(text, calls or None, choice.get("finish_reason"))


# ---- in-process over our params ---------------------------------------------------------------------------------
def load_checkpoint(directory: str):
  """(params, config, tokenizer) of an HF InternLM2 folder or a params checkpoint folder with `tokenizer.model`."""
  from internlm_jax.tokenizer import Tokenizer
  tok_path = os.path.join(directory, "tokenizer.model")
  if not os.path.isfile(tok_path):
    raise FileNotFoundError(f"{tok_path} is missing; the agent needs the checkpoint's tokenizer")
  if os.path.isfile(os.path.join(directory, "config.json")):
    from internlm_jax.hf_io import load_hf_checkpoint
    config, params = load_hf_checkpoint(directory)
  else:
    from internlm_jax.params_io import load_params_checkpoint
    config, params = load_params_checkpoint(directory)
  return params, config, Tokenizer(tok_path)


def _encode_chat(tokenizer, messages, tools) -> list[int]:
  from internlm_jax.tokenizer import TokenizerError
  try:
    return tokenizer.encode_chat(messages, tools=tools)
  except TokenizerError as e:
    raise LLMError(f"cannot build the prompt: {e}") from None


class InProcessLLM:
  """Our model in this process on the dense path (`EngineLLM` is the engine-backed one, and the default): renders
  the InternLM2 chat template with the Tokenizer and runs `internlm_jax.generate.generate`, which compiles anew
  for every prompt length. Returns text with special tokens kept. Stop strings that are single special pieces
  (e.g. `<|action_end|>`) stop generation on device; others are cut from the text afterwards."""

  def __init__(self, params, config, tokenizer, *, seed: int = 0):
    self.params, self.config, self.tokenizer, self.seed = params, config, tokenizer, seed

  @classmethod
  def from_checkpoint(cls, directory: str, **kwargs) -> "InProcessLLM":
    """An HF InternLM2 folder or a params checkpoint folder (params_io), with `tokenizer.model` inside."""
    return cls(*load_checkpoint(directory), **kwargs)

  def chat(self, messages, *, tools=None, stop=None, max_tokens=512, temperature=0.0) -> Reply:
    from internlm_jax.generate import generate
    tok = self.tokenizer
    prompt = _encode_chat(tok, messages, tools)
    stop_ids = list(tok.stop_token_ids)
    for s in stop or ():
      if s in tok.special_ids:
        stop_ids.append(tok.special_ids[s])
    room = self.config.max_position_embeddings - len(prompt)
    if room < 1:
      raise LLMError(f"the prompt ({len(prompt)} tokens) fills the context of {self.config.max_position_embeddings}")
    ids = generate(self.params, self.config, [prompt], min(max_tokens, room), temperature=temperature,
                   seed=self.seed, stop_ids=tuple(stop_ids))[0]
    # A model vocabulary padded past the tokenizer's (random tiny models) can emit ids with no piece.
    text = tok.decode([i for i in ids if i < tok.vocab_size])
    finished = len(ids) < min(max_tokens, room)
    text, stopped = cut_at_stop(text, stop)
    return Reply(text, None, "stop" if finished or stopped else "length")


class EngineLLM:
  """Our model in this process through the serving engine (`serve.local.EngineSession`): the paged cache compiles
  a handful of programs however long the conversation grows, earlier turns' pages are reused (prefix caching),
  and stop strings end decoding as soon as they appear. Text keeps its special tokens, like `InProcessLLM`'s;
  a stop string that is one special piece (`<|action_end|>`) stops on device and is not part of the text.
  `close()` stops the engine's thread."""

  def __init__(self, params, config, tokenizer, *, seed: int = 0, max_slots: int = 1, max_seq_len: int | None = None,
               engine_config=None, mesh=None, kv_fraction: float = 0.8):
    from internlm_jax.serve.local import EngineSession
    self.tokenizer, self.config, self.seed = tokenizer, config, seed
    self.session = EngineSession(params, config, tokenizer, max_slots=max_slots, max_seq_len=max_seq_len,
                                 engine_config=engine_config, mesh=mesh, kv_fraction=kv_fraction)

  @classmethod
  def from_checkpoint(cls, directory: str, **kwargs) -> "EngineLLM":
    return cls(*load_checkpoint(directory), **kwargs)

  def chat(self, messages, *, tools=None, stop=None, max_tokens=512, temperature=0.0) -> Reply:
    from internlm_jax.serve.local import GenerationError
    prompt = _encode_chat(self.tokenizer, messages, tools)
    context = self.session.max_request_tokens
    room = context - len(prompt)
    if room < 1:
      raise LLMError(f"the prompt ({len(prompt)} tokens) fills the context of {context}")
    params = self.session.sampling_params(min(max_tokens, room), stop or (), temperature, self.seed,
                                          skip_special_tokens=False)
    try:
      done, = self.session.run([prompt], params)
    except GenerationError as e:
      raise LLMError(str(e)) from None
    return Reply(done.text, None, done.reason)

  def close(self) -> None:
    self.session.close()
