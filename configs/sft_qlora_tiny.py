"""QLoRA SFT of the pretrained tiny model: the frozen base stored as NF4 (block 64), LoRA adapters trained.

  python experiments/finetune.py --config=configs/sft_qlora_tiny.py --workdir=DIR --config.base.checkpoint=BASE
  (--config.qlora.kind=int8 for an int8 base)
"""
from configs import sft_lora_tiny


def get_config():
  c = sft_lora_tiny.get_config()
  c.method = "qlora"
  c.model.remat_policy = "full"  # keeps the per-layer dequantized + merged weights out of saved activations
  return c
