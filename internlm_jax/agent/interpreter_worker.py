"""The long-lived child of `interpreter.PythonSession`: runs cells in one namespace, like a Jupyter kernel.

Started as `python -I interpreter_worker.py IN_FD OUT_FD` inside the sandbox (interpreter.py applies
`sandbox.limit_child`). It imports only the standard library, because `-I` leaves this package off sys.path.
Messages both ways are a 4-byte big-endian length and a UTF-8 JSON object. The protocol pipes are private fds, so
a cell that writes to fd 1 or 2 (C code, os.write) cannot corrupt them; those writes land in a capture file the
parent reads.
"""
import ast
import builtins
import io
import json
import linecache
import os
import resource
import signal
import struct
import sys
import traceback


class CpuLimit(BaseException):
  """Raised by the SIGXCPU handler: the cell used its CPU seconds. A BaseException so `except Exception` in the
  cell does not swallow it."""


class CappedWriter(io.TextIOBase):
  """A text stream keeping the first `limit` characters and counting the rest, so a print loop cannot grow the
  worker's memory without bound."""

  def __init__(self, limit):
    self.limit, self.parts, self.size = limit, [], 0

  def writable(self):
    return True

  def write(self, text):
    if self.size < self.limit:
      self.parts.append(text[:self.limit - self.size])
    self.size += len(text)
    return len(text)

  def value(self):
    text = "".join(self.parts)
    return text + (f"\n[output truncated: {self.size} chars, kept {self.limit}]" if self.size > self.limit else "")


def _read(fd):
  def exact(n):
    buf = b""
    while len(buf) < n:
      chunk = os.read(fd, n - len(buf))
      if not chunk:
        return None
      buf += chunk
    return buf
  head = exact(4)
  if head is None:
    return None
  body = exact(struct.unpack(">I", head)[0])
  return None if body is None else json.loads(body.decode("utf-8"))


def _write(fd, message):
  data = json.dumps(message).encode("utf-8")
  data = struct.pack(">I", len(data)) + data
  while data:
    data = data[os.write(fd, data):]


def _no_input(*args, **kwargs):
  raise RuntimeError("input() is not available in the sandboxed interpreter")


def _on_xcpu(signum, frame):
  raise CpuLimit("CPU time limit of the cell exceeded")


def _save_figures(counter):
  """Saves and closes every open matplotlib figure; returns the PNG paths (only if the cell used pyplot)."""
  plt = sys.modules.get("matplotlib.pyplot")
  if plt is None:
    return [], counter
  paths = []
  for num in plt.get_fignums():
    counter += 1
    os.makedirs("images", exist_ok=True)
    path = os.path.abspath(os.path.join("images", f"figure_{counter}.png"))
    try:
      plt.figure(num).savefig(path, format="png")
      paths.append(path)
    except Exception:  # a broken figure should not hide the cell's own output
      pass
  plt.close("all")
  return paths, counter


def _run_cell(code, name, namespace, cpu_s, max_chars):
  hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
  usage = resource.getrusage(resource.RUSAGE_SELF)
  used = int(usage.ru_utime + usage.ru_stime) + 1
  soft = used + cpu_s if hard == resource.RLIM_INFINITY else min(used + cpu_s, hard)
  try:
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
  except (ValueError, OSError):
    pass
  out = CappedWriter(max_chars)
  status, result, error = "ok", None, None
  linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # tracebacks show the cell's lines
  old = sys.stdout, sys.stderr
  sys.stdout = sys.stderr = out
  try:
    tree = ast.parse(code, name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), namespace)
    if last is not None:  # the value of a trailing expression is the cell's result, as in Jupyter
      value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
      if value is not None:
        namespace["_"] = value
        result = repr(value)
        if len(result) > max_chars:
          result = result[:max_chars] + f"... [truncated {len(result) - max_chars} chars]"
  except SyntaxError as e:
    status, error = "error", "".join(traceback.format_exception_only(type(e), e)).strip()
  except MemoryError:
    status, error = "memory", "MemoryError: the cell ran out of memory"
  except CpuLimit as e:
    status, error = "timeout", f"TimeoutError: {e}"
  except KeyboardInterrupt:
    status, error = "timeout", "TimeoutError: the cell was interrupted at its time limit"
  except BaseException as e:  # SystemExit included: the session keeps running
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != name:  # drop this file's frames
      tb = tb.tb_next
    status = "error"
    error = "".join(traceback.format_exception(type(e), e, tb)).strip()
    if len(error) > max_chars:
      error = "... " + error[-max_chars:]
  finally:
    sys.stdout, sys.stderr = old
  return status, out.value(), result, error


def main(in_fd, out_fd):
  signal.signal(signal.SIGXCPU, _on_xcpu)
  builtins.input = _no_input
  sys.stdin = io.StringIO("")
  namespace = {"__name__": "__main__", "__builtins__": builtins}
  counter, cells = 0, 0
  _write(out_fd, {"ready": True, "pid": os.getpid()})
  while True:
    request = _read(in_fd)
    if request is None:  # the parent closed the pipe: the session is over
      return
    cells += 1
    try:
      status, stdout, result, error = _run_cell(request["code"], f"<cell {cells}>", namespace,
                                                int(request.get("cpu_s", 20)), int(request.get("max_chars", 20000)))
      images, counter = _save_figures(counter)
    except BaseException as e:  # an interrupt that arrived between cells: still answer
      status, stdout, result, error, images = "timeout", "", None, f"{type(e).__name__}", []
    _write(out_fd, {"status": status, "stdout": stdout, "result": result, "error": error, "images": images})


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
