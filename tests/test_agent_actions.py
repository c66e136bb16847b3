"""Action API: schemas from hints and docstrings, toolkits, argument checks, failures returned as results."""
from typing import Literal

import pytest

from internlm_jax.agent import actions as act
from internlm_jax.agent.tools import calculator


def weather(city: str, days: int = 1, unit: Literal["C", "F"] = "C", hourly: bool | None = None) -> dict:
  """Gets the weather forecast.

  More detail that belongs to the description.

  Args:
    city: Name of the city,
      possibly with the country.
    days (int): How many days ahead.
    unit: Temperature unit.
    hourly: Hourly values too.

  Returns:
    A forecast.
  """
  if city == "Atlantis":
    raise LookupError("no such city")
  return {"city": city, "days": days, "unit": unit}


def test_schema_from_hints_and_docstring():
  schema = act.function_schema(weather)
  assert schema["name"] == "weather"
  assert schema["description"].startswith("Gets the weather forecast. More detail")
  props = schema["parameters"]["properties"]
  assert props["city"] == {"type": "string", "description": "Name of the city, possibly with the country."}
  assert props["days"]["type"] == "integer" and props["days"]["default"] == 1
  assert props["unit"]["enum"] == ["C", "F"] and props["unit"]["type"] == "string"
  assert props["hourly"]["type"] == "boolean"
  assert schema["parameters"]["required"] == ["city"]


def test_list_and_optional_types():
  def f(xs: list[float], names: list[str] | None, anything=None):
    """Sums."""
  props = act.function_schema(f)["parameters"]
  assert props["properties"]["xs"] == {"type": "array", "items": {"type": "number"}}
  assert props["properties"]["anything"] == {}
  assert props["required"] == ["xs"]  # `X | None` without a default is still optional


@pytest.mark.parametrize("args, status, text", [
    ({"city": "Rome"}, act.SUCCESS, '"days": 1'),
    ('{"city": "Rome", "days": "3"}', act.SUCCESS, '"days": 3'),  # quoted numbers are converted
    ("Rome", act.ARGS_ERROR, "JSON object"),  # bare strings only for one-parameter tools
    ({}, act.ARGS_ERROR, "missing required argument(s) ['city']"),
    ({"city": "Rome", "country": "IT"}, act.ARGS_ERROR, "unknown argument(s) ['country']"),
    ({"city": "Rome", "days": "three"}, act.ARGS_ERROR, "must be an integer"),
    ({"city": "Rome", "unit": "K"}, act.ARGS_ERROR, "must be one of ['C', 'F']"),
    ({"city": "Rome", "days": True}, act.ARGS_ERROR, "must be an integer"),
    ([1, 2], act.ARGS_ERROR, "must be a JSON object"),
    ({"city": "Atlantis"}, act.TOOL_ERROR, "LookupError: no such city"),
])
def test_call_statuses_never_raise(args, status, text):
  result = act.make_tool(weather)(args)
  assert result.status == status
  assert text in result.text()
  assert result.tool == "weather" and result.duration_s >= 0


def test_one_parameter_tool_takes_a_bare_string():
  echo = act.make_tool(lambda text: text.upper(), name="shout")
  assert echo("hi there").text() == "HI THERE"
  assert echo('{"text": "json"}').text() == "JSON"
  assert echo('"quoted json"').text() == "QUOTED JSON"
  assert calculator("42").text() == "42"  # a JSON number for a string parameter


class Notes(act.Toolkit):
  """Keeps notes."""

  def __init__(self):
    super().__init__()
    self.notes, self.setups = [], 0

  def setup(self):
    self.setups += 1

  @act.tool_api
  def add(self, text: str) -> str:
    """Adds a note.

    Args:
      text: The note.
    """
    self.notes.append(text)
    return f"{len(self.notes)} notes"

  @act.tool_api
  def count(self) -> int:
    """Counts notes."""
    return len(self.notes)


def test_toolkit_apis_share_state_and_set_up_once():
  kit = Notes()
  executor = act.ActionExecutor([kit, act.make_tool(weather)])
  assert sorted(executor.tools) == ["Notes.add", "Notes.count", "weather"]
  assert executor.tools["Notes.add"].schema["parameters"]["required"] == ["text"]
  assert executor("Notes.add", {"text": "a"}).text() == "1 notes"
  executor("Notes.add", {"text": "b"})
  assert executor("Notes.count").text() == "2" and kit.setups == 1
  assert "Notes.add: Adds a note." in executor.describe()


def test_unknown_tool_and_duplicates():
  executor = act.ActionExecutor([act.make_tool(weather)])
  result = executor("wether", {"city": "x"})
  assert result.status == act.ARGS_ERROR and "unknown tool 'wether'" in result.error
  with pytest.raises(ValueError, match="two tools are named 'weather'"):
    act.ActionExecutor([weather, weather])


def test_lagent_style_class_with_run_and_decorator():
  class Reverse:
    """Reverses text."""

    def run(self, text: str) -> str:
      """Args:
        text: Input.
      """
      return text[::-1]

  @act.make_tool(name="double")
  def twice(x: int) -> int:
    """Doubles."""
    return 2 * x

  executor = act.ActionExecutor([Reverse(), twice])
  assert executor("Reverse", {"text": "abc"}).text() == "cba"
  assert executor.tools["Reverse"].description == "Reverses text."
  assert executor("double", {"x": 4}).text() == "8"


def test_result_text_truncates_and_keeps_partial_output():
  long = act.make_tool(lambda n: "x" * n, name="long")
  assert "truncated 1000 chars" in long({"n": act.MAX_RESULT_CHARS + 1000}).text()
  result = act.ActionResult("t", {}, act.TOOL_ERROR, [act.text_part("partial")], "boom")
  assert result.text() == "partial\n[tool_error] boom"
  assert result.to_dict()["status"] == "tool_error"
