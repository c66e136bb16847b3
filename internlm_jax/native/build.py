"""Builds the package's C++ XLA FFI kernels on first use and loads them (there is no separate build step: an
install is the source tree, and the library is compiled for the machine that runs it).

The shared library is cached under $INTERNLM_JAX_NATIVE_CACHE (default ~/.cache/internlm_jax/native), keyed by
the source, the jaxlib version (the FFI headers) and the CPU's feature flags (-march=native). Concurrent builders
(pytest-xdist workers) each compile to a temporary file and rename it into place, which is atomic.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

_HERE = pathlib.Path(__file__).parent


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "internlm_jax" / "native"
  return pathlib.Path(os.environ.get("INTERNLM_JAX_NATIVE_CACHE", default))


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  import platform
  return platform.processor()


def compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def can_build_here() -> bool:
  """A C++ compiler and a CPU with the kernels' instructions (AVX-512 F/BW/VL and VNNI): where the native path
  is expected to be active (the tests fail rather than skip there if it is not)."""
  flags = _cpu_flags().split()
  return compiler() is not None and all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))


@functools.cache
def load(name: str) -> ctypes.CDLL:
  """Compiles (if not cached) and loads `name`.cc from this directory; raises RuntimeError on failure."""
  import jax
  import jaxlib
  cxx = compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler (g++ or $CXX) found")
  source = _HERE / f"{name}.cc"
  headers = b"".join(h.read_bytes() for h in sorted(_HERE.glob("*.h")))
  key = hashlib.sha256(source.read_bytes() + headers + jaxlib.__version__.encode() + _cpu_flags().encode()
                       + cxx.encode()).hexdigest()[:16]
  target = cache_dir() / f"{name}-{key}.so"
  if not target.exists():
    import logging
    logging.info("compiling the native kernel %s (first use, a few seconds; cached as %s)", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".so")
    os.close(fd)
    cmd = [cxx, "-O3", "-march=native", "-shared", "-fPIC", "-std=c++17",
           f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
      if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
      os.replace(tmp, target)  # atomic: a concurrent builder's identical file may win, which is fine
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return ctypes.CDLL(str(target))


def register(name: str, targets: dict[str, str], state: dict) -> bool:
  """Builds and loads `name`.cc once and registers its FFI handlers (target name -> exported symbol) on the CPU
  platform. `state` (the caller's module dict) remembers the outcome; a failure (no compiler, a failed build, a
  CPU without the instructions) warns once, and the caller keeps its pure-JAX path."""
  if "ok" not in state:
    import logging
    import warnings

    import jax
    try:
      lib = load(name)
      if not lib.internlm_native_supported():
        raise RuntimeError("this CPU lacks AVX-512 (F, BW, VL) or AVX512-VNNI")
      for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
      state["ok"] = True
    except Exception as e:
      state["ok"] = False
      state["error"] = str(e)
      warnings.warn(f"internlm_jax native {name} unavailable, using the pure-JAX path: {e}", stacklevel=3)
    else:
      logging.info("internlm_jax native %s loaded", name)
  return bool(state["ok"])
