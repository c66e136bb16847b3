"""InternLM2-7B shapes for accelerators: bf16 compute, fsdp with tensor parallel 2 over kv groups, full remat."""
from configs import pretrain_internlm2_1_8b


def get_config():
  c = pretrain_internlm2_1_8b.get_config()
  c.model.preset = "internlm2-7b"
  c.model.remat_policy = "full"
  c.mesh.update(dict(data=1, fsdp=-1, tensor=2, sequence=1))
  c.batch_size = 32
  return c
