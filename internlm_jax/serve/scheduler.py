"""Continuous batching: one host thread that admits queued requests into free slots, runs the engine and streams
tokens back, with admission control and cancellation.

Per loop turn: apply cancellations (slot and pages freed at once), admit queued requests while slots, pages and a
prefill token budget allow, reserve pages for the next `steps_per_call` tokens of every running request
(preempting the newest request, to be recomputed later, when the pool is short), run one generate call and hand
each request its tokens. Requests never wait on each other's whole generation: a finished slot is refilled on
the next turn. A preempted request resumes by prefilling prompt + output so far with its sampling key sequence
unchanged, so its output does not depend on having been preempted (up to float rounding of prefill vs decode).
While a guided request (response_format, guided.py) runs, each call decodes one step: its next token mask is
computed on the host from the token just sampled.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import random
import threading
import time
from typing import Any, Callable, Sequence

from internlm_jax.serve.engine import CacheFullError, Engine
from internlm_jax.serve.sampling import SamplingParams, TextStream

log = logging.getLogger(__name__)


class ServerBusyError(RuntimeError):
  """The waiting queue is full (HTTP 429)."""


@dataclasses.dataclass
class TokenInfo:
  token_id: int
  logprob: float | None = None
  top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclasses.dataclass
class Delta:
  """New output of a request: its tokens (with logprobs when asked) and the text they release."""
  text: str
  tokens: list[TokenInfo]


@dataclasses.dataclass
class Finished:
  reason: str  # "stop", "length", "cancelled" or "error"
  text: str  # the whole output text
  token_ids: list[int]
  prompt_tokens: int
  cached_tokens: int
  prompt_logprobs: list[TokenInfo] | None = None  # one per prompt token after the first
  error: str | None = None


class Request:
  """One generation. Events (Delta..., then one Finished) go to `sink`, called from the scheduler thread."""
  _ids = itertools.count()

  def __init__(self, prompt: Sequence[int], params: SamplingParams, stop_ids: Sequence[int],
               sink: Callable[[Any], None], stream: TextStream):
    self.id = f"req-{next(Request._ids)}"
    self.prompt = [int(t) for t in prompt]
    self.params = params
    self.stop_ids = tuple(stop_ids)
    self.seed = params.seed if params.seed is not None else random.getrandbits(63)
    self.sink = sink
    self.stream = stream
    self.output: list[int] = []
    self.slot: int | None = None
    self.cached_tokens = 0
    self.prompt_logprobs: list[TokenInfo] | None = None
    self.done = False
    self.admitted_at: float | None = None
    # Guided decoding (response_format): this sequence's grammar state, kept across preemption.
    self.guide = params.grammar.guide() if params.grammar is not None else None

  def emit(self, event) -> None:
    try:
      self.sink(event)
    except Exception:  # a consumer that went away (closed event loop) must not stop the scheduler
      log.debug("dropping an event for %s", self.id, exc_info=True)


class RequestHandle:
  """Synchronous view of a request: iterate its events, or wait for the Finished one."""

  def __init__(self, scheduler: "Scheduler", request: Request, events: "queue.Queue"):
    self.scheduler, self.request, self._events = scheduler, request, events
    self.id = request.id

  def events(self, timeout: float | None = None):
    while True:
      event = self._events.get(timeout=timeout)
      yield event
      if isinstance(event, Finished):
        return

  def result(self, timeout: float | None = None) -> Finished:
    for event in self.events(timeout):
      if isinstance(event, Finished):
        return event

  def cancel(self) -> None:
    self.scheduler.cancel(self.id)


class Scheduler:
  """Runs `engine` on a background thread. `max_running` caps concurrent sequences (at most the engine's slots);
  `max_queue` bounds the requests waiting for a slot; past it `submit` raises ServerBusyError."""

  def __init__(self, engine: Engine, tokenizer, *, max_running: int | None = None, max_queue: int = 64,
               prefill_budget: int = 2048, default_stop_ids: Sequence[int] | None = None,
               handoff_on_finish: bool = True):
    self.engine, self.tokenizer = engine, tokenizer
    self.handoff_on_finish = handoff_on_finish  # end a generate call when a slot frees while requests wait
    self.max_running = min(max_running or engine.ec.max_slots, engine.ec.max_slots)
    self.max_queue = max_queue
    self.prefill_budget = prefill_budget
    self.default_stop_ids = tuple(tokenizer.stop_token_ids if default_stop_ids is None else default_stop_ids)
    self._lock = threading.Condition()
    self._queue: collections.deque[Request] = collections.deque()
    self._running: dict[int, Request] = {}
    self._by_id: dict[str, Request] = {}
    self._cancelled: set[str] = set()
    self._free_slots = list(range(self.max_running))
    self._state = engine.init_state()
    self._stop = False
    self._idle = False  # the loop is waiting for work (set under the lock)
    self._thread: threading.Thread | None = None
    self.preemptions = 0
    self.finished = collections.Counter()  # finish reasons so far (for /health and tests)
    # Where the loop's time goes (seconds, and counts): admit (prefill + insert), generate (device call and copy
    # back), dispatch (tokens to requests), the rest of the turn (cancels, page reservations, locking).
    self.timings: collections.Counter = collections.Counter()

  # ---- public -----------------------------------------------------------------------------------------------
  def start(self) -> "Scheduler":
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="internlm-serve", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    with self._lock:
      self._stop = True
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Any], None] | None = None
             ) -> RequestHandle:
    """Queues a request; raises SamplingError / RequestTooLargeError for bad input, ServerBusyError when full."""
    # Ids past sample_vocab (a padded model vocabulary) are never sampled: a bias or stop id there would be inert.
    params = params.validate(getattr(self.engine.ec, "sample_vocab", None) or self.engine.config.vocab_size)
    stop_ids = params.stop_ids(self.default_stop_ids)
    self.engine.check_request(prompt, params.max_tokens, params.adapter)
    events: queue.Queue = queue.Queue()
    request = Request(prompt, params, stop_ids, sink or events.put,
                      TextStream(self.tokenizer, params.stop, params.skip_special_tokens))
    with self._lock:
      if self._stop:
        raise ServerBusyError("the server is shutting down")
      if len(self._queue) >= self.max_queue:
        raise ServerBusyError(f"the server is busy: {len(self._running)} requests running and "
                              f"{len(self._queue)} waiting (max_queue={self.max_queue}); retry later")
      self._queue.append(request)
      self._by_id[request.id] = request
      self._lock.notify_all()
    return RequestHandle(self, request, events)

  def generate(self, prompt: Sequence[int], params: SamplingParams, timeout: float | None = None) -> Finished:
    return self.submit(prompt, params).result(timeout)

  def cancel(self, request_id: str) -> None:
    """Ends a request: a queued one leaves the queue now, a running one frees its slot before the next step."""
    with self._lock:
      request = self._by_id.get(request_id)
      if request is None or request.done:
        return
      if request in self._queue:
        self._queue.remove(request)
        self._finish(request, "cancelled")
        return
      self._cancelled.add(request_id)
      self._lock.notify_all()

  def stats(self) -> dict[str, int]:
    alloc = self.engine.allocator
    with self._lock:
      return {"running": len(self._running), "queued": len(self._queue), "free_slots": len(self._free_slots),
              "pages_available": alloc.num_available, "pages_total": alloc.usable_pages,
              "pages_cached": alloc.num_cached, "preemptions": self.preemptions,
              **{f"finished_{k}": v for k, v in self.finished.items()}}

  def wait_idle(self, timeout: float = 60.0) -> None:
    """Blocks until nothing is queued or running (tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      with self._lock:  # idle: also not in a turn (a request being admitted is neither queued nor running)
        if not self._queue and not self._running and self._idle:
          return
      time.sleep(0.01)
    raise TimeoutError("the scheduler did not become idle")

  # ---- loop -------------------------------------------------------------------------------------------------
  def _loop(self) -> None:
    while True:
      with self._lock:
        while not self._stop and not self._queue and not self._running and not self._cancelled:
          self._idle = True
          self._lock.wait()
        self._idle = False
        if self._stop:
          break
        cancelled, self._cancelled = self._cancelled, set()
      try:
        t0 = time.perf_counter()
        for request_id in cancelled:
          self._cancel_now(request_id)
        t1 = time.perf_counter()
        self._admit()
        t2 = time.perf_counter()
        timings = self.timings
        timings["admit_s"] += t2 - t1
        timings["turns"] += 1
        if self._running:
          self._reserve_pages()
          t3 = time.perf_counter()
          # While requests wait, end the call when a slot frees up, so one of them can take it next turn.
          guided = any(r.guide is not None for r in self._running.values())
          self._state, result = self.engine.generate(
              self._state, halt_on_finish=self.handoff_on_finish and bool(self._queue), max_steps=1 if guided else None)
          t4 = time.perf_counter()
          self._dispatch(result)
          t5 = time.perf_counter()
          timings["generate_s"] += t4 - t3
          timings["dispatch_s"] += t5 - t4
          timings["other_s"] += t3 - t2
          timings["generate_calls"] += 1
          timings["slot_steps_used"] += int(result.valid.sum())
          timings["slot_steps"] += result.valid.size
          # Row-steps the device computed (the decode bucket): slot_steps_used / row_steps is its utilisation.
          timings["row_steps"] += result.valid.shape[0] * (len(result.rows) if result.rows is not None else
                                                           result.valid.shape[1])
        timings["other_s"] += t1 - t0
      except Exception as e:  # a bug must not leave clients hanging: fail what is in flight, keep serving
        log.exception("serving loop error")
        self._fail_all(f"{type(e).__name__}: {e}")
    self._fail_all("the server stopped")

  def _admit(self) -> None:
    budget = self.prefill_budget
    while budget > 0:
      with self._lock:  # taken off the queue first, so a concurrent cancel() cannot pop the wrong request
        if not self._queue or not self._free_slots:
          return
        request = self._queue.popleft()
      resume = request.prompt + request.output
      want_lp = request.params.prompt_logprobs if not request.output else None
      alloc = self.engine.allocator
      try:
        # Headroom of a page per running sequence, so admitting does not just preempt someone next step.
        if self._running and alloc.num_available < alloc.pages_for(len(resume)) + len(self._running):
          raise CacheFullError("keeping headroom for running requests")
        self._state, prefix = self.engine.prefill(self._state, resume, prompt_logprobs=want_lp,
                                                  adapter=request.params.adapter)
        self.timings["prefills"] += 1
        self.timings["prefill_tokens"] += len(resume)
      except CacheFullError:
        if not self._running:  # nothing will free pages: the request can never run
          self._finish(request, "error", error="not enough KV cache pages for this prompt")
          continue
        with self._lock:
          self._queue.appendleft(request)
        return  # wait for running requests to free pages
      except ValueError as e:
        self._finish(request, "error", error=str(e))
        continue
      with self._lock:
        slot = self._free_slots.pop(0)
        self._running[slot] = request
      request.slot = slot
      if request.admitted_at is None:
        request.admitted_at = time.monotonic()
        request.cached_tokens = prefix.cached_tokens
        if prefix.prompt_logprobs is not None:
          request.prompt_logprobs = [TokenInfo(request.prompt[i + 1], lp, list(zip(ids, lps)))
                                     for i, (lp, ids, lps) in enumerate(prefix.prompt_logprobs)]
      self._state = self.engine.insert(prefix, self._state, slot, request.params, request.stop_ids,
                                       seed=request.seed, generated=request.output,
                                       allowed=request.guide.mask(self.engine.mask_words) if request.guide else None)
      budget -= len(resume) - prefix.cached_tokens
      if request.params.max_tokens <= len(request.output):  # e.g. max_tokens=0: scoring the prompt only
        self._release_slot(request)
        self._finish(request, "length")

  def _reserve_pages(self) -> None:
    steps = self.engine.ec.steps_per_call
    for slot in sorted(self._running, key=lambda s: self._running[s].admitted_at or 0):
      request = self._running.get(slot)
      if request is None:
        continue
      need = min(steps, request.params.max_tokens - len(request.output))
      while True:
        try:
          self.engine.reserve(slot, need)
          break
        except CacheFullError:
          victim = max(self._running.values(), key=lambda r: r.admitted_at or 0)
          self._preempt(victim)
          if victim is request:
            break

  def _cancel_now(self, request_id: str) -> None:
    request = self._by_id.get(request_id)
    if request is None or request.done:
      return
    with self._lock:
      if request in self._queue:
        self._queue.remove(request)
    self._release_slot(request)
    self._finish(request, "cancelled")

  def _preempt(self, request: Request) -> None:
    self.preemptions += 1
    self._release_slot(request)
    with self._lock:
      self._queue.appendleft(request)

  def _release_slot(self, request: Request) -> None:
    slot = request.slot
    if slot is None:
      return
    self._state = self.engine.free(self._state, slot)
    with self._lock:
      self._running.pop(slot, None)
      self._free_slots.append(slot)
    request.slot = None

  def _dispatch(self, result) -> None:
    want = {slot: r.params.logprobs for slot, r in self._running.items()}
    masks = {}
    for slot, request in list(self._running.items()):
      infos: list[TokenInfo] = []
      reason = error = None
      for j in range(result.tokens.shape[0]):
        if not result.valid[j, slot]:
          continue
        token = int(result.tokens[j, slot])
        if token in request.stop_ids or (request.guide is not None and request.guide.ends(token)):
          reason = "stop"  # a grammar's end token ends it even under ignore_eos: nothing may follow it
          break
        n = want[slot]
        top = None if not n else list(zip(result.top_ids[j, slot, :n].tolist(),
                                          result.top_logprobs[j, slot, :n].tolist()))
        infos.append(TokenInfo(token, float(result.logprob[j, slot]) if n is not None else None, top))
        request.output.append(token)
        if request.guide is not None and (end := request.guide.advance(token)):
          reason, error = end  # complete (only stop tokens could follow), or failed
          break
        if len(request.output) >= request.params.max_tokens:
          reason = "length"
          break
      text = request.stream.append([t.token_id for t in infos]) if infos else ""
      if request.stream.stopped:
        reason = "stop"
      if text or infos:
        request.emit(Delta(text, infos))
      if reason is not None:
        self._release_slot(request)
        self._finish(request, reason, error=error)
      elif request.guide is not None:
        masks[slot] = request.guide.mask(self.engine.mask_words)
    self._state = self.engine.set_allowed(self._state, masks)

  def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
    with self._lock:  # cancel() may finish a queued request from another thread
      if request.done:
        return
      request.done = True
      self.finished[reason] += 1
      self._by_id.pop(request.id, None)
    tail = request.stream.finish() if reason != "error" else ""
    if tail:
      request.emit(Delta(tail, []))
    request.emit(Finished(reason, request.stream.text, list(request.output), len(request.prompt),
                          request.cached_tokens, request.prompt_logprobs, error))

  def _fail_all(self, message: str) -> None:
    with self._lock:
      pending = list(self._queue) + list(self._running.values())
      self._queue.clear()
    for request in pending:
      try:
        self._release_slot(request)
      except Exception:
        log.exception("freeing a slot after an error")
      self._finish(request, "error", error=message)
