"""QLoRA SFT of the pretrained tiny model: the frozen base stored as NF4 (block 64), LoRA adapters trained.

  python experiments/finetune.py --config=configs/sft_qlora_tiny.py --workdir=DIR --config.base.checkpoint=BASE
  (--config.qlora.kind=int8 for an int8 base; --config.qlora.double_quant=False for float32 NF4 scales)
"""
from configs import sft_lora_tiny


def get_config():
  c = sft_lora_tiny.get_config()
  c.method = "qlora"
  # Only block inputs saved; the backward recomputes each block's attention and MLP halves apart (model.py).
  c.model.remat_policy = "full_split"
  c.qlora.double_quant = True  # int8 NF4 scales (QLoRA's double quantization, XTuner's default); ignored for int8
  return c
