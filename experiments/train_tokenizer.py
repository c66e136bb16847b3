"""Trains an InternLM2-style sentencepiece tokenizer (BPE, byte fallback, the six chat pieces).

  python experiments/train_tokenizer.py --input=corpus/ --input=extra.txt --output_prefix=/tmp/tok --vocab_size=8000
  python experiments/train_tokenizer.py --shakespeare --vocab_size=4096   # the built-in corpus' train split

Writes `{output_prefix}.model` and `.vocab` and prints a short summary (vocabulary size, special ids, tokens per
character on a sample).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internlm_jax import tokenizer as tokenizer_lib  # noqa: E402

_INPUT = flags.DEFINE_multi_string("input", [], "Text files or folders (repeatable, or comma-separated).")
_OUTPUT_PREFIX = flags.DEFINE_string("output_prefix", None, "Writes {prefix}.model and {prefix}.vocab.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 32000, "Target vocabulary size (soft limit for tiny corpora).")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "InternLM2 is BPE with byte fallback.")
_MAX_SENTENCE_LENGTH = flags.DEFINE_integer("max_sentence_length", 16384, "Bytes per training sentence.")
_INPUT_SENTENCE_SIZE = flags.DEFINE_integer("input_sentence_size", 0, "Sample this many sentences (0 = all).")
_CHARACTER_COVERAGE = flags.DEFINE_float("character_coverage", 0.9999, "Rarer characters use byte fallback.")
_NUM_THREADS = flags.DEFINE_integer("num_threads", 1, "sentencepiece trainer threads.")
_SHAKESPEARE = flags.DEFINE_bool("shakespeare", False, "Train on the built-in Shakespeare train split (cached).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SHAKESPEARE.value:
    from internlm_jax.data import corpus  # noqa: PLC0415  (the data package is only needed here)
    path = corpus.shakespeare_tokenizer(_VOCAB_SIZE.value)
  else:
    inputs = [item for value in _INPUT.value for item in value.split(",") if item]
    if not inputs or not _OUTPUT_PREFIX.value:
      raise app.UsageError("pass --input=FILE_OR_DIR (one or more) and --output_prefix=PATH, or --shakespeare")
    try:
      path = tokenizer_lib.train_tokenizer(
          _OUTPUT_PREFIX.value, _VOCAB_SIZE.value, files=inputs, model_type=_MODEL_TYPE.value,
          max_sentence_length=_MAX_SENTENCE_LENGTH.value, input_sentence_size=_INPUT_SENTENCE_SIZE.value,
          character_coverage=_CHARACTER_COVERAGE.value, num_threads=_NUM_THREADS.value)
    except tokenizer_lib.TokenizerError as e:
      sys.exit(f"error: {e}")
  tok = tokenizer_lib.Tokenizer(path)
  sample = "Now is the winter of our discontent\nMade glorious summer by this sun of York."
  print(f"wrote {path}: vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, specials {tok.special_ids}")
  print(f"sample: {len(tok.encode(sample)) / len(sample):.3f} tokens per character")


if __name__ == "__main__":
  app.run(main)
