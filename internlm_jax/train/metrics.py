"""Training metrics: metrics.jsonl, TensorBoard events, a progress bar, MFU against a peak, the loss-curve PNG.

Only process 0 writes; every process may call these (they become no-ops elsewhere).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device for accelerators we know; CPUs are measured instead.
KNOWN_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12, "TPU v6": 918e12,
}


def median_seconds(fn, repeats: int, warmup: int = 0) -> float:
  """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones; fn must block on its result
  (jax.block_until_ready) so that the time covers the computation, not its dispatch. For benchmarks."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32, warmup_seconds: float = 0.0) -> float:
  """Best-of-`repeats` FLOP/s of a jitted n^3 matmul on the first device (the machine's practical peak).

  warmup_seconds of untimed matmuls first: an idle GPU runs at a fraction of its clock until load raises it."""
  key = (n, repeats, jnp.dtype(dtype).name)
  if key in _MEASURED:
    return _MEASURED[key]
  device = jax.local_devices()[0]
  # A one-device mesh of our own: callers may sit inside a training mesh, which would replicate the matmul.
  with jax.set_mesh(jax.make_mesh((1,), ("one",), devices=[device])):
    # Random operands: a GPU's matmul runs measurably faster on constant data (zeros or ones) than on real data.
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype), device)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    until = time.perf_counter() + warmup_seconds
    while time.perf_counter() < until:
      mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      mm(a, b).block_until_ready()
      best = min(best, time.perf_counter() - start)
  _MEASURED[key] = 2 * n ** 3 / best
  return _MEASURED[key]


_MEASURED: dict = {}  # one measurement per process is enough


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number came from)."""
  if override > 0:
    return override, "config"
  kind = jax.local_devices()[0].device_kind
  for name, flops in KNOWN_PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, f"datasheet ({kind})"
  return measure_matmul_peak(), f"measured float32 matmul ({kind})"


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, progress: bool = True):
    self.is_writer = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._bar = None
    if not self.is_writer:
      return
    os.makedirs(workdir, exist_ok=True)
    _drop_replayed_records(self.path, initial_step)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard is optional for library users; metrics.jsonl always exists
      self._tb = None
    if progress:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict) -> None:
    if not self.is_writer:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)

  def progress(self, step: int, loss: float | None = None, tokens_per_sec: float | None = None,
               mfu: float | None = None) -> None:
    if self._bar is None:
      return
    self._bar.n = step
    postfix = {}
    if loss is not None:
      postfix["loss"] = f"{loss:.3f}"
    if tokens_per_sec is not None:
      postfix["tok/s"] = f"{tokens_per_sec:,.0f}"
    if mfu is not None:
      postfix["mfu"] = f"{mfu:.2f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.refresh()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not np.isfinite(value):
    return str(value)  # JSON has no NaN; keep the record parseable
  return value


def _records(path: str) -> list[dict]:
  """The parseable records of a metrics file; a line torn by a kill mid-write is skipped."""
  out = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        out.append(record)
  return out


def _drop_replayed_records(path: str, initial_step: int) -> None:
  """On a resume from step N, the killed run's records past N describe steps that will run again (and a torn
  last line would glue itself to the next record): keep only the records up to N, rewritten atomically."""
  if not os.path.exists(path):
    return
  records = _records(path)
  kept = [r for r in records if r["step"] <= initial_step]
  with open(path, "rb") as f:
    intact = f.read().endswith(b"\n") or os.path.getsize(path) == 0
  if len(kept) == len(records) and intact:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return _records(path)


def plot_loss_curve(workdir: str, out_name: str = "loss_curve.png") -> str | None:
  """Train (and validation, where logged) loss against step, as a PNG in the workdir."""
  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
  val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
  if not train or jax.process_index() != 0:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(*zip(*train), label="train")
  if val:
    ax.plot(*zip(*val), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
