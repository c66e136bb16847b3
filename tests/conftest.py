"""Test environment: 8 simulated CPU devices and offline HF libraries, fixed before JAX starts."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture
def native_ready(monkeypatch):
  """The native CPU kernels enabled (INTERNLM_JAX_NATIVE unset); skips where they cannot be built (no C++
  compiler, no AVX512-VNNI, not the CPU backend)."""
  from internlm_jax.native import build
  monkeypatch.delenv("INTERNLM_JAX_NATIVE", raising=False)
  monkeypatch.delenv("INTERNLM_JAX_NATIVE_VNNI_MIN_ROWS", raising=False)
  if not (build.can_build_here() and jax.default_backend() == "cpu"):
    pytest.skip("needs a C++ compiler and an AVX512-VNNI CPU")
