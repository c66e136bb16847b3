"""host_memory.reuse_freed_memory: a jitted step's scratch buffer stops faulting in anew on every run (glibc
keeps freed blocks mapped), and INTERNLM_JAX_REUSE_MEMORY=0 leaves malloc alone. Each case runs in a fresh
process: glibc's arena setting must precede XLA's threads."""
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import resource
from internlm_jax import host_memory
applied = host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x, w: (x * 2.0) @ w)  # x * 2: a 64 MB scratch buffer (16384 pages) feeding the dot
x, w = jnp.ones((4096, 4096)), jnp.ones((4096, 8))
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The fewest of the later runs: a run's scratch is released a moment after its result is ready, so on a busy
# machine the next run may still find it taken and grow the heap once more before the reuse settles.
print(applied, min(faults[2:]))
"""


def _probe(reuse: str) -> tuple[bool, int]:
  env = dict(os.environ, INTERNLM_JAX_REUSE_MEMORY=reuse, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  applied, faults = out.stdout.split()[-2:]
  return applied == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_scratch_memory_is_reused_across_runs_and_the_opt_out_works():
  applied, faults = _probe("1")
  assert applied and faults < 1000, faults  # a run that did not fault its 16384 scratch pages in again
  applied, faults = _probe("0")
  assert not applied and faults > 16384 * 0.9, faults  # without: every run maps its scratch afresh


def test_left_alone_where_jax_will_run_on_an_accelerator(monkeypatch):
  from internlm_jax import host_memory
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert host_memory.accelerator_expected()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not host_memory.accelerator_expected()
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(host_memory, "_accelerator_plugin_installed", lambda: False)
  assert not host_memory.accelerator_expected()
  monkeypatch.setattr(host_memory, "_accelerator_plugin_installed", lambda: True)
  assert host_memory.accelerator_expected()
