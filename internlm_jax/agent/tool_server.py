"""Remote tools: a small HTTP server exposing tools, and client tools that call it (AgentLego's tool server).

  GET  /tools          -> [function schema, ...]
  POST /tools/{name}   body: JSON arguments -> ActionResult.to_dict()

Standard library only (http.server), threaded, bound to 127.0.0.1 unless asked otherwise: a tool server runs
code on behalf of whoever can reach it. Image parts are returned with their bytes (base64) as well as the
server's path, since the client cannot read the server's disk.

  python -m internlm_jax.agent.tool_server --tools=calculator,python --port=16180
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

from internlm_jax.agent.actions import TOOL_ERROR, ActionExecutor, ActionResult, Tool, Toolkit

MAX_BODY_BYTES = 1 << 20


def _result_with_images(result: ActionResult) -> dict[str, Any]:
  out = result.to_dict()
  for part in out["parts"]:
    if part.get("type") == "image" and os.path.isfile(part["path"]):
      with open(part["path"], "rb") as f:
        part["base64"] = base64.b64encode(f.read()).decode("ascii")
  return out


class _Handler(BaseHTTPRequestHandler):
  server: "_Server"

  def log_message(self, fmt, *args):  # quiet: tests and agents print their own traces
    pass

  def _send(self, code: int, payload: Any) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    self.send_response(code)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):
    if self.path.rstrip("/") == "/tools":
      self._send(200, self.server.executor.schemas())
    else:
      self._send(404, {"error": f"no route {self.path}; use GET /tools or POST /tools/NAME"})

  def do_POST(self):
    prefix = "/tools/"
    if not self.path.startswith(prefix):
      return self._send(404, {"error": f"no route {self.path}; use POST /tools/NAME"})
    name = urllib.parse.unquote(self.path[len(prefix):])
    length = int(self.headers.get("Content-Length") or 0)
    if length > MAX_BODY_BYTES:
      return self._send(413, {"error": f"request body over {MAX_BODY_BYTES} bytes"})
    try:
      args = json.loads(self.rfile.read(length) or b"{}")
    except json.JSONDecodeError:
      return self._send(400, {"error": "the body must be JSON arguments"})
    if name not in self.server.executor:
      return self._send(404, {"error": f"unknown tool {name!r}; available: {sorted(self.server.executor.tools)}"})
    with self.server.lock:  # tools keep state (an interpreter session): one call at a time
      result = self.server.executor(name, args)
    self._send(200, _result_with_images(result))


class _Server(ThreadingHTTPServer):
  daemon_threads = True
  executor: ActionExecutor
  lock: threading.Lock


class ToolServer:
  """Serves tools over HTTP on a background thread. `port=0` picks a free port; see `url`."""

  def __init__(self, tools: Iterable[Tool | Toolkit] | ActionExecutor, host: str = "127.0.0.1", port: int = 0):
    self.executor = tools if isinstance(tools, ActionExecutor) else ActionExecutor(tools)
    self.httpd = _Server((host, port), _Handler)
    self.httpd.executor, self.httpd.lock = self.executor, threading.Lock()
    self._thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    host, port = self.httpd.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> "ToolServer":
    self._thread = threading.Thread(target=self.httpd.serve_forever, name="tool-server", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()
    if self._thread is not None:
      self._thread.join(timeout=5)
    self.executor.close()

  def __enter__(self) -> "ToolServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def _request(url: str, data: Any = None, timeout_s: float = 60.0) -> Any:
  body = None if data is None else json.dumps(data).encode()
  request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"},
                                   method="GET" if data is None else "POST")
  with urllib.request.urlopen(request, timeout=timeout_s) as response:
    return json.loads(response.read().decode("utf-8"))


def remote_tools(url: str, timeout_s: float = 60.0) -> list[Tool]:
  """Client tools for every tool a server offers (AgentLego's `RemoteTool.from_server`). A call that cannot reach
  the server comes back as a tool_error result, like any other tool failure."""
  try:
    schemas = _request(url.rstrip("/") + "/tools", timeout_s=timeout_s)
  except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
    raise ConnectionError(f"cannot list tools at {url}: {getattr(e, 'reason', e)}") from None
  tools = []
  for schema in schemas:
    endpoint = url.rstrip("/") + "/tools/" + urllib.parse.quote(schema["name"])

    def call(_endpoint=endpoint, _name=schema["name"], **kwargs) -> ActionResult:
      try:
        out = _request(_endpoint, kwargs, timeout_s)
      except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:200]
        return ActionResult(_name, kwargs, TOOL_ERROR, error=f"tool server answered HTTP {e.code}: {detail}")
      except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
        return ActionResult(_name, kwargs, TOOL_ERROR, error=f"tool server unreachable: {getattr(e, 'reason', e)}")
      return ActionResult(_name, kwargs, out.get("status", TOOL_ERROR), out.get("parts", []), out.get("error"),
                          out.get("duration_s", 0.0))

    tools.append(Tool(call, schema=schema))
  return tools


def main(argv: list[str] | None = None) -> None:
  from internlm_jax.agent.tools import builtin_tools
  parser = argparse.ArgumentParser(description="Serve agent tools over HTTP.")
  parser.add_argument("--tools", default="calculator", help="comma-separated: python,calculator,plot,files,search")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=16180)
  parser.add_argument("--workdir", default="agent_workdir")
  parser.add_argument("--documents", default=None, help="document collection for the search tool")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  server = ToolServer(builtin_tools(args.tools.split(","), workdir=args.workdir, documents=args.documents),
                      args.host, args.port)
  print(f"serving {sorted(server.executor.tools)} at {server.url}", flush=True)
  try:
    server.httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.httpd.server_close()
    server.executor.close()


if __name__ == "__main__":
  main()
