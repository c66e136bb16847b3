"""What launch scripts do before JAX starts (kept free of JAX imports on purpose)."""
import os


def simulate_cpu_devices(argv, default: int = 8) -> None:
  """Sets XLA's simulated CPU device count from --cpu_devices=N (default 8; 0 leaves XLA_FLAGS alone).

  XLA reads it once, when the backend starts, so it must be set before JAX is first used. It only affects the
  CPU platform, so it is harmless on GPU and TPU hosts.
  """
  count = default
  for arg in argv:
    if arg.startswith("--cpu_devices="):
      count = int(arg.split("=", 1)[1])
  if count > 0 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
