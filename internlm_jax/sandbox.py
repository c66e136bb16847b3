"""Run untrusted Python (model-written code) in a separate, limited process.

Layers, each applied in the child between fork and exec (see `limit_child`), each best effort so the sandbox
still runs where the kernel or the user lacks a feature (`features()` says which ones are active):
  - a new session (process group), so a timeout kills the program and anything it started;
  - rlimits: CPU seconds, address space, file size, no core dumps, open files;
  - no network: a fresh network namespace (only a down loopback inside) when permitted (root, or unprivileged user
    namespaces); also Landlock's TCP rules (kernel >= 6.7); where neither applies, `run_python` disables the
    socket module in the interpreter before the program starts;
  - a new user namespace, so even a root child holds no capability outside it: it cannot raise its rlimits back;
  - Landlock (kernel >= 5.13): writes allowed only beneath the working directory (and to /dev/null); signals
    only to its own processes (kernel >= 6.12);
  - seccomp: no new processes (fork, vfork, clone without CLONE_THREAD), threads still allowed. RLIMIT_NPROC
    cannot do this job for root, whom the kernel exempts from it.

From a multithreaded parent (any JAX process) use `sandbox_argv`, which applies the same layers in a fresh launcher
process instead of between fork and exec. `run_python` adds the rest: `python -I` in a fresh temporary directory deleted afterwards, a minimal environment
(nothing of the parent's leaks in), wall-clock timeout, and output truncated to `max_output_bytes`.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

__all__ = ["SandboxLimits", "SandboxResult", "features", "limit_child", "run_python", "sandbox_argv"]

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# Syscall numbers and seccomp audit arch per machine; other machines run without the seccomp layer.
_ARCH = {
    "x86_64": dict(audit=0xC000003E, fork=(57, 58), clone=56, clone3=435, landlock=(444, 445, 446)),
    "aarch64": dict(audit=0xC00000B7, fork=(), clone=220, clone3=435, landlock=(444, 445, 446)),
}.get(platform.machine())

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  timeout_s: float = 10.0  # wall clock
  cpu_s: int = 10  # RLIMIT_CPU
  memory_mb: int = 1024  # RLIMIT_AS
  max_output_bytes: int = 65536  # per stream; the rest is read and dropped so the child never blocks
  network: bool = False
  subprocesses: bool = False  # False: seccomp refuses fork/clone of new processes
  max_file_mb: int = 64  # RLIMIT_FSIZE: a program cannot fill the disk
  max_open_files: int = 256


@dataclasses.dataclass
class SandboxResult:
  status: str  # "ok" | "error" | "timeout" | "memory" | "killed"
  stdout: str
  stderr: str
  returncode: int
  duration_s: float

  @property
  def reason(self) -> str:
    """One line saying why a run failed ("" when it passed): the status plus the exception's last line."""
    if self.status == "ok":
      return ""
    lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if self.status == "timeout":
      return f"timeout after {self.duration_s:.1f}s"
    if self.status == "killed":
      return f"killed by signal {-self.returncode}" + (f": {last}" if last else "")
    return f"{self.status}: {last or f'exit code {self.returncode}'}"


# --- Landlock (filesystem writes, TCP, signal scope) ---------------------------------------------------------

_LL_FS_WRITE = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make-* (ABI 1)
_LL_FS_REFER, _LL_FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
_LL_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect (ABI 4)
_LL_SCOPE = (1 << 0) | (1 << 1)  # abstract unix sockets, signals (ABI 6)
_O_PATH = getattr(os, "O_PATH", 0o10000000)


def _landlock_abi() -> int:
  if _ARCH is None:
    return 0
  abi = _libc.syscall(_ARCH["landlock"][0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # VERSION flag
  return max(int(abi), 0)


def _landlock_plan(abi: int, network: bool):
  """Everything the child needs, built in the parent so the child only makes syscalls."""
  if abi <= 0:
    return None
  fs = _LL_FS_WRITE | (_LL_FS_REFER if abi >= 2 else 0) | (_LL_FS_TRUNCATE if abi >= 3 else 0)
  net = _LL_NET_TCP if (abi >= 4 and not network) else 0
  scope = _LL_SCOPE if abi >= 6 else 0
  size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
  attr = ctypes.create_string_buffer(struct.pack("<QQQ", fs, net, scope)[:size], size)
  # struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd (filled in the child).
  workdir_rule = ctypes.create_string_buffer(12)
  devnull_rule = ctypes.create_string_buffer(12)
  return dict(attr=attr, size=size, fs=fs, workdir_rule=workdir_rule, devnull_rule=devnull_rule,
              devnull_access=(1 << 1) | (_LL_FS_TRUNCATE if abi >= 3 else 0))


def _apply_landlock(plan) -> None:
  create, add_rule, restrict = _ARCH["landlock"]
  ruleset = _libc.syscall(create, plan["attr"], ctypes.c_size_t(plan["size"]), ctypes.c_uint32(0))
  if ruleset < 0:
    return
  for path, buf, access in ((".", plan["workdir_rule"], plan["fs"]),
                            ("/dev/null", plan["devnull_rule"], plan["devnull_access"])):
    try:
      fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    except OSError:
      continue
    struct.pack_into("<Qi", buf, 0, access, fd)
    _libc.syscall(add_rule, ctypes.c_int(ruleset), ctypes.c_int(1), buf, ctypes.c_uint32(0))
    os.close(fd)
  _libc.syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0))
  os.close(ruleset)


# --- seccomp (no new processes) ------------------------------------------------------------------------------

def _assemble(program) -> bytes:
  """Classic BPF from (op, k, jump_true_label, jump_false_label) rows and label strings; jumps are forward."""
  labels, rows = {}, []
  for item in program:
    if isinstance(item, str):
      labels[item] = len(rows)
    else:
      rows.append(item)
  out = []
  for i, (code, k, jt, jf) in enumerate(rows):
    rel = lambda label: 0 if label is None else labels[label] - i - 1
    out.append(struct.pack("<HBBI", code, rel(jt), rel(jf), k))
  return b"".join(out)


def _seccomp_program():
  """On our arch: fork, vfork, clone without CLONE_THREAD and x32 syscalls fail with EAGAIN; clone3 fails with
  ENOSYS, so glibc falls back to clone, whose flags the filter can read; everything else is allowed."""
  if _ARCH is None:
    return None
  ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
  allow, eagain, enosys = 0x7FFF0000, 0x00050000 | 11, 0x00050000 | 38
  program = [(ld, 4, None, None),  # seccomp_data.arch
             (jeq, _ARCH["audit"], None, "allow"),
             (ld, 0, None, None),  # seccomp_data.nr
             (jge, 0x40000000, "eagain", None)]
  program += [(jeq, nr, "eagain", None) for nr in _ARCH["fork"]]
  program += [(jeq, _ARCH["clone3"], "enosys", None),
              (jeq, _ARCH["clone"], None, "allow"),
              (ld, 16, None, None),  # low half of args[0]: the clone flags (little endian)
              (jset, _CLONE_THREAD, "allow", "eagain"),
              "allow", (ret, allow, None, None),
              "eagain", (ret, eagain, None, None),
              "enosys", (ret, enosys, None, None)]
  prog = _assemble(program)
  filt = ctypes.create_string_buffer(prog, len(prog))
  fprog = ctypes.create_string_buffer(struct.pack("<HxxxxxxQ", len(prog) // 8, ctypes.addressof(filt)), 16)
  return filt, fprog


# --- the preexec_fn -------------------------------------------------------------------------------------------

def limit_child(limits: SandboxLimits) -> Callable[[], None]:
  """A `preexec_fn` for subprocess.Popen applying every layer above. The child's working directory (Popen's cwd)
  becomes the only place it can write; pass `start_new_session=True` or let this call setsid. Failures of
  optional layers are ignored, never raised, so the program still runs with the layers the machine allows."""
  plan = _landlock_plan(_landlock_abi(), limits.network)
  seccomp = None if limits.subprocesses else _seccomp_program()
  mem = int(limits.memory_mb) << 20
  fsize = int(limits.max_file_mb) << 20
  cpu = max(1, int(limits.cpu_s))

  def preexec() -> None:
    try:
      os.setsid()
    except OSError:
      pass  # already a session leader (start_new_session=True)
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                       (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_CORE, (0, 0)),
                       (resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))):
      try:
        resource.setrlimit(res, value)
      except (ValueError, OSError):
        pass
    if limits.subprocesses:
      try:  # effective for non-root only; root is exempt from RLIMIT_NPROC
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
      except (ValueError, OSError):
        pass
    if not limits.network:
      _libc.unshare(_CLONE_NEWNET)  # needs CAP_SYS_ADMIN; without it the user namespace below may allow it
    if _libc.unshare(_CLONE_NEWUSER) == 0 and not limits.network:
      _libc.unshare(_CLONE_NEWNET)  # no-op failure if already done above
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if plan is not None:
      _apply_landlock(plan)
    if seccomp is not None:
      _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(seccomp[1]), 0, 0)

  preexec.seccomp = seccomp  # keep the filter's buffers alive as long as the function
  return preexec


def sandbox_argv(argv: list[str], limits: SandboxLimits) -> list[str]:
  """`argv` wrapped so that a fresh, single-threaded interpreter applies `limit_child(limits)` and then execs
  `argv` (argv[0] a path). Prefer this to `preexec_fn` from a multithreaded parent such as a JAX process, where
  running Python between fork and exec can deadlock; it also lets subprocess use vfork. The launcher runs with
  -S (no site-packages): this module needs only the standard library."""
  return [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__),
          json.dumps(dataclasses.asdict(limits)), *argv]


def features() -> dict[str, object]:
  """Which layers this machine gives (probed once in a throwaway child): for logs and for tests to skip on."""
  global _FEATURES
  if _FEATURES is None:
    probe = ("import socket\ntry:\n  socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
             "  print('net-open')\nexcept ConnectionRefusedError:\n  print('net-open')\n"
             "except OSError:\n  print('net-closed')\n")
    res = run_python(probe, SandboxLimits(timeout_s=20), _raw=True)
    _FEATURES = dict(network_namespace="net-closed" in res.stdout, landlock_abi=_landlock_abi(),
                     seccomp=_ARCH is not None, root=os.geteuid() == 0)
  return _FEATURES


_FEATURES = None

_NO_SOCKET_PRELUDE = """
import socket as _s
def _no_network(*a, **k):
  raise OSError(101, 'network disabled in the sandbox')
for _n in ('socket', 'create_connection', 'create_server', 'socketpair', 'getaddrinfo', 'fromfd'):
  setattr(_s, _n, _no_network)
del _s, _n, _no_network
"""

_RUN_MAIN = """
import sys, runpy
sys.path.insert(0, '.')
sys.argv = ['main.py']
runpy.run_path('main.py', run_name='__main__')
"""


def _drain(stream, limit: int, out: dict) -> None:
  """Read a pipe to EOF keeping the first `limit` bytes, so the child never blocks on a full pipe."""
  kept = []
  size = 0
  while True:
    chunk = stream.read1(65536)
    if not chunk:
      break
    if size < limit:
      kept.append(chunk[:limit - size])
    size += len(chunk)
  text = b"".join(kept).decode("utf-8", errors="replace")
  out["text"] = text + (f"\n[output truncated: {size} bytes, kept {limit}]" if size > limit else "")


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), *, stdin: str | None = None,
               files: dict[str, str] | None = None, _raw: bool = False) -> SandboxResult:
  """Run `code` as `main.py` with `python -I` in a fresh temporary directory (deleted afterwards), holding
  `files` (relative name -> text) beside it. Never raises for anything the program does."""
  workdir = tempfile.mkdtemp(prefix="sandbox_")
  try:
    for name, text in (files or {}).items():
      path = os.path.normpath(os.path.join(workdir, name))
      if not path.startswith(workdir + os.sep):
        raise ValueError(f"sandbox file {name!r} escapes the working directory")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "main.py"), "w") as f:
      f.write(code)
    guard_sockets = not limits.network and not _raw and not features()["network_namespace"]
    prelude = (_NO_SOCKET_PRELUDE if guard_sockets else "") + _RUN_MAIN
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8"}
    start = time.monotonic()
    proc = subprocess.Popen(sandbox_argv([sys.executable, "-I", "-B", "-c", prelude], limits), cwd=workdir,
                            env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    outs: tuple[dict, dict] = ({"text": ""}, {"text": ""})
    readers = [threading.Thread(target=_drain, args=(s, limits.max_output_bytes, o), daemon=True)
               for s, o in ((proc.stdout, outs[0]), (proc.stderr, outs[1]))]
    for r in readers:
      r.start()
    if stdin is not None:
      try:
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
      except (BrokenPipeError, OSError):
        pass
    timed_out = False
    try:
      proc.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
      timed_out = True
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # also any thread or child left behind after a normal exit
    except (ProcessLookupError, PermissionError):
      pass
    proc.wait()
    duration = time.monotonic() - start
    for r in readers:
      r.join(timeout=2.0)  # a pipe can outlive the group only if a descendant escaped it (subprocesses=True)
    for stream in (proc.stdout, proc.stderr):
      try:
        stream.close()
      except OSError:
        pass
    stdout, stderr = outs[0]["text"], outs[1]["text"]
    status = _status(proc.returncode, timed_out, stderr, duration, limits)
    return SandboxResult(status, stdout, stderr, proc.returncode, duration)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _status(returncode: int, timed_out: bool, stderr: str, duration: float, limits: SandboxLimits) -> str:
  # RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one (a second later).
  if timed_out or returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and duration >= limits.cpu_s):
    return "timeout"
  tail = stderr[-2000:]
  if "MemoryError" in tail or "Cannot allocate memory" in tail or "std::bad_alloc" in tail:
    return "memory"
  if returncode == 0:
    return "ok"
  return "killed" if returncode < 0 else "error"


if __name__ == "__main__":  # the launcher of `sandbox_argv`: limit this process, then become the program
  limit_child(SandboxLimits(**json.loads(sys.argv[1])))()
  os.execv(sys.argv[2], sys.argv[2:])
