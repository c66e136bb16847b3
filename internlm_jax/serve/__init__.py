"""Serving: paged KV cache + allocator, engine (prefill / insert / generate / free), sampling, continuous-batching
scheduler. The HTTP API (FastAPI) is `internlm_jax.serve.api.create_app`, imported on its own so the engine does
not need the web stack."""
from internlm_jax.serve.engine import DecodeState, Engine, EngineConfig, Prefix, StepResult
from internlm_jax.serve.kv_cache import CacheFullError, PageAllocator, PagedKVCache, RequestTooLargeError
from internlm_jax.serve.sampling import SamplingError, SamplingParams
from internlm_jax.serve.scheduler import Delta, Finished, RequestHandle, Scheduler, ServerBusyError, TokenInfo

__all__ = [
    "DecodeState", "Engine", "EngineConfig", "Prefix", "StepResult",
    "CacheFullError", "PageAllocator", "PagedKVCache", "RequestTooLargeError",
    "SamplingError", "SamplingParams",
    "Delta", "Finished", "RequestHandle", "Scheduler", "ServerBusyError", "TokenInfo",
]
