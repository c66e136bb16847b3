"""The tool library: calculator, plotting, files in a working directory, BM25 search over local documents.

The Python interpreter lives in interpreter.py and the remote (HTTP) tools in tool_server.py. Every tool here is
pure Python with no network: `calculator` parses with `ast` and never calls `eval`; `FileTools` resolves symlinks
before checking that a path stays inside its folder; `plot` uses matplotlib's object API (no pyplot global state,
so concurrent agents don't share figures).
"""
from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import uuid
from collections import Counter
from typing import Any, Iterable, Literal, Mapping

from internlm_jax.agent.actions import Tool, Toolkit, image_part, make_tool, tool_api

# ---- calculator -----------------------------------------------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.BitXor: operator.pow}  # "2^10" means a power on a calculator, never xor
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
              "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
              "atan": math.atan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil,
              "factorial": math.factorial, "min": min, "max": max, "gcd": math.gcd}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
_MAX_INT_BITS = 4096  # keeps "9**9**9" or factorial(10**6) from hanging the agent
_MAX_NODES = 200


def _bounded(value: Any) -> Any:
  if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
    raise ValueError(f"result exceeds {_MAX_INT_BITS} bits")
  return value


def _power(base: Any, exponent: Any) -> Any:
  if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
    if abs(base) > 1 and exponent * max(abs(base).bit_length() - 1, 1) > _MAX_INT_BITS:
      raise ValueError(f"result exceeds {_MAX_INT_BITS} bits")
  return base ** exponent


def _calc(node: ast.AST) -> Any:
  if isinstance(node, ast.Expression):
    return _calc(node.body)
  if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
    return node.value
  if isinstance(node, ast.Name) and node.id in _CONSTANTS:
    return _CONSTANTS[node.id]
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _calc(node.left), _calc(node.right)
    if type(node.op) in (ast.Pow, ast.BitXor):
      return _bounded(_power(left, right))
    return _bounded(_BINARY[type(node.op)](left, right))
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
    return _UNARY[type(node.op)](_calc(node.operand))
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
    if node.keywords:
      raise ValueError(f"{node.func.id}() takes positional arguments only")
    args = [_calc(a) for a in node.args]
    if node.func.id == "factorial" and args and isinstance(args[0], int) and args[0] > 1000:
      raise ValueError("factorial argument must be at most 1000")
    return _bounded(_FUNCTIONS[node.func.id](*args))
  if isinstance(node, ast.Call):
    name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
    raise ValueError(f"unknown function {name!r}; known: {sorted(_FUNCTIONS)}")
  if isinstance(node, ast.Name):
    raise ValueError(f"unknown name {node.id!r}; known: {sorted(_CONSTANTS) + sorted(_FUNCTIONS)}")
  raise ValueError(f"unsupported expression element {type(node).__name__}")


def format_number(value: Any) -> str:
  """Integers exactly; floats to 12 significant digits (0.1 + 0.2 -> 0.3), whole floats without '.0'."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"the result is not a number: {value!r}")
  if isinstance(value, int):
    return str(value)
  if math.isnan(value) or math.isinf(value):
    return str(value)
  if value.is_integer() and abs(value) < 1e15:
    return str(int(value))
  return f"{value:.12g}"


def calculate(expression: str) -> str:
  """Evaluates an arithmetic expression exactly and safely.

  Args:
    expression: Arithmetic with + - * / // % ** (or ^), parentheses, numbers, the constants pi, e, tau and
      the functions sqrt, exp, log, log10, log2, sin, cos, tan, asin, acos, atan, abs, round, floor, ceil,
      factorial, min, max, gcd. Example: "(3 + 4) * sqrt(16) / 2".

  Returns:
    The value as a number string.
  """
  text = expression.strip().replace("×", "*").replace("÷", "/").replace("−", "-")
  text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # "1,000" is a thousands separator here, not two arguments
  if len(text) > 1000:
    raise ValueError("expression is longer than 1000 characters")
  try:
    tree = ast.parse(text, mode="eval")
  except SyntaxError as e:
    raise ValueError(f"not an arithmetic expression: {e.msg}") from None
  if sum(1 for _ in ast.walk(tree)) > _MAX_NODES:
    raise ValueError(f"expression has more than {_MAX_NODES} elements")
  try:
    return format_number(_calc(tree))
  except ZeroDivisionError:
    raise ValueError("division by zero") from None
  except OverflowError:
    raise ValueError("numeric overflow") from None


calculator = make_tool(calculate, name="calculator")


# ---- plotting -------------------------------------------------------------------------------------------------
class PlotTool(Toolkit):
  """Draws charts from numbers to PNG files in a folder."""

  name = "plot"

  def __init__(self, out_dir: str | os.PathLike):
    super().__init__()
    self.out_dir = os.fspath(out_dir)

  @tool_api
  def run(self, y: list[float], x: list[float] | None = None, kind: Literal["line", "bar", "scatter"] = "line",
            title: str = "", xlabel: str = "", ylabel: str = "") -> dict:
    """Draws a line, bar or scatter chart and saves it as a PNG.

    Args:
      y: The values to plot.
      x: The x positions (default 0, 1, 2, ...); must have as many entries as y.
      kind: "line", "bar" or "scatter".
      title: Chart title.
      xlabel: Label of the x axis.
      ylabel: Label of the y axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    x = list(range(len(y))) if x is None else x
    if len(x) != len(y):
      raise ValueError(f"x has {len(x)} values but y has {len(y)}")
    if not y or len(y) > 100_000:
      raise ValueError("y must have between 1 and 100000 values")
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    {"line": ax.plot, "bar": ax.bar, "scatter": ax.scatter}[kind](x, y)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    os.makedirs(self.out_dir, exist_ok=True)
    path = os.path.join(self.out_dir, f"plot_{uuid.uuid4().hex[:8]}.png")
    fig.savefig(path, format="png")
    return image_part(path)


# ---- files in a working directory -----------------------------------------------------------------------------
class FileTools(Toolkit):
  """Lists and reads files inside one folder; paths that resolve outside it (.., absolute, symlinks) are refused."""

  name = "files"

  def __init__(self, root: str | os.PathLike, max_chars: int = 20_000):
    super().__init__()
    self.root = os.path.realpath(os.fspath(root))
    self.max_chars = max_chars

  def _resolve(self, path: str) -> str:
    full = os.path.realpath(os.path.join(self.root, path))
    if os.path.commonpath([full, self.root]) != self.root:
      raise PermissionError(f"{path!r} is outside the working directory")
    return full

  @tool_api
  def list(self, path: str = ".") -> list:
    """Lists the entries of a folder in the working directory.

    Args:
      path: A folder relative to the working directory.
    """
    full = self._resolve(path)
    if not os.path.isdir(full):
      raise FileNotFoundError(f"{path!r} is not a folder")
    return sorted(e + ("/" if os.path.isdir(os.path.join(full, e)) else "") for e in os.listdir(full))

  @tool_api
  def read(self, path: str, start: int = 0) -> str:
    """Reads a text file in the working directory.

    Args:
      path: A file relative to the working directory.
      start: Character offset to start from (for long files).
    """
    full = self._resolve(path)
    if not os.path.isfile(full):
      raise FileNotFoundError(f"{path!r} is not a file")
    with open(full, encoding="utf-8", errors="replace") as f:
      if start > 0:
        f.read(start)  # a character offset: text files cannot seek by characters
      text = f.read(self.max_chars + 1)
    if len(text) > self.max_chars:
      text = text[:self.max_chars] + f"\n... [more: call read with start={start + self.max_chars}]"
    return text


# ---- BM25 search ----------------------------------------------------------------------------------------------
_WORD_RE = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
  return [w.lower() for w in _WORD_RE.findall(text)]


class BM25:
  """Okapi BM25 over tokenized documents, with the non-negative idf log(1 + (N - n + 0.5) / (n + 0.5))."""

  def __init__(self, corpus: Iterable[list[str]], k1: float = 1.5, b: float = 0.75):
    self.k1, self.b = k1, b
    self.docs = [Counter(doc) for doc in corpus]
    self.lengths = [sum(c.values()) for c in self.docs]
    self.avg_len = (sum(self.lengths) / len(self.docs)) if self.docs else 0.0
    df = Counter(term for doc in self.docs for term in doc)
    n = len(self.docs)
    self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

  def scores(self, query: list[str]) -> list[float]:
    out = []
    for doc, length in zip(self.docs, self.lengths):
      norm = self.k1 * (1 - self.b + self.b * length / (self.avg_len or 1))
      out.append(sum(self.idf[t] * doc[t] * (self.k1 + 1) / (doc[t] + norm) for t in query if t in doc))
    return out


def load_documents(path: str | os.PathLike) -> list[dict[str, str]]:
  """Documents from a .jsonl file ({"id"?, "title"?, "text"} per line) or a folder of .txt/.md files."""
  path = os.fspath(path)
  docs = []
  if os.path.isdir(path):
    for name in sorted(os.listdir(path)):
      if name.endswith((".txt", ".md")):
        with open(os.path.join(path, name), encoding="utf-8", errors="replace") as f:
          docs.append({"id": name, "title": os.path.splitext(name)[0], "text": f.read()})
  elif os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if line.strip():
          row = json.loads(line)
          if "text" not in row:
            raise ValueError(f"{path}:{i + 1}: a document needs a 'text' field")
          docs.append({"id": str(row.get("id", i)), "title": row.get("title", ""), "text": row["text"]})
  else:
    raise FileNotFoundError(f"document collection {path!r} does not exist")
  return docs


class SearchTool(Toolkit):
  """Offline search: BM25 over a local document collection."""

  name = "search"

  def __init__(self, documents: Iterable[Mapping[str, Any]] | str | os.PathLike, snippet_chars: int = 500):
    super().__init__()
    self.documents = load_documents(documents) if isinstance(documents, (str, os.PathLike)) else [
        {"id": str(d.get("id", i)), "title": d.get("title", ""), "text": d["text"]} for i, d in enumerate(documents)]
    self.index = BM25(tokenize(d["title"] + " " + d["text"]) for d in self.documents)
    self.snippet_chars = snippet_chars

  @tool_api
  def run(self, query: str, top_k: int = 3) -> list:
    """Searches the document collection for passages relevant to a query.

    Args:
      query: Keywords or a question.
      top_k: How many results to return (1 to 10).
    """
    if not 1 <= top_k <= 10:
      raise ValueError("top_k must be between 1 and 10")
    scores = self.index.scores(tokenize(query))
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
    return [{"id": self.documents[i]["id"], "title": self.documents[i]["title"], "score": round(scores[i], 3),
             "text": self.documents[i]["text"][:self.snippet_chars]} for i in ranked if scores[i] > 0]


def builtin_tools(names: Iterable[str], *, workdir: str, documents: Any = None) -> list[Tool | Toolkit]:
  """Tools by command-line name: python, calculator, plot, files, search (needs `documents`)."""
  from internlm_jax.agent.interpreter import InterpreterTool  # imported here: it starts processes on use only
  out: list[Tool | Toolkit] = []
  for name in names:
    if name == "python":
      out.append(InterpreterTool(workdir=os.path.join(workdir, "python")))
    elif name == "calculator":
      out.append(calculator)
    elif name == "plot":
      out.append(PlotTool(os.path.join(workdir, "plots")))
    elif name == "files":
      out.append(FileTools(workdir))
    elif name == "search":
      if documents is None:
        raise ValueError("the search tool needs a document collection (a .jsonl file or a folder of .txt files)")
      out.append(SearchTool(documents))
    else:
      raise ValueError(f"unknown tool {name!r}; choose from python, calculator, plot, files, search")
  return out
