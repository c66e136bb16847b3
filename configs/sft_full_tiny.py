"""Full SFT of the pretrained tiny model on the Shakespeare tasks: every weight trained with the pretraining step.

  python experiments/finetune.py --config=configs/sft_full_tiny.py --workdir=DIR --config.base.checkpoint=BASE
"""
from configs import sft_lora_tiny


def get_config():
  c = sft_lora_tiny.get_config()
  c.method = "full"
  c.steps = 200                      # full fine-tuning learns the task faster than LoRA here
  c.optimizer.learning_rate = 1e-3
  c.output.adapter = False
  return c
