"""What launch scripts do before JAX starts (kept free of JAX imports on purpose)."""
import os
import sys


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


def _unknown_key(e: Exception):
  """Exits with one line for ml_collections' bare AttributeError(KeyError('key\\nDid you mean ...')) ."""
  reason = e.args[0] if e.args else e
  reason = reason.args[0] if isinstance(reason, KeyError) and reason.args else reason
  sys.exit(f"error: a --config.* override names a key the config does not have: {' '.join(str(reason).split())} "
           "(the command line can only set keys the config file defines)")


def define_config(default: str, help_string: str):
  """`config_flags.DEFINE_config_file("config", ...)`; without --config the default file is loaded and the
  overrides applied right here, at import, so a wrong key must be caught here too."""
  from ml_collections import config_flags  # noqa: PLC0415
  try:
    return config_flags.DEFINE_config_file("config", default, help_string)
  except (AttributeError, KeyError) as e:
    _unknown_key(e)


def parse_flags(argv):
  """absl's flag parsing, for `app.run(main, flags_parser=parse_flags)`, with config mistakes as one line.

  ml_collections raises a bare AttributeError (a traceback) for an override of a key the config does not have,
  and defers a missing or broken --config file to the first use of the value, deep inside main.
  """
  from absl import app, flags  # noqa: PLC0415
  try:
    args = app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    _unknown_key(e)
  if "config" in flags.FLAGS:
    try:
      flags.FLAGS.config.keys()  # a failed load hands back a stand-in that raises on first use: use it now
    except Exception as e:  # noqa: BLE001  (OSError for a missing file, anything the file itself raises)
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      sys.exit(f"error: cannot load --config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: "
               f"{lines[-1] if lines else type(e).__name__}")
  return args
