"""Pretrain the `small` preset (about 5M parameters) on the built-in Shakespeare corpus; a few minutes on CPU."""
from ml_collections import config_dict


def get_config():
  c = config_dict.ConfigDict()
  c.steps = 200
  c.batch_size = 8            # global rows per step (split over the data and fsdp mesh axes, then grad_accum)
  c.seq_len = 256
  c.grad_accum = 1
  c.seed = 0
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 8
  c.checkpoint_every = 50
  c.keep_checkpoints = 2
  c.async_checkpoint = True
  c.halt_after_nonfinite = 3  # consecutive skipped updates before the run stops with an error
  c.peak_flops = 0.0          # FLOP/s per device for MFU; 0 = datasheet for known accelerators, else measured
  c.progress = True
  c.task_eval_config = ""     # an eval config file (e.g. configs/eval_tiny.py) run in-process during training
  c.task_eval_every = 0       # ... every this many steps; scores land in metrics.jsonl as eval/<dataset>/<metric>

  c.init_from = ""            # continue pretraining from an HF folder, params folder or workdir (its shape, weights
                              # and tokenizer) instead of a random init; a resumed run uses its own checkpoints

  c.mesh = config_dict.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))

  c.model = config_dict.ConfigDict()
  c.model.preset = "small"
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.model.scan_layers = True
  c.model.attention_impl = "xla"
  c.model.attention_block_size = 512  # query chunk of "chunked", kv block of "blockwise" attention
  c.model.loss_chunk_size = 0  # tokens per chunk of the fused output head + loss (0: the whole sequence)
  # Any other ModelConfig field, set in a config file (c.model.overrides.num_layers = 2): the command line can
  # only set keys a config already has.
  c.model.overrides = config_dict.ConfigDict()

  c.optimizer = config_dict.ConfigDict(dict(learning_rate=3e-3, min_lr_ratio=0.1, warmup_steps=20, b1=0.9, b2=0.95,
                                            eps=1e-8, weight_decay=0.1, grad_clip=1.0))

  c.data = config_dict.ConfigDict()
  c.data.corpus = "shakespeare"  # or "files": read data.train_paths / data.val_paths
  # train_paths / val_paths, without weights: ONE source, comma-separated files/folders of one format (text, jsonl,
  # array_record), or a single "tfds:NAME_OR_DIR". With weights: a mixture sampled by document, one component per
  # comma item, every item weighted, each its own format and field ([FORMAT:]PATH:WEIGHT[:FIELD]; weights are
  # normalised, 0 switches a component off; an empty FIELD is the format's default, e.g. raw ArrayRecord text):
  #   "web/:0.7,code.array_record:0.2:,tfds:/data/wiki:0.1"   (details: internlm_jax/data/mixture.py)
  c.data.train_paths = ""
  c.data.val_paths = ""          # same syntax; a mixture is evaluated on its weighted stream
  c.data.format = "auto"         # of every source/component without a FORMAT: prefix; auto = by file extension
  c.data.tfds_split = "train"    # the splits read from a "tfds:NAME_OR_DIR" path
  c.data.tfds_val_split = "validation"
  c.data.field = "text"          # the text column of jsonl/tfds records (and of ArrayRecord JSON records; "": raw)
  c.data.tokenizer = ""          # a sentencepiece .model; empty = train (and cache) one on Shakespeare
  c.data.vocab_size = 4096
  c.data.host_sharding = "documents"  # "rows": every host reads all data, losses independent of process count

  c.sample_prompt = "ROMEO:\n"
  c.sample_tokens = 48
  return c
