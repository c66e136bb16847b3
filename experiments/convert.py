r"""Converts weights between an HF InternLM2 folder and a params checkpoint folder (orbax + model_config.json).

  python experiments/convert.py --from_hf=HF_DIR --to=CKPT_DIR [--dtype=bfloat16]
  python experiments/convert.py --from_ckpt=CKPT_DIR --to_hf=HF_DIR [--dtype=bfloat16] [--max_shard_bytes=N]
  python experiments/convert.py --from_ckpt=CKPT_DIR --to_gguf=model.gguf [--gguf_type=f16|f32|q8_0]
      (or --from_hf=HF_DIR: a llama.cpp / ollama file of the `llama` architecture)

Weights are placed FSDP-sharded over all local devices on the way through, so a checkpoint larger than one
device's memory converts as long as it fits in all of them together; the host never holds a whole checkpoint.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from internlm_jax.params_io import convert  # noqa: E402

_FROM_HF = flags.DEFINE_string("from_hf", None, "HF InternLM2 folder to read (with --to).")
_TO = flags.DEFINE_string("to", None, "Params checkpoint folder to write (with --from_hf).")
_FROM_CKPT = flags.DEFINE_string("from_ckpt", None, "Params checkpoint folder or training workdir (newest checkpoint) to read (with --to_hf).")
_TO_HF = flags.DEFINE_string("to_hf", None, "HF InternLM2 folder to write (with --from_ckpt).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Cast the weights to this dtype; default keeps the source's.")
_TO_GGUF = flags.DEFINE_string("to_gguf", None, "GGUF file to write for llama.cpp / ollama (with --from_ckpt or "
                               "--from_hf).")
_GGUF_TYPE = flags.DEFINE_enum("gguf_type", "f16", ["f32", "f16", "q8_0"], "Tensor type of --to_gguf (norms stay f32).")
_MAX_SHARD_BYTES = flags.DEFINE_integer("max_shard_bytes", 2**31, "Largest safetensors file written by --to_hf.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    convert(from_hf=_FROM_HF.value, to=_TO.value, from_ckpt=_FROM_CKPT.value, to_hf=_TO_HF.value,
            dtype=_DTYPE.value, max_shard_bytes=_MAX_SHARD_BYTES.value, to_gguf=_TO_GGUF.value,
            gguf_type=_GGUF_TYPE.value)
  except ValueError as e:  # ConfigError, CheckpointError and bad flag combinations: one line, no traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
