"""InternLM2-1.8B on a TPU v4-8 slice (4 chips / JAX devices, 32 GiB HBM each): fsdp 4, bf16."""
from configs import pretrain_internlm2_1_8b


def get_config():
  c = pretrain_internlm2_1_8b.get_config()
  c.mesh.update(dict(data=1, fsdp=4, tensor=1, sequence=1))
  c.model.attention_impl = "blockwise"
  c.batch_size = 32
  return c
