r"""Terminal chat with an InternLM2 checkpoint: streaming output, history, /reset, /exit.

  python experiments/chat.py --checkpoint=HF_OR_PARAMS_DIR [--system="..."] [--temperature=0.8 --top_p=0.8]
  python experiments/chat.py --checkpoint=BASE_DIR --adapter=WORKDIR/adapter      # a LoRA fine-tune, merged at start

Runs the serving engine in-process (same scheduler as experiments/serve.py). Ctrl-C stops the current answer;
Ctrl-D or /exit quits; /reset clears the history.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF InternLM2 folder, params checkpoint folder or training "
                                  "workdir (its newest checkpoint).")
_PRESET = flags.DEFINE_string("preset", None, "Chat with random weights of this preset (no --checkpoint).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "sentencepiece model; default CHECKPOINT/tokenizer.model.")
_ADAPTER = flags.DEFINE_string("adapter", None, "PEFT LoRA adapter folder (experiments/finetune.py's WORKDIR/adapter) "
                               "merged into the base at start-up, before --dtype and --quant.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Cast weights and compute.")
_QUANT = flags.DEFINE_enum("quant", None, ["int8", "int4"], "Quantize matmul weights (int8 per channel, int4 "
                           "group-wise).")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Tensor-parallel degree (over kv heads).")
_SYSTEM = flags.DEFINE_string("system", "", "System prompt (empty: none).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 1024, "Longest answer.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 8192, "Context for the whole conversation.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 for greedy (HF InternLM2 chat uses 0.8).")
_TOP_P = flags.DEFINE_float("top_p", 0.8, "Nucleus sampling.")
_REPETITION = flags.DEFINE_float("repetition_penalty", 1.0, "1.02 curbs repetition loops.")
_PRESENCE = flags.DEFINE_float("presence_penalty", 0.0, "OpenAI's: subtracted from every token already in the answer.")
_FREQUENCY = flags.DEFINE_float("frequency_penalty", 0.0, "OpenAI's: subtracted per earlier use in the answer.")
_SEED = flags.DEFINE_integer("seed", None, "Fixed sampling seed (reproducible answers).")


def chat_loop(scheduler, tokenizer, sampling, system: str, read: Callable[[str], str],
              write: Callable[[str], None]) -> list[dict]:
  """Reads user turns until /exit or EOF, streams each answer; returns the history (for tests)."""
  from internlm_jax.serve.scheduler import Delta, Finished
  from internlm_jax.serve.sampling import SamplingError
  from internlm_jax.serve.kv_cache import RequestTooLargeError

  history: list[dict] = []
  while True:
    try:
      line = read("\nuser> ")
    except EOFError:
      write("\n")
      return history
    # Undecodable input bytes arrive as lone surrogates (surrogateescape), which the tokenizer cannot encode.
    line = line.encode("utf-8", "replace").decode("utf-8")
    command = line.strip()
    if command in ("/exit", "/quit"):
      return history
    if command == "/reset":
      history = []
      write("(history cleared)\n")
      continue
    if not command:
      continue
    turn = history + [{"role": "user", "content": line}]
    messages = ([{"role": "system", "content": system}] if system else []) + turn
    prompt = tokenizer.encode_chat(messages)
    room = scheduler.engine.max_request_tokens - len(prompt)
    if room <= 0:
      write("(the conversation is longer than the context; /reset to start over)\n")
      continue
    try:
      handle = scheduler.submit(prompt,
                                dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, room)))
    except (RequestTooLargeError, SamplingError) as e:
      write(f"(error: {e})\n")
      continue
    write("assistant> ")
    answer = None
    try:
      for event in handle.events():
        if isinstance(event, Delta):
          write(event.text)
        elif isinstance(event, Finished):
          answer = event
    except KeyboardInterrupt:
      handle.cancel()
      answer = handle.result(timeout=60)
      write(" [stopped]")
    write("\n")
    if answer is not None and answer.reason == "error":
      write(f"(error: {answer.error})\n")
      continue
    history = turn + [{"role": "assistant", "content": answer.text if answer else ""}]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from internlm_jax.serve import loading
  from internlm_jax.serve.engine import EngineConfig
  from internlm_jax.serve.sampling import SamplingParams
  from internlm_jax.serve.scheduler import Scheduler

  if not _CHECKPOINT.value and not _PRESET.value:
    sys.exit("error: pass --checkpoint=DIR (HF InternLM2 folder or params checkpoint) or --preset=NAME")
  if _CHECKPOINT.value and not os.path.isdir(_CHECKPOINT.value):
    sys.exit(f"error: --checkpoint={_CHECKPOINT.value} is not a folder (an HF InternLM2 folder, a params "
             "checkpoint or a training workdir)")
  try:
    tokenizer = loading.find_tokenizer(_CHECKPOINT.value, _TOKENIZER.value)
    mesh = loading.serving_mesh(_TENSOR.value)
    config, params = loading.load_model(_CHECKPOINT.value, preset=_PRESET.value, mesh=mesh,
                                        dtype=_DTYPE.value, quant=_QUANT.value, adapter=_ADAPTER.value)
  except (OSError, ValueError) as e:  # a missing folder, tokenizer or preset; a malformed checkpoint
    sys.exit(f"error: {e}")
  if hasattr(sys.stdin, "reconfigure"):  # a non-UTF-8 line must not end the chat (strict locales raise)
    sys.stdin.reconfigure(errors="replace")
  ec = EngineConfig(max_slots=1, max_seq_len=min(_MAX_SEQ_LEN.value, config.max_position_embeddings),
                    sample_vocab=min(tokenizer.vocab_size, config.vocab_size))
  engine = loading.build_engine(config, params, ec, mesh=mesh, tensor=_TENSOR.value)
  scheduler = Scheduler(engine, tokenizer, max_queue=1).start()
  sampling = SamplingParams(max_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                            repetition_penalty=_REPETITION.value, presence_penalty=_PRESENCE.value,
                            frequency_penalty=_FREQUENCY.value, seed=_SEED.value)
  try:  # a bad flag is one line now, not an error on every turn
    sampling.validate(ec.sample_vocab)
  except ValueError as e:
    scheduler.stop()
    sys.exit(f"error: {e}")

  def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()

  write("InternLM2 chat. /reset clears the history, /exit quits.\n")
  try:
    chat_loop(scheduler, tokenizer, sampling, _SYSTEM.value, input, write)
  finally:
    scheduler.stop()


if __name__ == "__main__":
  app.run(main)
