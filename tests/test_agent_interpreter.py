"""The stateful sandboxed interpreter: state, results, images, and escapes (each contained, reported, and the
session usable afterwards)."""
import base64
import os
import socket
import threading

import pytest

from internlm_jax import sandbox
from internlm_jax.agent import ActionExecutor, InterpreterTool, PythonSession, actions

LIMITS = sandbox.SandboxLimits(timeout_s=4.0, cpu_s=2, memory_mb=1024, max_output_bytes=2000)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
  with PythonSession(tmp_path_factory.mktemp("py"), LIMITS, grace_s=1.0) as s:
    yield s


def need(feature: str):
  if not sandbox.features().get(feature):
    pytest.skip(f"this machine's sandbox lacks {feature}")


def recovers(session):
  """The session still runs code after an escape attempt."""
  cell = session.run("21 * 2")
  assert cell.status == "ok" and cell.result == "42"


def test_state_result_output_and_errors(session):
  first = session.run("x = 41\nprint('hello')\nx + 1")
  assert (first.status, first.stdout, first.result) == ("ok", "hello\n", "42")
  assert session.run("x").result == "41"
  assert session.run("y = 3").result is None
  error = session.run("def f():\n  return 1 / 0\nf()")
  assert error.status == "error" and "ZeroDivisionError" in error.error and "return 1 / 0" in error.error
  assert "interpreter_worker" not in error.error  # the worker's own frames are hidden
  assert "SyntaxError" in session.run("if:").error
  assert "SystemExit" in session.run("import sys; sys.exit(3)").error
  assert "not available" in session.run("input()").error
  fd = session.run("import os; os.write(1, b'raw fd\\n'); print('py')")
  assert "raw fd" in fd.stdout and "py" in fd.stdout
  assert "output truncated" in session.run("print('x' * 100000)").stdout
  assert session.run("x").result == "41"


def test_infinite_loop_is_stopped_and_state_kept(session):
  session.run("kept = 'yes'")
  cell = session.run("while True:\n  pass")
  assert cell.status == "timeout" and "TimeoutError" in cell.error and not cell.restarted
  assert session.run("kept").result == "'yes'"


def test_loop_that_swallows_interrupts_is_killed_and_restarted(session):
  cell = session.run("import time\nwhile True:\n  try:\n    time.sleep(0.05)\n  except BaseException:\n    pass")
  assert cell.status == "timeout" and cell.restarted and "killed" in cell.error
  assert "variables from earlier cells are lost" in cell.text()
  recovers(session)


def test_fork_bomb_is_refused(session):
  need("seccomp")
  cell = session.run("import os\nwhile True:\n  os.fork()")
  assert cell.status == "error" and "BlockingIOError" in cell.error
  sub = session.run("import subprocess\nsubprocess.run(['echo', 'hi'])")
  assert sub.status == "error"
  recovers(session)


def test_huge_allocation_raises_memory_error(session):
  session.run("small = [1, 2, 3]")
  cell = session.run("big = bytearray(10 * 1024 ** 3)")
  assert cell.status == "memory" and "MemoryError" in cell.error and not cell.restarted
  assert session.run("small").result == "[1, 2, 3]"


def test_writes_only_inside_the_working_directory(session, tmp_path):
  need("landlock_abi")
  target = tmp_path / "escaped.txt"
  cell = session.run(f"open({str(target)!r}, 'w').write('x')")
  assert cell.status == "error" and "PermissionError" in cell.error and not target.exists()
  assert session.run("open('inside.txt', 'w').write('ok')").status == "ok"
  assert (open(os.path.join(session.workdir, "inside.txt")).read()) == "ok"
  recovers(session)


def test_no_network(session):
  need("network_namespace")
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  threading.Thread(target=lambda: server.accept(), daemon=True).start()  # a real listener, not a refusal
  port = server.getsockname()[1]
  cell = session.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
  server.close()
  assert cell.status == "error" and ("Error" in cell.error)
  recovers(session)


def test_ctypes_crash_and_os_exit_restart_the_worker(session):
  session.run("lost = 1")
  crash = session.run("import ctypes\nctypes.string_at(0)")
  assert crash.status == "crashed" and "SIGSEGV" in crash.error and crash.restarted
  assert "NameError" in session.run("lost").error  # a fresh namespace
  assert session.run("import os; os._exit(3)").error == "the interpreter process died (exit code 3)"
  recovers(session)


def test_matplotlib_figures_become_pngs(tmp_path):
  # Its own session: importing matplotlib can take seconds of a loaded CI machine, past the 4 s cells above.
  limits = sandbox.SandboxLimits(timeout_s=60.0, cpu_s=30, memory_mb=1024, max_output_bytes=2000)
  with PythonSession(tmp_path, limits, grace_s=1.0) as session:
    cell = session.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.title('t');")
    assert cell.status == "ok" and len(cell.images) == 1, cell
    assert cell.images[0].startswith(session.workdir)
    assert base64.b64decode(cell.images_base64()[0])[:4] == b"\x89PNG"
    assert session.run("plt.get_fignums()").result == "[]"  # saved figures are closed


def test_interpreter_tool_results(tmp_path):
  tool = InterpreterTool(tmp_path / "work", LIMITS)
  executor = ActionExecutor([tool])
  try:
    tool.session.put_file("data.csv", "a,b\n1,2\n")
    ok = executor("python", {"code": "open('data.csv').read().splitlines()[1]"})
    assert ok.status == actions.SUCCESS and ok.text() == "'1,2'"
    bad = executor("python", {"code": "raise ValueError('nope')"})
    assert bad.status == actions.TOOL_ERROR and "ValueError: nope" in bad.text()
    with pytest.raises(ValueError, match="outside"):
      tool.session.put_file("../x.txt", "no")
  finally:
    executor.close()
  assert tool.session._proc is None
