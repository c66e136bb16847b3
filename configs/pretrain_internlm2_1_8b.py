"""InternLM2-1.8B shapes for accelerators (e.g. 8 GPUs or a TPU v5e-8): bf16 compute, fsdp × tensor, remat."""
from configs import pretrain_tiny


def get_config():
  c = pretrain_tiny.get_config()
  c.model.preset = "internlm2-1.8b"
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "save_dots"
  c.model.attention_impl = "cudnn"  # cuDNN's fused attention on GPUs; elsewhere jax's XLA version
  c.seq_len = 4096
  c.model.loss_chunk_size = 1024  # the 92544-word logits a quarter sequence at a time (1.5 GB -> 0.4 GB a row)
  c.batch_size = 64
  c.steps = 10000
  c.log_every = 10
  c.eval_every = 500
  c.checkpoint_every = 500
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1, sequence=1))
  c.optimizer.update(dict(learning_rate=3e-4, warmup_steps=200, weight_decay=0.1))
  c.data.vocab_size = 92544
  c.sample_prompt = "The capital of France is"
  return c
