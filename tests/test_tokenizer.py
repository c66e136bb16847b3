"""Tokenizer: round trips, special pieces, the exact InternLM2 chat strings, tool-call parsing, errors."""
import json

import pytest

from internlm_jax import tokenizer as tk

CORPUS = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.
  def area(r):  return 3.14159 * r ** 2   # some code, 12345
The weather in Shanghai is 22 celsius. 你好，世界。
"""


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "tiny"
  return tk.Tokenizer(tk.train_tokenizer(prefix, 400, texts=[CORPUS * 8]))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
  """A sentencepiece model without the chat pieces."""
  import sentencepiece as spm
  prefix = str(tmp_path_factory.mktemp("plain") / "plain")
  spm.SentencePieceTrainer.train(sentence_iterator=iter([CORPUS] * 4), model_prefix=prefix, vocab_size=120,
                                 model_type="bpe", hard_vocab_limit=False, minloglevel=2)
  return tk.Tokenizer(prefix + ".model")


@pytest.mark.parametrize("text", ["Speak, speak.", "  two leading spaces", "a\n\nb  c \t", "你好 café 🙂 ünseen",
                                  "", "\n", "x<|im_end|>\ny</s>"])
def test_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_vocab_and_ids(tok):
  assert tok.vocab_size <= 400 and (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.pad_id == tok.eos_id
  assert tok.id_to_token(1) == "<s>" and tok.token_to_id("</s>") == 2
  with pytest.raises(tk.TokenizerError, match="not in the vocabulary"):
    tok.token_to_id("<|not_a_piece|>")
  with pytest.raises(tk.TokenizerError, match="outside the vocabulary"):
    tok.id_to_token(tok.vocab_size)


def test_special_pieces_are_single_ids_not_the_real_ones(tok):
  ids = tok.special_ids
  assert set(ids) == set(tk.CHAT_SPECIAL_PIECES)
  assert len(set(ids.values())) == 6
  for piece, pid in ids.items():
    assert pid != tk.INTERNLM2_SPECIAL_IDS[piece] and pid < tok.vocab_size
    ids_in_text = tok.encode(f"a{piece}b")
    assert ids_in_text == tok.encode("a") + [pid] + tok.encode("b")
  assert tok.encode("<s>hi</s>") == [tok.bos_id] + tok.encode("hi") + [tok.eos_id]
  assert tok.encode("hi", add_bos=True, add_eos=True) == [1] + tok.encode("hi") + [2]
  assert tok.stop_token_ids == [tok.eos_id, ids["<|im_end|>"]]


def test_decode_skip_special(tok):
  ids = tok.encode("<s><|im_start|>user\nhello<|im_end|>\n</s>")
  assert tok.decode(ids) == "<s><|im_start|>user\nhello<|im_end|>\n</s>"
  assert tok.decode(ids, skip_special_tokens=True) == "user\nhello\n"
  with pytest.raises(tk.TokenizerError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size + 5])


def test_plain_model_without_chat_pieces(plain_tok):
  assert plain_tok.decode(plain_tok.encode("Speak, speak.")) == "Speak, speak."
  assert plain_tok.special_ids == {} and plain_tok.stop_token_ids == [plain_tok.eos_id]
  with pytest.raises(tk.TokenizerError, match=r"no special piece '<\|im_start\|>'"):
    plain_tok.encode_chat([{"role": "user", "content": "hi"}])


def test_chat_system_user_generation_prompt(tok):
  messages = [{"role": "system", "content": "You are InternLM2-Chat."}, {"role": "user", "content": "Hello"}]
  expected = ("<s><|im_start|>system\nYou are InternLM2-Chat.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
              "<|im_start|>assistant\n")
  assert tok.apply_chat_template(messages) == expected
  assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected[:-len("<|im_start|>assistant\n")]
  ids = tok.encode_chat(messages)
  assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
  assert ids.count(tok.special_ids["<|im_start|>"]) == 3 and tok.decode(ids) == expected


WEATHER = {"name": "get_current_weather", "description": "Get the weather",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}


def test_chat_tools_turn_after_first_system(tok):
  messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "天气?"}]
  out = tok.apply_chat_template(messages, tools=[{"type": "function", "function": WEATHER}])
  schema = json.dumps([WEATHER], ensure_ascii=False)
  assert out == ("<s><|im_start|>system\nsys<|im_end|>\n"
                 f"<|im_start|>system name=<|plugin|>\n{schema}<|im_end|>\n"
                 "<|im_start|>user\n天气?<|im_end|>\n<|im_start|>assistant\n")
  # Bare function schemas work too, and with no system message the tools turn comes first.
  out = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[WEATHER])
  assert out.startswith(f"<s><|im_start|>system name=<|plugin|>\n{schema}<|im_end|>\n<|im_start|>user\nhi")


def test_chat_assistant_tool_call_and_environment(tok):
  messages = [
      {"role": "user", "content": "Weather in Shanghai?"},
      {"role": "assistant", "content": "Sure.", "tool_calls": [{"id": "c1", "type": "function", "function": {
          "name": "get_current_weather", "arguments": '{"location": "Shanghai"}'}}]},
      {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 22}'},
      {"role": "environment", "name": "plugin", "content": "{}"},
  ]
  assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
      "<s><|im_start|>user\nWeather in Shanghai?<|im_end|>\n"
      "<|im_start|>assistant\nSure.<|action_start|><|plugin|>\n"
      '{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}<|action_end|><|im_end|>\n'
      '<|im_start|>environment name=<|plugin|>\n{"temperature": 22}<|im_end|>\n'
      "<|im_start|>environment name=<|plugin|>\n{}<|im_end|>\n")
  # content None is allowed next to tool calls (OpenAI clients send it).
  assert "assistant\n<|action_start|>" in tok.apply_chat_template(
      [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}])


def test_chat_interpreter_call(tok):
  messages = [
      {"role": "system", "name": "interpreter", "content": "You can run Python."},
      {"role": "assistant", "content": "Let me compute.",
       "tool_calls": [{"type": "interpreter", "code": "print(1+1)"}]},
      {"role": "environment", "name": "interpreter", "content": "2"},
      {"role": "user", "name": "file", "content": '[{"path": "data.csv"}]'},
  ]
  assert tok.apply_chat_template(messages) == (
      "<s><|im_start|>system name=<|interpreter|>\nYou can run Python.<|im_end|>\n"
      "<|im_start|>assistant\nLet me compute.<|action_start|><|interpreter|>\n```python\nprint(1+1)\n```"
      "<|action_end|><|im_end|>\n"
      "<|im_start|>environment name=<|interpreter|>\n2<|im_end|>\n"
      '<|im_start|>user name=file\n[{"path": "data.csv"}]<|im_end|>\n'
      "<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user"}], r"messages\[0\] \('user'\) has no 'content'"),
    ([{"content": "x"}], "must be a dict with a 'role'"),
    ("hello", "must be a list"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
     "not valid JSON"),
])
def test_chat_errors(tok, messages, match):
  with pytest.raises(tk.ChatTemplateError, match=match):
    tok.apply_chat_template(messages)


def test_chat_bad_tool_schema(tok):
  with pytest.raises(tk.ChatTemplateError, match=r"tools\[0\]"):
    tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {}}])


def test_parse_plugin_call(tok):
  text = ('Sure, I will search.<|action_start|><|plugin|>\n{"name": "get_current_weather", '
          '"parameters": {"location": "Shanghai"}}<|action_end|><|im_end|>')
  assert tok.parse_assistant(text) == ("Sure, I will search.", [
      {"type": "plugin", "name": "get_current_weather", "arguments": {"location": "Shanghai"}}])
  # Cut off at the <|action_end|> stop word, and without <|im_end|>.
  content, calls = tk.parse_assistant('<|action_start|><|plugin|>\n{"name": "f", "parameters": {}}')
  assert content == "" and calls == [{"type": "plugin", "name": "f", "arguments": {}}]


def test_parse_interpreter_call():
  text = ("I will compute it.\n\n<|action_start|><|interpreter|>\n```python\nimport math\nprint(math.pi)\n```"
          "<|action_end|>\n<|im_end|>")
  assert tk.parse_assistant(text) == ("I will compute it.", [
      {"type": "interpreter", "code": "import math\nprint(math.pi)"}])


def test_parse_plain_and_malformed():
  assert tk.parse_assistant("Just an answer.<|im_end|>") == ("Just an answer.", [])
  content, calls = tk.parse_assistant('ok<|action_start|><|plugin|>\n{"name": "f", "parameters": {oops}<|action_end|>')
  assert content == "ok" and len(calls) == 1
  call = calls[0]
  assert call["type"] == "plugin" and call["arguments"] is None and call["name"] is None
  assert call["raw"] == '{"name": "f", "parameters": {oops}' and "invalid JSON" in call["error"]
  _, calls = tk.parse_assistant('<|action_start|><|plugin|>\n{"parameters": {}}<|action_end|>')
  assert "error" in calls[0]


def test_parse_round_trips_through_template(tok):
  content, calls = tk.parse_assistant(
      'A<|action_start|><|plugin|>\n{"name": "f", "parameters": {"x": 1}}<|action_end|><|im_end|>')
  rendered = tok.apply_chat_template([{"role": "assistant", "content": content, "tool_calls": calls}],
                                     add_generation_prompt=False)
  assert rendered == ('<s><|im_start|>assistant\nA<|action_start|><|plugin|>\n{"name": "f", "parameters": {"x": 1}}'
                      "<|action_end|><|im_end|>\n")


def test_missing_file_error(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(tk.TokenizerError) as e:
    tk.Tokenizer(missing)
  assert str(missing) in str(e.value) and "\n" not in str(e.value)


def test_not_a_sentencepiece_file_error(tmp_path):
  bad = tmp_path / "bad.model"
  bad.write_text("this is not a model")
  with pytest.raises(tk.TokenizerError) as e:
    tk.Tokenizer(bad)
  assert str(bad) in str(e.value) and "not a sentencepiece model" in str(e.value) and "\n" not in str(e.value)
  assert e.value.__cause__ is None and e.value.__suppress_context__


def test_hf_folder_with_added_tokens(tok, tmp_path):
  """An HF folder: `tokenizer.model` plus `tokenizer_config.json` renaming ids (as the real InternLM2 does)."""
  import shutil
  shutil.copy(tok.path, tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"added_tokens_decoder": {"300": {"content": "<|extra|>", "special": True}}}))
  hf = tk.Tokenizer(tmp_path)
  assert hf.encode("a<|extra|>b").count(300) == 1 and hf.decode([300]) == "<|extra|>"


def test_train_tokenizer_errors(tmp_path):
  with pytest.raises(tk.TokenizerError, match="does not exist"):
    tk.train_tokenizer(tmp_path / "t", 400, files=[tmp_path / "missing.txt"])
  with pytest.raises(tk.TokenizerError, match="vocab_size must be at least"):
    tk.train_tokenizer(tmp_path / "t", 100, texts=["abc"])
  # An empty corpus used to fail inside sentencepiece ("[!sentences_.empty()]"); a whitespace-only one quietly
  # trained a byte-only model.
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text("  \n\t\n")
  for name in ("empty.txt", "blank.txt"):
    with pytest.raises(tk.TokenizerError, match=f"no text to train the tokenizer on: .*{name}"):
      tk.train_tokenizer(tmp_path / "t", 400, files=[tmp_path / name])
    assert not (tmp_path / "t.model").exists()


def test_malformed_call_replays_verbatim(tok):
  text = 'ok<|action_start|><|plugin|>\n{"name": "f", oops}<|action_end|>'
  content, calls = tk.parse_assistant(text)
  rendered = tok.apply_chat_template([{"role": "assistant", "content": content, "tool_calls": calls}],
                                     add_generation_prompt=False)
  assert rendered == f"<s><|im_start|>assistant\n{text}<|im_end|>\n"


def test_error_index_is_the_callers_with_tools(tok):
  with pytest.raises(tk.ChatTemplateError, match=r"messages\[1\] has unknown role"):
    tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], tools=[WEATHER])


def test_train_tokenizer_script(tmp_path):
  """experiments/train_tokenizer.py (absl flags) trains from a folder and prints the special ids."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_text(CORPUS * 4)
  out = subprocess.run([sys.executable, os.path.join(root, "experiments", "train_tokenizer.py"),
                        f"--input={tmp_path / 'corpus'}", f"--output_prefix={tmp_path / 'tok'}", "--vocab_size=400"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=root))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "vocab 400, bos 1, eos 2" in out.stdout
  tok = tk.Tokenizer(tmp_path / "tok.model")
  assert tok.decode(tok.encode("Speak, speak.")) == "Speak, speak." and "<|im_end|>" in tok.special_ids
