"""Prometheus metrics for the HTTP server: GET /metrics in the text exposition format (OpenMetrics when the
scraper asks for it), what LMDeploy's `--enable-metrics` and vLLM expose to their operators.

Each app owns a CollectorRegistry, so several servers in one process (tests build many) keep separate counts.
Three sources feed it:
  * an ASGI middleware stamps every HTTP request's arrival time and counts it by route and status once the
    response starts (4xx/429 rejections included; an exception that escapes before a response counts as 500);
  * a RequestTracker per API call sees every scheduler event of its sub-requests (each choice of n > 1 is one)
    on the scheduler's thread, as the event is emitted: token counters, finish reasons and the per-sub-request
    histograms (TTFT measured from the HTTP arrival to the first Delta carrying a token);
  * a collector reads `scheduler.stats()` at scrape time for the gauges and the preemption count, so what is
    scraped is the scheduler's state now, not a sample from a timer.
Metric code swallows its own failures: a metrics bug must never fail or stall a request.
"""
from __future__ import annotations

import logging
import time
from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder
from starlette.routing import Match

from internlm_jax.serve.scheduler import Delta, Finished

log = logging.getLogger(__name__)

PREFIX = "internlm_jax_"
ARRIVAL = "internlm_jax.arrival"  # ASGI scope key: perf_counter() when the request reached the app

# Buckets span a GPU's milliseconds and a CPU's tens of seconds (a tiny model on 2 cores, or a long queue).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                         0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
LENGTH_BUCKETS = tuple(float(2 ** i) for i in range(19))  # 1 .. 262144 tokens

# stats() key -> (gauge name, help)
_GAUGES = {
    "running": ("requests_running", "Requests decoding in a slot now."),
    "queued": ("requests_queued", "Requests waiting for a slot (preempted ones included)."),
    "free_slots": ("free_slots", "Decode slots free now."),
    "pages_total": ("kv_pages_total", "KV cache pages in the pool (scratch page excluded)."),
    "pages_cached": ("kv_pages_cached", "KV pages holding a prompt prefix the prefix cache can share."),
}


class ServerMetrics:
  """The registry of one app and the objects that feed it."""

  def __init__(self, scheduler):
    self.scheduler = scheduler
    self.routes = None
    self.registry = CollectorRegistry()
    r = self.registry
    self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests by route and response status.",
                                 ["endpoint", "status"], registry=r)
    self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished scheduler requests (each "
                                 "choice of n > 1 counts its prompt).", registry=r)
    self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated, counted as they stream.",
                                     registry=r)
    self.cache_hit_tokens = Counter(PREFIX + "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache "
                                    "(not recomputed).", registry=r)
    self.finished = Counter(PREFIX + "finished_requests", "Scheduler requests (one per choice) by finish reason.",
                            ["reason"], registry=r)
    self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "HTTP arrival to the first generated token, "
                          "per choice.", buckets=LATENCY_BUCKETS, registry=r)
    self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "HTTP arrival to the choice's finish.",
                         buckets=LATENCY_BUCKETS, registry=r)
    self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time per generated token after the "
                          "first delivery of a choice (choices with later deliveries).", buckets=TOKEN_LATENCY_BUCKETS,
                          registry=r)
    self.prompt_len = Histogram(PREFIX + "request_prompt_tokens", "Prompt length per choice.",
                                buckets=LENGTH_BUCKETS, registry=r)
    self.generation_len = Histogram(PREFIX + "request_generation_tokens", "Generated tokens per choice.",
                                    buckets=LENGTH_BUCKETS, registry=r)
    r.register(_SchedulerCollector(scheduler))

  def install(self, app) -> None:
    """Adds the counting middleware and the GET /metrics route to a FastAPI app."""
    self.routes = app.router.routes  # the live list: routes added after install count too
    app.state.metrics = self  # for code embedding the app (and tests) to reach the registry
    app.add_middleware(_HTTPMiddleware, metrics=self)

    async def metrics(request: Request) -> Response:
      body, content_type = self.render(request.headers.get("accept"))
      return Response(body, media_type=content_type)

    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response,
                      summary="Prometheus metrics", description="The server's metrics in the Prometheus text "
                      "format (OpenMetrics when the Accept header asks for it).",
                      responses={200: {"content": {"text/plain": {}}}})

  def render(self, accept: str | None = None) -> tuple[bytes, str]:
    if accept:
      try:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
      except Exception:  # a malformed Accept header still gets the plain format
        log.debug("metrics: falling back to the text format for Accept %r", accept, exc_info=True)
    return generate_latest(self.registry), CONTENT_TYPE_LATEST

  def tracker(self, http) -> "RequestTracker":
    arrival = http.scope.get(ARRIVAL) if http is not None else None
    return RequestTracker(self, arrival if arrival is not None else time.perf_counter())

  def count_http(self, scope, status: int) -> None:
    try:
      route = scope.get("route")
      if route is None and self.routes is not None:
        # FastAPI records the route it picked only for its API routes (not /openapi.json, /docs), or for none
        # when nothing matched (a 404); a partial match is a 405 of that route.
        route = next((r for r in self.routes if r.matches(scope)[0] is not Match.NONE), None)
      endpoint = getattr(route, "path", None) or "unmatched"  # the template: unknown paths do not grow labels
      self.http_requests.labels(endpoint, str(status)).inc()
    except Exception:
      log.debug("metrics: counting an HTTP request failed", exc_info=True)


class RequestTracker:
  """Observes the events of one API call's sub-requests. Called on the scheduler thread (or, for a request
  cancelled while queued, the cancelling thread), and never for one sub-request from two threads at once."""

  def __init__(self, metrics: ServerMetrics, arrival: float):
    self.metrics, self.arrival = metrics, arrival
    # sub-request -> (perf_counter() of its first tokens, how many came with them): a Delta carries a whole
    # device call's tokens (steps_per_call), so the per-token time is measured over the tokens that came after.
    self.first: dict[int, tuple[float, int]] = {}

  def __call__(self, k: int, event) -> None:
    try:
      now = time.perf_counter()
      m = self.metrics
      if isinstance(event, Delta):
        if event.tokens:
          m.generation_tokens.inc(len(event.tokens))
          if k not in self.first:
            self.first[k] = (now, len(event.tokens))
            m.ttft.observe(now - self.arrival)
      elif isinstance(event, Finished):
        generated = len(event.token_ids)
        m.prompt_tokens.inc(event.prompt_tokens)
        m.cache_hit_tokens.inc(event.cached_tokens)
        m.finished.labels(event.reason).inc()
        m.e2e.observe(now - self.arrival)
        m.prompt_len.observe(event.prompt_tokens)
        m.generation_len.observe(generated)
        first = self.first.pop(k, None)
        if first is not None and generated > first[1]:
          m.tpot.observe((now - first[0]) / (generated - first[1]))
    except Exception:
      log.debug("metrics: observing an event failed", exc_info=True)


class _SchedulerCollector:
  """Gauges (and the preemption counter) read from scheduler.stats() when scraped."""

  def __init__(self, scheduler):
    self.scheduler = scheduler

  def collect(self):
    try:
      stats = self.scheduler.stats()
    except Exception:  # a scrape still answers, with the other metrics
      log.debug("metrics: scheduler.stats() failed", exc_info=True)
      return
    for key, (name, doc) in _GAUGES.items():
      if key in stats:
        yield GaugeMetricFamily(PREFIX + name, doc, value=stats[key])
    total, available = stats.get("pages_total"), stats.get("pages_available")
    if total is not None and available is not None:
      used = total - available
      yield GaugeMetricFamily(PREFIX + "kv_pages_used", "KV pages held by requests (not free, not evictable).",
                              value=used)
      yield GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio", "Share of KV pages held by requests, 0 to 1.",
                              value=used / total if total else 0.0)
    if "preemptions" in stats:
      yield CounterMetricFamily(PREFIX + "preemptions", "Requests preempted (pages reclaimed, recomputed later).",
                                value=stats["preemptions"])


class _HTTPMiddleware:
  """Pure ASGI rather than BaseHTTPMiddleware, which relays every body chunk (each SSE event) through a stream of
  its own and has interfered with request.is_disconnected(), which non-streaming handlers poll."""

  def __init__(self, app, metrics: ServerMetrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    scope[ARRIVAL] = time.perf_counter()
    started = False

    async def counting_send(message):
      nonlocal started
      if not started and message["type"] == "http.response.start":
        started = True
        self.metrics.count_http(scope, message["status"])  # before the client can see the status
      await send(message)

    try:
      await self.app(scope, receive, counting_send)
    except Exception:
      if not started:  # the server's last-resort handler answers it with a 500
        self.metrics.count_http(scope, 500)
      raise
