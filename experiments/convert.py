r"""Converts weights between an HF InternLM2 folder and a params checkpoint folder (orbax + model_config.json).

  python experiments/convert.py --from_hf=HF_DIR --to=CKPT_DIR [--dtype=bfloat16]
  python experiments/convert.py --from_ckpt=CKPT_DIR --to_hf=HF_DIR [--dtype=bfloat16] [--max_shard_bytes=N]

Weights are placed FSDP-sharded over all local devices on the way through, so a checkpoint larger than one
device's memory converts as long as it fits in all of them together; the host never holds a whole checkpoint.
"""
from __future__ import annotations

import os
import shutil
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402

from internlm_jax.hf_io import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from internlm_jax.params_io import load_params_checkpoint, save_params_checkpoint  # noqa: E402
from internlm_jax.sharding import make_mesh  # noqa: E402

_FROM_HF = flags.DEFINE_string("from_hf", None, "HF InternLM2 folder to read (with --to).")
_TO = flags.DEFINE_string("to", None, "Params checkpoint folder to write (with --from_hf).")
_FROM_CKPT = flags.DEFINE_string("from_ckpt", None, "Params checkpoint folder or training workdir (newest checkpoint) to read (with --to_hf).")
_TO_HF = flags.DEFINE_string("to_hf", None, "HF InternLM2 folder to write (with --from_ckpt).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Cast the weights to this dtype; default keeps the source's.")
_MAX_SHARD_BYTES = flags.DEFINE_integer("max_shard_bytes", 2**31, "Largest safetensors file written by --to_hf.")


def convert(*, from_hf: str | None = None, to: str | None = None, from_ckpt: str | None = None,
            to_hf: str | None = None, dtype: str | None = None, max_shard_bytes: int = 2**31, mesh=None) -> None:
  """HF -> params checkpoint (from_hf + to) or params checkpoint -> HF (from_ckpt + to_hf)."""
  to_ckpt = bool(from_hf and to) and not (from_ckpt or to_hf)
  to_hf_dir = bool(from_ckpt and to_hf) and not (from_hf or to)
  if not (to_ckpt or to_hf_dir):
    raise ValueError("give exactly one direction: --from_hf=DIR --to=DIR, or --from_ckpt=DIR --to_hf=DIR")
  mesh = mesh if mesh is not None else make_mesh(fsdp=-1)
  if to_ckpt:
    config, params = load_hf_checkpoint(from_hf, mesh=mesh, dtype=dtype)
    save_params_checkpoint(to, config, params)
    _copy_tokenizer(from_hf, to)
    logging.info("wrote params checkpoint %s (%d params, %s)", to, config.num_params(), config.param_dtype)
  else:
    config, params = load_params_checkpoint(from_ckpt, mesh=mesh)
    save_hf_checkpoint(to_hf, config, params, max_shard_bytes=max_shard_bytes, dtype=dtype)
    _copy_tokenizer(from_ckpt, to_hf)
    logging.info("wrote HF folder %s (%d params)", to_hf, config.num_params())


def _copy_tokenizer(src: str, dst: str) -> None:
  """Carries tokenizer.model along so the converted folder serves and evaluates on its own."""
  path = os.path.join(src, "tokenizer.model")
  if os.path.isfile(path) and jax.process_index() == 0:
    shutil.copyfile(path, os.path.join(dst, "tokenizer.model"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  convert(from_hf=_FROM_HF.value, to=_TO.value, from_ckpt=_FROM_CKPT.value, to_hf=_TO_HF.value,
          dtype=_DTYPE.value, max_shard_bytes=_MAX_SHARD_BYTES.value)


if __name__ == "__main__":
  app.run(main)
