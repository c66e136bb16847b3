"""SFT data: only the right turns are trained (checked on rendered examples), tool turns, packing with per-sample
attention, truncation modes, bad records raise or are counted, preference pairs, batches."""
import json
import re

import numpy as np
import pytest

from internlm_jax import tokenizer as tk
from internlm_jax.data import sft

CORPUS = """First Citizen: Before we proceed any further, hear me speak.
All: Speak, speak. You are all resolved rather to die than to famish? Resolved. resolved.
What is the weather in Shanghai? It is 22 celsius and sunny. Which play is this line from? Coriolanus.
{"name": "get_weather", "parameters": {"city": "Shanghai"}} def f(x): return x * 2
"""


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "sft"
  return tk.Tokenizer(tk.train_tokenizer(prefix, 400, texts=[CORPUS * 8]))


def _trained_text(tok, sample):
  """Decoded trained tokens, one string per contiguous trained run."""
  runs, current = [], []
  for token, flag in zip(sample.ids, sample.trained):
    if flag:
      current.append(int(token))
    elif current:
      runs.append(tok.decode(current))
      current = []
  if current:
    runs.append(tok.decode(current))
  return runs


def test_alpaca_trains_only_the_answer(tok):
  messages, tools = sft.to_messages({"instruction": "Which play?", "input": "Speak, speak.", "output": "Coriolanus."})
  sample = sft.encode_messages(tok, messages, tools)
  assert tok.decode(sample.ids) == tk.render_chat(messages, add_generation_prompt=False)
  assert _trained_text(tok, sample) == ["Coriolanus.<|im_end|>"]
  assert messages[0] == {"role": "user", "content": "Which play?\nSpeak, speak."}
  # The prompt part is exactly what inference feeds the model before it generates the answer.
  prompt = tok.encode_chat(messages[:1])
  assert list(sample.ids[:len(prompt)]) == prompt and not sample.trained[:len(prompt)].any()


def test_openai_loss_flags(tok):
  record = {"messages": [
      {"role": "system", "content": "You are a scholar."},
      {"role": "user", "content": "Hear me speak."},
      {"role": "assistant", "content": "Speak, speak.", "loss": False},  # an assistant turn kept out of the loss
      {"role": "user", "content": "Resolved?", "loss": True},           # a user turn put into it
      {"role": "assistant", "content": "Resolved. resolved."},
  ]}
  messages, _ = sft.to_messages(record)
  sample = sft.encode_messages(tok, messages)
  assert _trained_text(tok, sample) == ["Resolved?<|im_end|>", "Resolved. resolved.<|im_end|>"]
  assert tok.decode(sample.ids) == tk.render_chat(record["messages"], add_generation_prompt=False)
  assert len(sample.turn_ends) == 6 and sample.turn_ends[-1] == len(sample.ids)


def test_tool_call_turns(tok):
  tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
  call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Shanghai"}'}}
  record = {"tools": tools, "messages": [
      {"role": "system", "content": "You are a helper."},
      {"role": "user", "content": "What is the weather in Shanghai?"},
      {"role": "assistant", "content": "", "tool_calls": [call]},
      {"role": "tool", "content": '{"celsius": 22}'},
      {"role": "assistant", "content": "It is 22 celsius and sunny."},
  ]}
  messages, tools_out = sft.to_messages(record)
  sample = sft.encode_messages(tok, messages, tools_out)
  text = tok.decode(sample.ids)
  assert text == tk.render_chat(record["messages"], tools=tools, add_generation_prompt=False)
  assert "<|im_start|>system name=<|plugin|>\n" in text and "<|im_start|>environment name=<|plugin|>\n" in text
  span = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Shanghai"}}<|action_end|>'
  assert _trained_text(tok, sample) == [span + "<|im_end|>", "It is 22 celsius and sunny.<|im_end|>"]
  assert tok.special_id(tk.ACTION_START) in sample.ids[sample.trained]


def test_environment_turns_are_masked_unless_flagged(tok):
  # The issue names environment turns as masked by default; the tool test covers only OpenAI's `tool` role.
  env = {"role": "environment", "content": "celsius 22"}
  messages = [{"role": "user", "content": "Weather?"}, env, {"role": "assistant", "content": "It is 22."}]
  sample = sft.encode_messages(tok, messages)
  assert _trained_text(tok, sample) == ["It is 22.<|im_end|>"]
  flagged = sft.encode_messages(tok, [messages[0], dict(env, loss=True), messages[2]])
  assert _trained_text(tok, flagged) == ["celsius 22<|im_end|>", "It is 22.<|im_end|>"]


def test_end_truncation_never_splits_a_special_token(tok):
  # Every special piece is one id, so any token-level cut keeps whole pieces: check every cut of a tool-call
  # sample decodes to a prefix of the full text and leaves no fragment of a piece at its end.
  tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
  call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Shanghai"}'}}
  messages = [{"role": "user", "content": "What is the weather in Shanghai?"},
              {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "content": '{"celsius": 22}'}, {"role": "assistant", "content": "It is 22."}]
  full = sft.encode_messages(tok, messages, tools)
  text = tok.decode(full.ids)
  specials = set(tok.special_ids.values()) | {tok.bos_id}
  assert sum(int(i) in specials for i in full.ids) >= 12
  for limit in range(2, len(full.ids)):
    cut = sft.truncate(full, limit, "end")
    if cut is None:
      continue
    assert len(cut.ids) == limit
    prefix = tok.decode(cut.ids)
    assert text.startswith(prefix) and not re.search(r"<\|?[a-z_]*\|?$", prefix), prefix[-20:]


def test_packed_rows_masks_and_segments(tok):
  records = [{"instruction": f"Which play? {i}", "output": "Coriolanus." * (1 + i % 3)} for i in range(7)]
  rows, summary = sft.build_sft_rows(records, tok, seq_len=96)
  assert summary.samples == summary.kept == 7 and not summary.skipped and summary.rows == len(rows["tokens"])
  assert summary.rows < 7  # several samples share a row
  seg, pos, mask = rows["segment_ids"], rows["positions"], rows["loss_mask"]
  assert summary.trained_tokens == int(mask.sum()) and summary.pad_tokens == int((seg == 0).sum())
  assert summary.tokens + summary.pad_tokens == rows["tokens"].size
  assert not mask[seg == 0].any()
  recovered = []
  for r in range(len(seg)):
    for s in range(1, seg[r].max() + 1):
      idx = np.flatnonzero(seg[r] == s)
      assert np.array_equal(pos[r, idx], np.arange(len(idx)))           # positions restart per sample
      assert np.array_equal(rows["targets"][r, idx[:-1]], rows["tokens"][r, idx[1:]])
      assert mask[r, idx[-1]] == 0                                      # no target past the sample's end
      recovered.append(tok.decode(rows["targets"][r, idx][mask[r, idx] == 1]))
  assert recovered == [r["output"] + "<|im_end|>" for r in records]
  assert "samples" in str(summary) and json.dumps(summary.as_dict())


def _long_record():
  return {"messages": [{"role": "user", "content": "Hear me speak."}, {"role": "assistant", "content": "Speak."},
                       {"role": "user", "content": "Before we proceed any further, hear me speak. " * 4},
                       {"role": "assistant", "content": "You are all resolved rather to die than to famish? " * 4}]}


def test_truncation_modes(tok):
  full = sft.encode_messages(tok, *sft.to_messages(_long_record()))
  limit = full.turn_ends[2] + 5  # the first exchange fits, the second does not
  assert len(full.ids) > limit
  rows, summary = sft.build_sft_rows([_long_record()], tok, seq_len=limit, truncation="turns")
  kept = rows["tokens"][0][rows["segment_ids"][0] > 0]
  assert tok.decode(kept).endswith("Speak.<|im_end|>\n") and len(kept) == full.turn_ends[2]
  assert summary.truncated == 1
  rows, summary = sft.build_sft_rows([_long_record()], tok, seq_len=limit, truncation="end")
  assert np.array_equal(rows["tokens"][0], full.ids[:limit]) and summary.truncated == 1
  rows, summary = sft.build_sft_rows([_long_record()] * 2, tok, seq_len=limit, truncation="skip")
  assert summary.skipped == {"too_long": 2} and summary.kept == 0 and len(rows["tokens"]) == 0
  with pytest.raises(sft.SFTDataError, match="record 0: .* exceed the limit"):
    sft.build_sft_rows([_long_record()], tok, seq_len=limit, truncation="error")
  # Cutting whole turns that leaves nothing to train is a counted skip, not an empty sample.
  _, summary = sft.build_sft_rows([_long_record()], tok, seq_len=full.turn_ends[2] - 1, truncation="turns")
  assert summary.skipped == {"too_long": 1}


@pytest.mark.parametrize("record, message", [
    ({"instruction": "x"}, "missing field 'output'"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
    ({"messages": [{"role": "assistant", "content": "y", "loss": "yes"}]}, "loss must be true or false"),
    ({"messages": [{"content": "no role"}]}, "'role'"),
    ({"text": "plain"}, "unknown record format"),
    ({"conversation": [{"input": "x"}]}, "missing field 'output'"),
])
def test_bad_records_raise_or_are_counted(tok, record, message):
  with pytest.raises(sft.SFTDataError, match=message):
    sft.build_sft_rows([record], tok, seq_len=64)
  good = {"instruction": "Which play?", "output": "Coriolanus."}
  rows, summary = sft.build_sft_rows([good, record, good], tok, seq_len=64, on_error="skip")
  assert (summary.samples, summary.kept, summary.skipped) == (3, 2, {"invalid": 1})
  assert summary.errors[0].startswith("record 1: ") and re.search(message, summary.errors[0])


def test_bad_files_are_one_line_errors(tmp_path):
  good = json.dumps({"instruction": "Which play?", "output": "Coriolanus."})
  cases = {"latin1.jsonl": (good + "\n" + good + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n',
           "cut.json": b'[' + good.encode() + b',',
           "lines.json": (good + "\n" + good + "\n").encode()}
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
  # These used to escape as UnicodeDecodeError / JSONDecodeError / IsADirectoryError tracebacks.
  for name, message in (("latin1.jsonl", r"latin1.jsonl:3: not UTF-8 text"),
                        ("cut.json", r"cut.json:1: not valid JSON"),
                        ("lines.json", r"lines.json:2: not valid JSON \(Extra data\); JSON-lines files must be named"),
                        ("", r"is a folder")):
    with pytest.raises(sft.SFTDataError, match=message):
      sft.load_records(tmp_path / name)


def test_no_trained_tokens_is_counted(tok):
  record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": False}]}
  _, summary = sft.build_sft_rows([record], tok, seq_len=64)
  assert summary.skipped == {"no_trained_tokens": 1}


def test_preference_rows(tok):
  records = [{"prompt": "Which play?", "chosen": "Coriolanus.", "rejected": "Hamlet, surely.", "system": "Be brief."},
             {"prompt": [{"role": "user", "content": "Hear me."}, {"role": "assistant", "content": "Speak."},
                         {"role": "user", "content": "Resolved?"}],
              "chosen": [{"role": "assistant", "content": "Resolved."}], "rejected": "No."},
             {"prompt": "x", "chosen": "y"}]
  with pytest.raises(sft.SFTDataError, match="record 2: missing field 'rejected'"):
    sft.build_dpo_rows(records, tok, seq_len=64)
  pairs, summary = sft.build_dpo_rows(records, tok, seq_len=64, on_error="skip")
  assert summary.kept == 2 and summary.skipped == {"invalid": 1}
  chosen, rejected = pairs["chosen"], pairs["rejected"]
  trained = lambda rows, p: tok.decode(rows["targets"][p][rows["loss_mask"][p] == 1])
  assert [trained(chosen, p) for p in range(2)] == ["Coriolanus.<|im_end|>", "Resolved.<|im_end|>"]
  assert [trained(rejected, p) for p in range(2)] == ["Hamlet, surely.<|im_end|>", "No.<|im_end|>"]
  for p in range(2):  # both sides of a pair share the prompt token for token
    n = np.flatnonzero(chosen["loss_mask"][p])[0]
    assert np.array_equal(chosen["tokens"][p, :n + 1], rejected["tokens"][p, :n + 1])


def test_batches_pad_and_resume(tok):
  records = [{"instruction": f"Which play? {i}", "output": "Coriolanus."} for i in range(5)]
  rows, _ = sft.build_sft_rows(records, tok, seq_len=32)
  ds = sft.make_batches(rows, batch_size=2, pad_id=tok.pad_id, seed=3, num_epochs=1)
  batches = list(ds)
  assert [b["tokens"].shape for b in batches] == [(2, 32)] * 3
  assert not batches[-1]["segment_ids"][1].any()  # the padding row
  it = iter(ds)
  next(it)
  state = it.get_state()
  rest = [next(it)["tokens"] for _ in range(2)]
  it2 = iter(ds)
  it2.set_state(state)
  assert all(np.array_equal(a, next(it2)["tokens"]) for a in rest)
  pairs, _ = sft.build_dpo_rows([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3, tok, seq_len=24)
  batch = next(iter(sft.make_batches(pairs, batch_size=2, pad_id=tok.pad_id)))
  assert batch["chosen"]["tokens"].shape == batch["rejected"]["loss_mask"].shape == (2, 24)
