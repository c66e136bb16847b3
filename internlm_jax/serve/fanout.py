"""One API call, many scheduler requests: every prompt of a call times its `m` choices (m = n, or best_of).

Sub-request k answers prompt k // m as its choice k % m: prompt-major, the order in which OpenAI lists the choices
of a prompt list with n > 1. Each is a scheduler request of its own for the same prompt tokens, so the prefix
cache (where enabled) shares the prompt's pages between them.

Seeds: with a request seed s, choice j samples with seed (s + j * PHI) mod 2**63, PHI the odd 64-bit
golden-ratio constant. Choice 0 keeps s, so an n=1 answer is what it always was, and is choice 0 of the same
request with n > 1. The engine keys its sampler on the seed's low 32 bits, where multiplying by an odd number is a
bijection, so no two choices of one request share a key; and unlike s + j, the choices of seed 5 are not those
of seed 6 shifted by one, so a client sweeping small seeds does not get the same samples twice. Without a seed
every sub-request draws its own random one (Scheduler.submit), as for n=1.

Admission is all or none: the call is refused with a 400 when it holds more sub-requests than the queue can ever
take (retrying would not help), and when the queue fills part way the ones already queued are cancelled and the
call is a 429. Once running, an error in any sub-request, or the client going away, cancels all of them, which
frees their slots and pages.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Request

from internlm_jax.serve import protocol as P
from internlm_jax.serve.kv_cache import RequestTooLargeError
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.scheduler import Finished, Scheduler, ServerBusyError, TokenInfo

POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there
PHI = 0x9E3779B97F4A7C15


def choice_seed(seed: int, j: int) -> int:
  return (seed + j * PHI) % 2 ** 63


def check_fits(scheduler, num_prompts: int, m: int, choices_param: str = "n") -> None:
  """A 400 for a call of more sub-requests than `--max_queue`: a 429 would never clear on retry."""
  max_queue = getattr(scheduler, "max_queue", None)
  if max_queue is None or num_prompts * m <= max_queue:
    return
  if num_prompts > max_queue:
    raise P.APIError(400, f"prompt holds {num_prompts} prompts; this server queues at most {max_queue} "
                     "(--max_queue): send smaller batches", param="prompt")
  what = f"{num_prompts} prompts x {choices_param}={m}" if num_prompts > 1 else f"{choices_param}={m}"
  raise P.APIError(400, f"{what} asks for {num_prompts * m} generations; this server queues at most {max_queue} "
                   f"(--max_queue): ask for fewer", param=choices_param)


class Batch:
  """The sub-requests of one call; their events arrive tagged with the sub-request's index k."""

  def __init__(self, scheduler: Scheduler, tracker: Callable[[int, Any], None] | None = None):
    self.scheduler = scheduler
    self.tracker = tracker  # metrics: sees (k, event) on the scheduler's thread as each event is emitted
    self.queue: asyncio.Queue = asyncio.Queue()
    self.handles = []
    self.open = set()

  def submit(self, prompts: Sequence[list[int]], params: SamplingParams, m: int = 1, param: str = "messages") -> None:
    loop = asyncio.get_running_loop()
    put, track = self.queue.put_nowait, self.tracker

    def sink(event, k):
      if track is not None:  # before the hand-off: it sees events of sub-requests nobody reads any more too
        track(k, event)
      loop.call_soon_threadsafe(put, (k, event))

    try:
      for i, prompt in enumerate(prompts):
        for j in range(m):
          k = i * m + j
          seeded = params if params.seed is None or j == 0 else dataclasses.replace(
              params, seed=choice_seed(params.seed, j))
          self.handles.append(self.scheduler.submit(prompt, seeded, sink=functools.partial(sink, k=k)))
          self.open.add(k)
    except ServerBusyError as e:
      self.cancel()
      raise P.APIError(429, str(e), type="server_busy", code="server_busy") from None
    except RequestTooLargeError as e:
      self.cancel()
      code = "context_length_exceeded" if "context" in str(e) else None
      raise P.APIError(400, str(e), param=param if code else None, code=code) from None
    except ValueError as e:  # sampling parameters
      self.cancel()
      raise P.APIError(400, str(e), param=getattr(e, "param", None)) from None

  async def events(self, http: Request | None = None) -> AsyncIterator[tuple[int, Any]]:
    """Yields (k, event) until every sub-request has finished; cancels whatever is left if interrupted."""
    try:
      while self.open:
        try:
          k, event = await asyncio.wait_for(self.queue.get(), POLL_S)
        except asyncio.TimeoutError:
          if http is not None and await http.is_disconnected():
            return
          continue
        if isinstance(event, Finished):
          self.open.discard(k)
          if event.reason == "error" and (event.error or "").startswith("guided decoding:"):
            # The request's grammar failed mid-way (a parser limit): the client's input, not a server fault.
            raise P.APIError(400, f"response_format: {event.error}", param="response_format")
          if event.reason == "error":
            raise P.APIError(500, f"generation failed: {event.error}", type="internal_error")
        yield k, event
    finally:
      self.cancel()

  def cancel(self) -> None:
    """Cancels the sub-requests still open, once: both a stream's guard and Batch.events may call it."""
    for k, handle in enumerate(self.handles):
      if k in self.open:
        handle.cancel()
    self.open.clear()


def usage(prompt_lens: Sequence[int], done: dict[int, Finished], m: int) -> dict[str, Any]:
  """Each prompt counts once (as OpenAI bills n > 1) and every generated token counts, best_of candidates that
  were not returned included. Cached: per prompt, the fewest any of its choices found in the prefix cache (the
  copy that computed the most stands for the prompt, which then never exceeds its count)."""
  cached = sum(min((done[i * m + j].cached_tokens for j in range(m) if i * m + j in done), default=0)
               for i in range(len(prompt_lens)))
  return P.usage(sum(prompt_lens), sum(len(f.token_ids) for f in done.values()), cached)


def best(candidates: Sequence[int], tokens: Sequence[list[TokenInfo]], n: int) -> list[int]:
  """best_of: the n candidates of highest mean logprob per token (OpenAI's rule; a sum would favour short
  answers), best first. An empty output has no token to judge and ranks last."""
  def score(k):
    lps = [t.logprob for t in tokens[k]]
    return sum(lps) / len(lps) if lps else -math.inf
  return sorted(candidates, key=score, reverse=True)[:n]


def sse(payload: dict[str, Any]) -> str:
  return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def guard(chunks: AsyncIterator[str], batch: Batch | None = None) -> AsyncIterator[str]:
  """A failure after the stream started can no longer change the status: report it as a last SSE event.
  However the stream ends, `batch` is cancelled: a client gone while the first chunks (roles, echoed prompts) were
  sent never reached Batch.events, whose own cleanup would otherwise leave the choices running to max_tokens."""
  try:
    async for chunk in chunks:
      yield chunk
  except P.APIError as e:
    yield sse(e.body())
    yield "data: [DONE]\n\n"
  finally:
    if batch is not None:
      batch.cancel()
