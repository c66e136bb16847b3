"""Keep freed host memory in the process, so that a jitted step's scratch memory does not fault in anew each step.

XLA:CPU allocates an executable's temporary buffers once per run: for the 50M training step a single ~2 GB block
(logits, their gradient, activations). glibc serves a block that large with a fresh mmap and returns it with
munmap when the run ends, so every step touches ~500,000 new pages; the kernel zeroes each one on its first
write. Measured on 2 cores: ~0.7 s of CPU time per 2.9 s step (`experiments/bench_train.py`).
`reuse_freed_memory()` makes glibc take every block from the main heap (no mmap, one arena) and never give
the heap back, so the next step reuses the same, already mapped pages: no page faults once the heap has settled. The price:
the process keeps its peak heap until it exits, and that peak can hold two or three copies of the scratch
(a run's scratch is released a moment after its results are ready, so the next run may grow the heap once or
twice before reuse settles: measured RSS 5.3 or 7.3 GB for the 50M step, against 3.3 GB at the peak without).

Call it before the first JAX computation (it must precede XLA's worker threads, to put them on the main heap).
The training launch scripts do (experiments/train.py, finetune.py, sweep.py, bench_train.py,
bench_finetune.py): one shared heap slows XLA's multi-threaded compiles (~5 -> 7 s for that step), which long
runs repay within a few steps. Serving scripts do not: a decode step's scratch is a few MB, so they would only
pay the slower compiles of their many shapes. Linux with glibc only, and only where JAX will run on the CPU: on a GPU or TPU host (an accelerator plugin
installed, or JAX_PLATFORMS naming another platform first) the scratch lives on the device and only the
slower compiles would remain, so it does nothing there. Set INTERNLM_JAX_REUSE_MEMORY=0 to opt out.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied: list[bool] = []


def _accelerator_plugin_installed() -> bool:
  """A JAX GPU or TPU plugin on the path: jax_cuda*/jax_rocm* modules, libtpu, or one under jax_plugins."""
  names = {m.name for m in pkgutil.iter_modules()}
  if "libtpu" in names or any(n.startswith(("jax_cuda", "jax_rocm")) for n in names):
    return True
  spec = importlib.util.find_spec("jax_plugins")
  locations = spec.submodule_search_locations if spec is not None else None
  return bool(locations) and any(any(k in m.name for k in ("cuda", "rocm", "tpu"))
                                 for m in pkgutil.iter_modules(list(locations)))


def accelerator_expected() -> bool:
  """Whether JAX will likely run on a GPU or TPU here, judged without starting JAX: JAX_PLATFORMS' first entry
  when set, else whether an accelerator plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  return _accelerator_plugin_installed()


def reuse_freed_memory() -> bool:
  """Configures glibc malloc as described above; True when it took effect (idempotent)."""
  if _applied:
    return _applied[0]
  ok = False
  wanted = os.environ.get("INTERNLM_JAX_REUSE_MEMORY", "1").lower() not in ("0", "false", "no", "off")
  if wanted and not accelerator_expected():
    try:
      libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
      mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
      mallopt = None
    if mallopt is not None:
      mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
      # One arena: large blocks of other threads' arenas would be mmapped (thread heaps are capped at 64 MB).
      # No mmap: every block from the heap. Trim threshold -1: never shrink the heap (malloc(3)).
      ok = all(mallopt(param, value) == 1
               for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  _applied.append(ok)
  return ok
