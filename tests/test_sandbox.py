"""The sandbox contains what model-written code can do wrong: loops, memory, forks, files, sockets, output."""
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from internlm_jax import sandbox

FAST = sandbox.SandboxLimits(timeout_s=3.0, cpu_s=3)


def test_normal_output_and_stdin():
  res = sandbox.run_python("import sys\nprint('hello', sys.stdin.read().strip())", FAST, stdin="world\n")
  assert res.status == "ok", res.stderr
  assert res.stdout == "hello world\n" and res.returncode == 0 and res.reason == ""


def test_error_reports_the_exception():
  res = sandbox.run_python("def f():\n  raise ValueError('boom')\nf()", FAST)
  assert res.status == "error" and res.returncode == 1
  assert res.reason == "error: ValueError: boom"


def test_output_is_truncated():
  limits = sandbox.SandboxLimits(timeout_s=5.0, max_output_bytes=1000)
  res = sandbox.run_python("import sys\nfor _ in range(1000): sys.stdout.write('x' * 1000)", limits)
  assert res.status == "ok"
  assert res.stdout.startswith("x" * 1000) and "[output truncated: 1000000 bytes, kept 1000]" in res.stdout
  assert len(res.stdout) < 1100


def test_infinite_loop_times_out_within_the_limit():
  limits = sandbox.SandboxLimits(timeout_s=1.5, cpu_s=10)
  start = time.monotonic()
  res = sandbox.run_python("while True:\n  pass", limits)
  assert res.status == "timeout" and res.reason.startswith("timeout")
  assert time.monotonic() - start < 1.5 + 2.0


def test_cpu_limit_stops_a_busy_program():
  res = sandbox.run_python("while True:\n  pass", sandbox.SandboxLimits(timeout_s=30.0, cpu_s=1))
  assert res.status == "timeout" and res.duration_s < 10


def test_large_allocation_is_a_memory_failure():
  res = sandbox.run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", FAST)
  assert res.status == "memory" and "allocated" not in res.stdout
  assert "MemoryError" in res.reason


def test_socket_to_a_local_listener_fails():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    res = sandbox.run_python(code, FAST)
  assert res.status == "error" and "connected" not in res.stdout
  # The same program reaches the listener when network is allowed: the failure above is the sandbox's doing.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    res = sandbox.run_python(code, sandbox.SandboxLimits(timeout_s=3.0, network=True))
  assert res.status == "ok" and "connected" in res.stdout, res.stderr


def test_files_land_in_a_temporary_directory_that_is_deleted():
  res = sandbox.run_python("import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())\n"
                           "print(open('data/in.txt').read())", FAST, files={"data/in.txt": "given"})
  assert res.status == "ok", res.stderr
  workdir, given = res.stdout.split()
  assert given == "given" and workdir != os.getcwd()
  assert not os.path.exists(workdir)


def test_writes_outside_the_directory_fail():
  if not sandbox.features()["landlock_abi"]:
    pytest.skip("kernel without Landlock: writes outside the working directory are not confined")
  with tempfile.TemporaryDirectory() as outside:
    target = os.path.join(outside, "escaped.txt")
    res = sandbox.run_python(f"open({target!r}, 'w').write('x')", FAST)
    assert res.status == "error" and "PermissionError" in res.reason
    assert not os.path.exists(target)


def test_fork_bomb_is_contained_and_the_runner_survives():
  code = "import os\nwhile True:\n  os.fork()"
  res = sandbox.run_python(code, FAST)
  assert res.status in ("error", "timeout"), res
  # The test process can still start processes: the limit was the child's alone.
  assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\n"


def test_threads_still_work():
  res = sandbox.run_python("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,))"
                           " for i in range(4)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n"
                           "print(sorted(out))", FAST)
  assert res.status == "ok" and res.stdout.strip() == "[0, 1, 2, 3]", res.stderr


def test_environment_of_the_parent_does_not_leak():
  os.environ["SANDBOX_TEST_SECRET"] = "s3cret"
  try:
    res = sandbox.run_python("import os\nprint(os.environ.get('SANDBOX_TEST_SECRET'))", FAST)
  finally:
    del os.environ["SANDBOX_TEST_SECRET"]
  assert res.stdout.strip() == "None"


def test_limit_child_as_a_preexec_fn():
  """The agents' interpreter drives its own Popen with the same limits."""
  with tempfile.TemporaryDirectory() as workdir:
    proc = subprocess.run([sys.executable, "-I", "-c", "open('ok.txt', 'w').write('1')\nx = bytearray(2 << 30)"],
                          cwd=workdir, capture_output=True, text=True, preexec_fn=sandbox.limit_child(FAST))
    assert proc.returncode == 1 and "MemoryError" in proc.stderr
    assert os.path.exists(os.path.join(workdir, "ok.txt"))


def test_sandbox_argv_wraps_any_command():
  """The launcher form, safe from multithreaded parents: same limits, then exec of the real command."""
  with tempfile.TemporaryDirectory() as workdir:
    argv = sandbox.sandbox_argv([sys.executable, "-I", "-c", "import os\nos.fork()"], FAST)
    proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, start_new_session=True)
    assert proc.returncode == 1 and "BlockingIOError" in proc.stderr
