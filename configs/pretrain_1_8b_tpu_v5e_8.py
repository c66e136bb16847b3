"""InternLM2-1.8B on a TPU v5e-8 slice (8 chips, 16 GiB HBM each): fsdp over all 8 chips, bf16, save-dots remat."""
from configs import pretrain_internlm2_1_8b


def get_config():
  c = pretrain_internlm2_1_8b.get_config()
  c.mesh.update(dict(data=1, fsdp=8, tensor=1, sequence=1))
  c.model.attention_impl = "blockwise"  # the Pallas kernel targets GPUs (Triton); blockwise is memory-safe on TPU
  c.batch_size = 32
  c.seq_len = 4096
  return c
