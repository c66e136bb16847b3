"""Full SFT of the pretrained tiny model on the Shakespeare tasks: every weight trained with the pretraining step.

  python experiments/finetune.py --config=configs/sft_full_tiny.py --workdir=DIR --config.base.checkpoint=BASE
"""
from configs import sft_lora_tiny


def get_config():
  c = sft_lora_tiny.get_config()
  c.method = "full"
  c.optimizer.learning_rate = 3e-4   # all weights move: a smaller step than the adapters' (XTuner: 2e-5 at 7B)
  c.optimizer.weight_decay = 0.0
  c.output.adapter = False
  return c
