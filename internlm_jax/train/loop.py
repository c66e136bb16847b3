"""The pretraining loop: validate the config, build mesh/data/state, resume, train, evaluate, checkpoint, report.

`run(cfg, workdir)` is what `experiments/train.py` calls; rerunning it with the same workdir resumes from the
newest good checkpoint and continues bit-exactly (params, optimizer, RNG and data iterator state are restored).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import os
import time

import jax
import numpy as np
from absl import logging

from internlm_jax import checkpoint as checkpoint_lib
from internlm_jax.config import ConfigError, ModelConfig, get_preset
from internlm_jax.data import mixture, pipeline
from internlm_jax.generate import generate
from internlm_jax.model import param_shardings
from internlm_jax.sharding import DEFAULT_RULES, make_mesh
from internlm_jax.tokenizer import Tokenizer
from internlm_jax.train import metrics as metrics_lib
from internlm_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from internlm_jax.train.state import create_train_state, train_state_shardings
from internlm_jax.train.step import cross_entropy_sums, make_train_step


class TrainingHalted(RuntimeError):
  """Training stopped on purpose (non-finite losses); the message says why and what to change."""


def model_config_from(cfg, vocab_size: int) -> ModelConfig:
  overrides = dict(cfg.model.get("overrides", {}) or {})
  model = get_preset(cfg.model.preset).replace(
      vocab_size=vocab_size, dtype=cfg.model.dtype, remat_policy=cfg.model.remat_policy,
      scan_layers=cfg.model.scan_layers, attention_impl=cfg.model.attention_impl, **_optional_model_keys(cfg),
      **overrides)
  return model


def _optional_model_keys(cfg) -> dict:
  """ModelConfig fields a config may set directly under config.model (older configs may lack them)."""
  return {k: cfg.model[k] for k in ("attention_block_size", "loss_chunk_size") if k in cfg.model}


def validate(cfg) -> None:
  """Fails fast, before any compiling, with one line that names the setting."""
  for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
    if int(cfg[key]) <= 0:
      raise ConfigError(f"config.{key} must be positive, got {cfg[key]}")
  get_preset(cfg.model.preset)
  mesh = dict(cfg.mesh)
  sizes = [mesh.get(a, 1) for a in ("data", "fsdp", "tensor", "sequence")]
  known = math.prod(s for s in sizes if s != -1)
  devices = jax.device_count()
  batch_ways = None
  if sizes.count(-1) <= 1 and devices % known == 0:
    filled = [devices // known if s == -1 else s for s in sizes]
    batch_ways = filled[0] * filled[1]
  if batch_ways and cfg.batch_size % (batch_ways * cfg.grad_accum):
    raise ConfigError(f"config.batch_size={cfg.batch_size} must be divisible by data*fsdp={batch_ways} times "
                      f"grad_accum={cfg.grad_accum}")
  if cfg.batch_size % jax.process_count():
    raise ConfigError(f"config.batch_size={cfg.batch_size} must divide by the {jax.process_count()} processes")
  max_pos = get_preset(cfg.model.preset).max_position_embeddings
  max_pos = int((cfg.model.get("overrides", {}) or {}).get("max_position_embeddings", max_pos))
  if cfg.seq_len > max_pos:
    raise ConfigError(f"config.seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={max_pos}")
  loss_chunk = int(cfg.model.get("loss_chunk_size", 0) or 0)
  if loss_chunk < 0 or (loss_chunk and cfg.seq_len % loss_chunk):
    raise ConfigError(f"config.model.loss_chunk_size={loss_chunk} must divide config.seq_len="
                      f"{cfg.seq_len} (or be 0: the whole sequence at once)")
  if cfg.data.corpus not in ("shakespeare", "files"):
    raise ConfigError(f"config.data.corpus must be 'shakespeare' or 'files', got {cfg.data.corpus!r}")
  if cfg.data.corpus == "files" and not cfg.data.train_paths:
    raise ConfigError("config.data.corpus='files' needs config.data.train_paths (comma-separated files/folders)")


def make_workdir(workdir: str) -> None:
  """Creates the run folder; one line naming the path instead of an OSError traceback when it cannot be used."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir!r} is a file, not a folder; pass a new or existing run folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir!r} cannot be created ({e.strerror}); pass a writable folder") from None
  if not os.access(workdir, os.W_OK):
    raise ConfigError(f"--workdir={workdir!r} is not writable; pass a writable folder")


def _split_paths(value: str) -> list[str]:
  return [p for p in str(value).split(",") if p]


def _load_init(cfg, path: str, mesh):
  """(config, params on the mesh, tokenizer path or None) of `config.init_from`: an HF InternLM2 folder, a params
  folder or a pretraining workdir (finetune.base.load_base tells them apart)."""
  from internlm_jax.finetune.base import load_base  # noqa: PLC0415  (finetune builds on train, not the reverse)
  if not os.path.exists(path):
    raise ConfigError(f"config.init_from={path!r} does not exist; name an HF folder, params folder or workdir")
  return load_base(path, mesh=mesh, preset=cfg.model.preset, overrides=dict(cfg.model.get("overrides", {}) or {}))


def _open_corpus(key: str, spec, cfg, tfds_split: str):
  corpus = mixture.open_spec(spec, format=cfg.data.format, field=cfg.data.field, tfds_split=tfds_split)
  if isinstance(corpus, mixture.Mixture):
    logging.info("config.data.%s: %s", key, corpus.describe())
  return corpus


def build_data(cfg):
  """(tokenizer, train source, validation source or None)."""
  if cfg.data.corpus == "shakespeare":
    from internlm_jax.data import corpus
    tok_path = cfg.data.tokenizer or corpus.shakespeare_tokenizer(cfg.data.vocab_size)
    train, val = corpus.shakespeare_source("train"), corpus.shakespeare_source("validation")
  else:
    tok_path = cfg.data.tokenizer
    if not tok_path:
      raise ConfigError("config.data.tokenizer must name a sentencepiece model when corpus='files'")
    # A "tfds:" path names a whole dataset, so the split comes from the config (older configs lack the keys).
    # Either key may be a weighted mixture (data/mixture.py); without weights each is one source as before.
    train = _open_corpus("train_paths", cfg.data.train_paths, cfg, cfg.data.get("tfds_split", "train"))
    val_paths = _split_paths(cfg.data.val_paths)
    val = _open_corpus("val_paths", val_paths, cfg, cfg.data.get("tfds_val_split", "validation")) if val_paths else None
  return Tokenizer(tok_path), train, val


def _global_batch(local: dict, sharding) -> dict:
  """Global arrays from this host's rows (each host read its own documents)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def _global_from_full(full: dict, sharding) -> dict:
  """Global arrays when every host holds the whole global batch: each device takes its own rows."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: np.asarray(v[idx]))
          for k, v in full.items()}


def _host_reader(cfg):
  """(rows per host, shard_index, shard_count, to_global) for config.data.host_sharding.

  "documents" (default, scales): each host tokenizes only its share of the documents.
  "rows": every host reads the whole stream and keeps its rows, so the global batch (and the losses) do not
  depend on the number of processes; costs each host the full tokenization.
  """
  mode = cfg.data.get("host_sharding", "documents")
  if mode == "documents":
    return cfg.batch_size // jax.process_count(), None, None, _global_batch
  if mode == "rows":
    return cfg.batch_size, 0, 1, _global_from_full
  raise ConfigError(f"config.data.host_sharding must be 'documents' or 'rows', got {mode!r}")


def evaluate(eval_fn, params, val_source, tokenizer, cfg, sharding) -> float:
  """Mean next-token loss over the first `eval_batches` batches of the validation set (same batches each time).

  Every host reads the same validation rows and keeps its own, so the number is the same on any topology.
  """
  ds = pipeline.make_pretrain_dataset(val_source, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                      seed=0, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
  loss_sum = count = 0.0
  for i, full in enumerate(ds):
    if i >= cfg.eval_batches:
      break
    s, c = eval_fn(params, _global_from_full(full, sharding))
    loss_sum, count = loss_sum + float(s), count + float(c)
  return loss_sum / max(count, 1.0)


def _baseline_docs(source, max_docs: int):
  """Up to `max_docs` documents of a source; of a mixture, each component's first documents in proportion to its
  weight (its plain concatenation would give the first component's documents only)."""
  if not isinstance(source, mixture.Mixture):
    return [source[i] for i in range(min(len(source), max_docs))]
  return [c.source[i] for c in source.components
          for i in range(min(len(c.source), max(1, round(max_docs * c.weight))))]


def unigram_baseline(train_source, val_source, tokenizer, max_docs: int = 2000) -> float:
  """Validation loss of a unigram model fit on train tokens (add-one smoothed): the bar a model must clear."""
  counts = np.ones(tokenizer.vocab_size, np.float64)
  for text in _baseline_docs(train_source, max_docs):
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    np.add.at(counts, ids[1:], 1)
  logp = np.log(counts / counts.sum())
  total = n = 0.0
  for text in _baseline_docs(val_source, max_docs):
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)[1:]
    total -= logp[ids].sum()
    n += len(ids)
  return total / max(n, 1.0)


def _in_training_eval(cfg, tokenizer):
  """The evaluation hook named by config.task_eval_config (an eval config file), or None."""
  path = cfg.get("task_eval_config", "")
  if not path:
    return None
  if int(cfg.get("task_eval_every", 0)) <= 0:
    raise ConfigError("config.task_eval_config needs config.task_eval_every > 0")
  if not os.path.isfile(path):
    raise ConfigError(f"config.task_eval_config={path!r}: no such eval config file")
  import importlib.util
  spec = importlib.util.spec_from_file_location("task_eval_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from internlm_jax.eval.runner import train_eval_hook
  return train_eval_hook(module.get_config(), tokenizer)


def run(cfg, workdir: str, on_log=None) -> dict:
  """Trains (or resumes) per `cfg`; returns a summary dict (final losses, steps, throughput).

  on_log(step, record): called on process 0 with every metrics record (e.g. a notebook's live loss plot).
  """
  validate(cfg)
  make_workdir(workdir)
  mesh = make_mesh(**dict(cfg.mesh))
  init_from = str(cfg.get("init_from", "") or "")
  base_params = None
  if init_from:  # continued pretraining: the shape, weights and (unless data.tokenizer says) tokenizer of a base
    base_config, base_params, base_tok = _load_init(cfg, init_from, mesh)
    if base_tok and not cfg.data.tokenizer:
      cfg = copy.deepcopy(cfg)
      cfg.data.tokenizer = base_tok
  tokenizer, train_source, val_source = build_data(cfg)
  model = model_config_from(cfg, tokenizer.vocab_size)
  if init_from:
    model = base_config.replace(param_dtype=model.param_dtype, dtype=model.dtype, remat_policy=model.remat_policy,
                                scan_layers=model.scan_layers, attention_impl=model.attention_impl,
                                **_optional_model_keys(cfg))
    if tokenizer.vocab_size > model.vocab_size:
      raise ConfigError(f"the tokenizer's {tokenizer.vocab_size} pieces do not fit {init_from}'s vocabulary of "
                        f"{model.vocab_size}")
  param_sharding = param_shardings(model, mesh)  # raises naming the weight if the mesh does not divide it
  opt_cfg = OptimizerConfig(total_steps=cfg.steps, **dict(cfg.optimizer))
  tx = make_optimizer(opt_cfg)
  schedule = learning_rate_schedule(opt_cfg)
  batch_sharding = DEFAULT_RULES.sharding(mesh, ("batch", "seq"))

  def fresh_state():
    return create_train_state(model, tx, seed=cfg.seed, mesh=mesh)

  def first_state():  # only when no checkpoint exists: a resumed run continues from its own weights
    return fresh_state() if base_params is None else create_train_state(model, tx, cfg.seed, mesh, params=base_params)

  abstract = jax.eval_shape(fresh_state)
  shardings = train_state_shardings(abstract, tx, mesh, param_sharding)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  ckpt = checkpoint_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=cfg.checkpoint_every,
                                          keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
  state, data_state = ckpt.restore_or_init(abstract, first_state)
  base_params = None
  # Written only once the checkpoints are known to fit this config: a mismatched rerun must not overwrite the
  # description of the run that is on disk.
  if jax.process_index() == 0:  # serving, evaluation and convert.py read the model and tokenizer from here
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      json.dump(dataclasses.asdict(model), f, indent=2)
    if os.path.abspath(tokenizer.path) != os.path.abspath(os.path.join(workdir, "tokenizer.model")):
      shutil.copyfile(tokenizer.path, os.path.join(workdir, "tokenizer.model"))
  start = int(state.step)

  rows, shard_index, shard_count, to_global = _host_reader(cfg)
  train_ds = pipeline.make_pretrain_dataset(train_source, tokenizer, seq_len=cfg.seq_len, batch_size=rows,
                                            seed=cfg.seed, shard_index=shard_index, shard_count=shard_count)
  train_iter = iter(train_ds)
  if data_state is not None:
    train_iter.set_state(data_state)

  step_fn = make_train_step(model, tx, grad_accum=cfg.grad_accum, state_sharding=shardings,
                            batch_sharding=batch_sharding, lr_schedule=schedule)
  eval_fn = jax.jit(lambda p, b: cross_entropy_sums(p, b, model), in_shardings=(param_sharding, batch_sharding))
  peak, peak_source = metrics_lib.peak_flops_per_device(cfg.peak_flops)
  flops_per_token = model.flops_per_token(cfg.seq_len)
  # Simulated CPU devices share one machine's cores, and the measured peak already uses all of them.
  total_peak = peak if jax.default_backend() == "cpu" else peak * jax.device_count()
  writer = metrics_lib.MetricsWriter(workdir, cfg.steps, start, progress=cfg.progress)
  logging.info("model %s: %.1fM params; mesh %s; peak %.3g FLOP/s/device (%s)", cfg.model.preset,
               model.num_params() / 1e6, dict(mesh.shape), peak, peak_source)

  in_training_eval = _in_training_eval(cfg, tokenizer)
  guard = checkpoint_lib.install_preemption_handler()
  nonfinite_run = 0
  last_time, last_step = time.perf_counter(), start
  tokens_per_sec = mfu = None
  val_loss = None
  with jax.set_mesh(mesh):
    for step in range(start, cfg.steps):
      batch = to_global(next(train_iter), batch_sharding)
      state, metrics = step_fn(state, batch)
      done = step + 1
      if not bool(metrics["finite"]):
        nonfinite_run += 1
        logging.warning("step %d: non-finite loss or gradients; update skipped", done)
        if nonfinite_run >= cfg.halt_after_nonfinite:
          ckpt.close()
          raise TrainingHalted(f"{nonfinite_run} consecutive non-finite steps at step {done}: lower "
                               "optimizer.learning_rate, raise warmup_steps, or use float32 compute; the last "
                               "good checkpoint is kept")
      else:
        nonfinite_run = 0
      record = None
      if done % cfg.log_every == 0 or done == cfg.steps:
        loss = float(metrics["loss"])
        now = time.perf_counter()
        tokens_per_sec = (done - last_step) * cfg.batch_size * cfg.seq_len / (now - last_time)
        mfu = tokens_per_sec * flops_per_token / total_peak
        last_time, last_step = now, done
        record = {"loss": loss, "tokens_per_sec": tokens_per_sec, "mfu": mfu, "lr": float(metrics["lr"]),
                  "grad_norm": float(metrics["grad_norm"]), "tokens": float(metrics["tokens"]),
                  "skipped": int(state.skipped)}
        writer.progress(done, loss, tokens_per_sec, mfu)
      if val_source is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
        val_loss = evaluate(eval_fn, state.params, val_source, tokenizer, cfg, batch_sharding)
        record = dict(record or {}, val_loss=val_loss)
        last_time = time.perf_counter()  # evaluation time is not training throughput
      if in_training_eval is not None and done % cfg.task_eval_every == 0:
        record = dict(record or {}, **in_training_eval(state.params, model, done))
        last_time = time.perf_counter()
      if record is not None:
        writer.write(done, record)
        if on_log is not None and jax.process_index() == 0:
          on_log(done, record)
      preempted = guard(done)
      final = done == cfg.steps or preempted
      if ckpt.should_save(done) or final:
        ckpt.save(done, state, train_iter.get_state(), force=final)
        last_time = time.perf_counter()
      if preempted:
        ckpt.wait()
        ckpt.close()
        writer.close()
        logging.warning("preempted: saved step %d; rerun the same command to resume", done)
        return {"preempted": True, "step": done}
    ckpt.wait()
    writer.close()
    if val_source is not None and val_loss is None:  # a rerun of a finished job still reports where it ended
      val_loss = evaluate(eval_fn, state.params, val_source, tokenizer, cfg, batch_sharding)
    summary = {"step": int(state.step), "val_loss": val_loss, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
               "skipped": int(state.skipped)}
    if val_source is not None:
      summary["unigram_val_loss"] = unigram_baseline(train_source, val_source, tokenizer)
    if cfg.sample_tokens > 0:
      prompt = tokenizer.encode(cfg.sample_prompt, add_bos=True)
      new = generate(state.params, model, [prompt], cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed,
                     stop_ids=tuple(tokenizer.stop_token_ids))[0]
      # An init_from model's vocabulary may be padded past the tokenizer's: those ids have no text.
      summary["sample"] = cfg.sample_prompt + tokenizer.decode([t for t in new if t < tokenizer.vocab_size])
  ckpt.close()
  summary["loss_curve"] = metrics_lib.plot_loss_curve(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
