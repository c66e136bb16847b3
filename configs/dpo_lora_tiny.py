"""DPO with LoRA adapters on the pretrained tiny model: Shakespeare task pairs (gold answer chosen, a wrong option
rejected), sigmoid loss with beta, the base (adapter off) as the reference model. Other losses:
--config.dpo.loss_type=ipo|hinge|robust|sppo_hard|nca_pair|kto_pair (with the reference), or orpo (ORPO: no
reference model, beta weighs the odds-ratio term against the chosen response's NLL).

  python experiments/finetune.py --config=configs/dpo_lora_tiny.py --workdir=DIR --config.base.checkpoint=BASE
  (files: --config.data.source=files --config.data.train_paths=pairs.jsonl with {"prompt", "chosen", "rejected"})

Held-out pairs (the built-in tasks' held-out questions, or --config.data.eval_paths=dev_pairs.jsonl in the training
format) are evaluated before training, every eval_every steps and at the end: DPO loss, reward accuracy, rewards
and margin over every pair (eval_batches limits only SFT's evaluation), logged as eval_* in metrics.jsonl.
"""
from configs import sft_lora_tiny


def get_config():
  c = sft_lora_tiny.get_config()
  c.method = "dpo"
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.data.truncation = "skip"   # a pair is one sequence per side; too-long pairs are counted and skipped
  c.optimizer.learning_rate = 1e-3
  c.lora.loraplus_ratio = 1.0  # plain LoRA: the SFT demo's LoRA+ ratio was not tuned for DPO
  return c
