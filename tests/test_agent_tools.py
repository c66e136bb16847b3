"""Tool library: calculator, files, BM25 search, plotting, and the HTTP tool server with its client tools."""
import json
import os

import pytest

from internlm_jax.agent import ActionExecutor, actions, make_tool
from internlm_jax.agent.bench import DOCUMENTS
from internlm_jax.agent.tool_server import ToolServer, remote_tools
from internlm_jax.agent.tools import (BM25, FileTools, PlotTool, SearchTool, builtin_tools, calculate, calculator,
                                      load_documents, tokenize)


@pytest.mark.parametrize("expression, value", [
    ("1234 * 5678 + 91", "7006743"), ("(17.5 * 4 - 3) / 2.5", "26.8"), ("0.1 + 0.2", "0.3"), ("2^10", "1024"),
    ("10 / 4", "2.5"), ("10 / 2", "5"), ("-3 ** 2", "-9"), ("sqrt(16) + abs(-2)", "6"), ("factorial(20)",
    "2432902008176640000"), ("1,000 * 3", "3000"), ("max(3, 7, 5)", "7"), ("2 * pi", "6.28318530718"),
    ("7 // 2 + 7 % 2", "4"), ("6 × 7", "42")])
def test_calculator_values(expression, value):
  assert calculate(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('ls')", "unknown function"), ("open('x')", "unknown function"),
    ("x + 1", "unknown name 'x'"), ("(1).__class__", "unsupported expression element Attribute"),
    ("9 ** 9 ** 9", "exceeds 4096 bits"), ("factorial(100000)", "at most 1000"), ("1 / 0", "division by zero"),
    ("[1, 2]", "unsupported"), ("1 +", "not an arithmetic expression"), ("'a' * 3", "unsupported"),
    ("lambda: 1", "unsupported"), ("exp(1000)", "overflow")])
def test_calculator_refuses_without_eval(expression, error):
  result = calculator({"expression": expression})
  assert result.status == actions.TOOL_ERROR and error in result.error


def test_files_stay_in_the_working_directory(tmp_path):
  root = tmp_path / "work"
  (root / "sub").mkdir(parents=True)
  (root / "notes.txt").write_text("hello " * 10)
  (tmp_path / "secret.txt").write_text("secret")
  os.symlink(tmp_path / "secret.txt", root / "link.txt")
  executor = ActionExecutor([FileTools(root, max_chars=20)])
  assert json.loads(executor("files.list", {}).text()) == ["link.txt", "notes.txt", "sub/"]
  read = executor("files.read", {"path": "notes.txt"}).text()
  assert read.startswith("hello hello hello he") and "start=20" in read
  assert executor("files.read", {"path": "notes.txt", "start": 51}).text() == "lo hello "
  for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt", "sub/../../secret.txt"):
    result = executor("files.read", {"path": bad})
    assert result.status == actions.TOOL_ERROR and "outside the working directory" in result.error
  assert "not a file" in executor("files.read", {"path": "missing.txt"}).error


def test_bm25_ranks_and_scores():
  index = BM25([tokenize("the cat sat"), tokenize("the dog ran far"), tokenize("cat cat food")])
  scores = index.scores(tokenize("cat food"))
  assert scores[2] > scores[0] > 0 and scores[1] == 0
  assert all(v > 0 for v in index.idf.values())  # the non-negative idf variant


def test_search_tool_over_documents(tmp_path):
  search = ActionExecutor([SearchTool(DOCUMENTS)])
  hits = json.loads(search("search", {"query": "When was the Varnholt Observatory completed?"}).text())
  assert hits[0]["id"] == "varnholt" and len(hits) <= 3
  assert search("search", {"query": "zzz unknown"}).text() == "[]"
  assert "between 1 and 10" in search("search", {"query": "x", "top_k": 50}).error
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.txt").write_text("apples are red")
  (tmp_path / "docs" / "b.md").write_text("bananas are yellow")
  (tmp_path / "c.jsonl").write_text('{"id": "x", "text": "kiwis are green"}\n\n{"text": "plums"}\n')
  assert [d["id"] for d in load_documents(tmp_path / "docs")] == ["a.txt", "b.md"]
  assert [d["id"] for d in load_documents(tmp_path / "c.jsonl")] == ["x", "2"]
  hits = SearchTool(tmp_path / "docs").tools()[0]({"query": "yellow"}).text()
  assert json.loads(hits)[0]["id"] == "b.md"


def test_plot_writes_png(tmp_path):
  plot = PlotTool(tmp_path / "plots").tools()[0]
  result = plot({"y": [1, 4, 9], "x": [1, 2, 3], "kind": "bar", "title": "squares"})
  assert result.ok and len(result.images) == 1
  with open(result.images[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "x has 2 values but y has 3" in plot({"y": [1, 2, 3], "x": [1, 2]}).error


def test_builtin_tools_by_name(tmp_path):
  names = [t.name for t in builtin_tools(["calculator", "plot", "files"], workdir=str(tmp_path))]
  assert names == ["calculator", "plot", "files"]
  with pytest.raises(ValueError, match="needs a document collection"):
    builtin_tools(["search"], workdir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown tool 'web'"):
    builtin_tools(["web"], workdir=str(tmp_path))


def test_tool_server_and_remote_tools(tmp_path):
  @make_tool
  def fail(reason: str) -> str:
    """Always fails.

    Args:
      reason: Why.
    """
    raise RuntimeError(reason)

  with ToolServer([calculator, fail, PlotTool(tmp_path)]) as server:
    assert server.url.startswith("http://127.0.0.1:")
    tools = {t.name: t for t in remote_tools(server.url)}
    assert sorted(tools) == ["calculator", "fail", "plot"]
    assert tools["calculator"].schema == calculator.schema
    assert tools["calculator"]({"expression": "6 * 7"}).text() == "42"
    bad = tools["calculator"]({"expr": "1"})  # checked on the client against the served schema
    assert bad.status == actions.ARGS_ERROR
    failed = tools["fail"]({"reason": "boom"})
    assert failed.status == actions.TOOL_ERROR and "RuntimeError: boom" in failed.error
    image = tools["plot"]({"y": [1, 2]}).parts[0]
    assert image["type"] == "image" and image["base64"].startswith("iVBOR")
  down = tools["calculator"]({"expression": "1"})  # the server is gone: a result, not an exception
  assert down.status == actions.TOOL_ERROR and "unreachable" in down.error
  with pytest.raises(ConnectionError, match="cannot list tools"):
    remote_tools(server.url, timeout_s=2)
