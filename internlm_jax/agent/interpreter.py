"""A stateful Python interpreter for agents: one sandboxed worker process keeps a namespace between cells.

The worker (interpreter_worker.py) runs under `sandbox.sandbox_argv`: a fresh launcher process applies the sandbox
layers (new session, rlimits, no network, writes only beneath its working directory, no new processes) and then
execs the worker, so nothing runs between fork and exec in this (often multithreaded, JAX) process, where a
`preexec_fn` could deadlock. The launcher execs in place, so the worker keeps the pid Popen returned (signals and
the process group reach it). On top of that, per cell:
  - CPU: the worker sets its soft RLIMIT_CPU to (used + cpu_s) and turns SIGXCPU into an exception, so a runaway
    pure-Python loop ends with the namespace intact; the hard limit caps the whole session.
  - wall clock: at `timeout_s` the parent sends SIGINT (KeyboardInterrupt, the namespace survives); if the worker
    has not answered `grace_s` later, its process group is killed and a fresh worker started (the variables are
    lost, and the result says so).
  - memory: RLIMIT_AS makes big allocations raise MemoryError inside the cell.
  - a crash (segfault through ctypes, os._exit) is reported and the next cell gets a fresh worker.
Output written at the file-descriptor level (C code, os.write) goes to a capture file and joins the cell's stdout.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

from internlm_jax.agent.actions import (SUCCESS, TOOL_ERROR, ActionResult, Toolkit, image_part, text_part,
                                        tool_api)
from internlm_jax.sandbox import SandboxLimits, sandbox_argv

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interpreter_worker.py")
DEFAULT_LIMITS = SandboxLimits(timeout_s=20.0, cpu_s=20, memory_mb=2048, max_output_bytes=20_000)


@dataclasses.dataclass
class CellResult:
  status: str  # "ok" | "error" | "timeout" | "memory" | "crashed"
  stdout: str = ""
  result: str | None = None  # repr of the cell's trailing expression
  error: str | None = None
  images: list[str] = dataclasses.field(default_factory=list)  # PNG paths inside the working directory
  restarted: bool = False  # the worker was replaced: variables from earlier cells are gone
  duration_s: float = 0.0

  def images_base64(self) -> list[str]:
    out = []
    for path in self.images:
      with open(path, "rb") as f:
        out.append(base64.b64encode(f.read()).decode("ascii"))
    return out

  def text(self) -> str:
    """What the model sees: output, result, error, and a note when the session was restarted (images are
    separate parts)."""
    parts = [p for p in (self.stdout.rstrip("\n"), self.result) if p]
    if self.error:
      parts.append(self.error)
    if self.restarted:
      parts.append("[the interpreter was restarted: variables from earlier cells are lost]")
    return "\n".join(parts) if parts else "(no output)"


class WorkerStartError(RuntimeError):
  """The sandboxed worker did not come up."""


class PythonSession:
  """A sandboxed, stateful Python session. `run(code)` never raises for anything the code does."""

  def __init__(self, workdir: str | os.PathLike | None = None, limits: SandboxLimits = DEFAULT_LIMITS, *,
               session_cpu_s: int = 3600, grace_s: float = 1.0, start_timeout_s: float = 30.0):
    self.limits, self.session_cpu_s, self.grace_s, self.start_timeout_s = limits, session_cpu_s, grace_s, \
        start_timeout_s
    self._own_workdir = workdir is None
    self.workdir = os.path.realpath(tempfile.mkdtemp(prefix="agent_py_") if workdir is None else os.fspath(workdir))
    os.makedirs(self.workdir, exist_ok=True)
    self._private = tempfile.mkdtemp(prefix="agent_py_io_")  # capture file: outside the cell's reach
    self._proc: subprocess.Popen | None = None
    self._to_worker = self._from_worker = None
    self._capture = None

  # ---- process lifecycle -------------------------------------------------------------------------------------
  def start(self) -> None:
    if self._proc is not None:
      return
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    self._capture = open(os.path.join(self._private, "fd_output"), "a+b")
    self._capture.truncate(0)
    env = {"PATH": "/usr/bin:/bin", "HOME": self.workdir, "TMPDIR": self.workdir, "LANG": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MPLCONFIGDIR": os.path.join(self.workdir, ".matplotlib")}
    # The worker's CPU hard limit is the session's; it lowers its own soft limit per cell.
    limits = dataclasses.replace(self.limits, cpu_s=self.session_cpu_s)
    # pass_fds leaves the protocol pipes inheritable in the launcher, so they survive its exec into the worker.
    argv = sandbox_argv([sys.executable, "-I", "-B", _WORKER, str(req_r), str(resp_w)], limits)
    try:
      self._proc = subprocess.Popen(
          argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=self._capture, stderr=self._capture,
          pass_fds=(req_r, resp_w), start_new_session=True)
    finally:
      os.close(req_r)
      os.close(resp_w)
    self._to_worker, self._from_worker = req_w, resp_r
    hello = self._receive(time.monotonic() + self.start_timeout_s)
    if not (isinstance(hello, dict) and hello.get("ready")):
      detail = self._read_capture().strip().splitlines()[-1:] or ["no output"]
      self._kill()
      raise WorkerStartError(f"the sandboxed Python worker did not start: {detail[0]}")

  def _kill(self) -> None:
    if self._proc is not None:
      try:
        os.killpg(self._proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
      self._proc.wait()
      self._proc = None
    for fd in (self._to_worker, self._from_worker):
      if fd is not None:
        try:
          os.close(fd)
        except OSError:
          pass
    self._to_worker = self._from_worker = None
    if self._capture is not None:
      self._capture.close()
      self._capture = None

  def restart(self) -> None:
    self._kill()
    self.start()

  def close(self) -> None:
    self._kill()
    shutil.rmtree(self._private, ignore_errors=True)
    if self._own_workdir:
      shutil.rmtree(self.workdir, ignore_errors=True)

  def __enter__(self) -> "PythonSession":
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self._kill()
    except Exception:
      pass

  # ---- messages ----------------------------------------------------------------------------------------------
  def _receive(self, deadline: float) -> Any:
    """One message from the worker, or None on timeout, EOF or a garbled frame."""
    buf = b""
    need = 4
    while len(buf) < need:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([self._from_worker], [], [], left)[0]:
        return None
      chunk = os.read(self._from_worker, need - len(buf))
      if not chunk:  # EOF: the worker is gone (or going); reap it so run() reports a crash, not a timeout
        try:
          self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
          pass
        return None
      buf += chunk
      if need == 4 and len(buf) == 4:
        need += struct.unpack(">I", buf)[0]
    try:
      return json.loads(buf[4:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
      return None

  def _read_capture(self) -> str:
    if self._capture is None:
      return ""
    self._capture.seek(0)
    data = self._capture.read(self.limits.max_output_bytes + 1)
    self._capture.truncate(0)  # the worker's fds are O_APPEND, so its next writes start again at 0
    text = data[:self.limits.max_output_bytes].decode("utf-8", "replace")
    return text + ("\n[output truncated]" if len(data) > self.limits.max_output_bytes else "")

  def put_file(self, name: str, data: str | bytes) -> str:
    """Writes a file into the working directory (the parent is not sandboxed) and returns its path."""
    path = os.path.realpath(os.path.join(self.workdir, name))
    if os.path.commonpath([path, self.workdir]) != self.workdir:
      raise ValueError(f"{name!r} is outside the interpreter's working directory")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
    return path

  # ---- running cells -----------------------------------------------------------------------------------------
  def run(self, code: str, timeout_s: float | None = None) -> CellResult:
    start = time.monotonic()
    restarted = False
    if self._proc is None or self._proc.poll() is not None:
      restarted = self._proc is not None  # the previous worker died: its state went with it
      self._kill()
      try:
        self.start()
      except WorkerStartError as e:
        return CellResult("crashed", error=str(e), duration_s=time.monotonic() - start)
    timeout = self.limits.timeout_s if timeout_s is None else min(timeout_s, self.limits.timeout_s)
    request = json.dumps({"code": code, "cpu_s": max(1, int(self.limits.cpu_s)),
                          "max_chars": self.limits.max_output_bytes}).encode()
    try:
      os.write(self._to_worker, struct.pack(">I", len(request)) + request)
    except OSError:
      reply = None
    else:
      reply = self._receive(start + timeout)
      if reply is None and self._proc.poll() is None:  # over time: interrupt first, as Jupyter does
        try:
          os.kill(self._proc.pid, signal.SIGINT)
        except ProcessLookupError:
          pass
        reply = self._receive(time.monotonic() + self.grace_s)
        if reply is not None:
          reply["status"] = "timeout"
          reply["error"] = f"TimeoutError: the cell ran past its {timeout:g}s limit and was interrupted"
    fd_output = self._read_capture()
    if reply is None:  # no answer: the worker crashed or hangs; replace it
      code_ = self._proc.poll() if self._proc else None
      status = "timeout" if code_ is None else "crashed"
      error = (f"TimeoutError: the cell ran past its {timeout:g}s limit and was killed" if status == "timeout"
               else f"the interpreter process died ({_describe_exit(code_)})")
      self._kill()
      try:
        self.start()
      except WorkerStartError:
        pass  # the next run() tries again and reports it
      return CellResult(status, stdout=fd_output, error=error, restarted=True,
                        duration_s=time.monotonic() - start)
    stdout = reply.get("stdout", "") + fd_output
    return CellResult(reply["status"], stdout, reply.get("result"), reply.get("error"), reply.get("images", []),
                      restarted, time.monotonic() - start)


def _describe_exit(code: int | None) -> str:
  if code is None:
    return "unknown"
  if code < 0:
    try:
      return f"signal {signal.Signals(-code).name}"
    except ValueError:
      return f"signal {-code}"
  return f"exit code {code}"


class InterpreterTool(Toolkit):
  """A stateful Python interpreter (like a Jupyter notebook) in a sandbox: variables persist between calls,
  the value of the last expression is returned, matplotlib figures are saved as PNG files."""

  name = "python"

  def __init__(self, workdir: str | os.PathLike | None = None, limits: SandboxLimits = DEFAULT_LIMITS, **kwargs):
    super().__init__()
    self.session = PythonSession(workdir, limits, **kwargs)

  def setup(self) -> None:
    self.session.start()

  @tool_api
  def run(self, code: str) -> ActionResult:
    """Runs Python code in a persistent session and returns printed output, the value of the last expression,
    errors and saved plots. No network access; files can be written only in the working directory.

    Args:
      code: Python source to run.
    """
    cell = self.session.run(code)
    status = SUCCESS if cell.status == "ok" else TOOL_ERROR
    parts = [text_part(cell.text())] + [image_part(p) for p in cell.images]
    error = None if status == SUCCESS else f"the code failed ({cell.status})"
    return ActionResult("python", {"code": code}, status, parts, error, cell.duration_s)

  def close(self) -> None:
    self.session.close()
