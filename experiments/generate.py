"""Builds a model (a preset with random weights, or an HF InternLM2 folder), shards it over the available devices
and greedily continues a prompt.

  python experiments/generate.py --preset=tiny --prompt_ids=1,5,9 --max_new_tokens=16
  python experiments/generate.py --hf_checkpoint=DIR --prompt="To be, or not to be"
"""
import os
import sys

# Eight simulated CPU devices unless the caller chose otherwise; must precede the JAX import.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from internlm_jax import get_preset, init_params, make_mesh  # noqa: E402
from internlm_jax.generate import generate  # noqa: E402
from internlm_jax.sharding import replicated_fraction  # noqa: E402

FLAGS = flags.DEFINE_string("preset", "small", "ModelConfig preset (random weights) when no checkpoint is given")
HF = flags.DEFINE_string("hf_checkpoint", None, "HF InternLM2 folder (config.json, *.safetensors, tokenizer.model)")
PROMPT = flags.DEFINE_string("prompt", None, "prompt text (needs a tokenizer.model in the checkpoint folder)")
PROMPT_IDS = flags.DEFINE_list("prompt_ids", ["1", "17", "42", "99"], "prompt token ids when there is no text")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "tokens to generate")
FSDP = flags.DEFINE_integer("fsdp", -1, "fsdp mesh size (-1: the devices left after tensor)")
TENSOR = flags.DEFINE_integer("tensor", 2, "tensor-parallel mesh size (must divide the kv heads)")


def main(argv):
  del argv
  try:
    _main()
  except (OSError, ValueError) as e:  # a missing checkpoint or tokenizer, an unknown preset, bad prompt ids
    sys.exit(f"error: {e}")


def _main():
  mesh = make_mesh(data=1, fsdp=FSDP.value, tensor=TENSOR.value)
  tokenizer = None
  if HF.value:
    from internlm_jax.hf_io import load_hf_checkpoint
    config, params = load_hf_checkpoint(HF.value, mesh=mesh)
    tok_path = os.path.join(HF.value, "tokenizer.model")
    if os.path.exists(tok_path):
      from internlm_jax.tokenizer import Tokenizer
      tokenizer = Tokenizer(tok_path)
  else:
    config = get_preset(FLAGS.value)
    params = init_params(config, jax.random.key(0), mesh=mesh)
  print(f"model: {config.num_params() / 1e6:.1f}M params on mesh {dict(mesh.shape)}; "
        f"{replicated_fraction(params, mesh):.1%} of parameter bytes replicated")
  if PROMPT.value is not None:
    if tokenizer is None:
      raise app.UsageError("--prompt needs a checkpoint folder with tokenizer.model; use --prompt_ids otherwise")
    prompt = tokenizer.encode(PROMPT.value, add_bos=True)
  else:
    prompt = [int(t) if t.strip().isdigit() else -1 for t in PROMPT_IDS.value]
    if not prompt or not all(0 <= t < config.vocab_size for t in prompt):
      # Out-of-range ids would be clamped by the embedding lookup and continue a different prompt.
      raise ValueError(f"--prompt_ids must be 1 or more ids in [0, {config.vocab_size}), got {PROMPT_IDS.value}")
  if MAX_NEW.value < 1:
    raise ValueError(f"--max_new_tokens must be at least 1, got {MAX_NEW.value}")
  with jax.set_mesh(mesh):
    new = generate(params, config, [prompt], MAX_NEW.value)[0]
  print("prompt ids:", prompt)
  print("continuation ids:", new)
  if tokenizer is not None:
    print("continuation:", tokenizer.decode(new))


if __name__ == "__main__":
  app.run(main)
