"""The fine-tuning loop (XTuner's full / LoRA / QLoRA / DPO): base model in, HF folder and/or adapter out.

`run(cfg, workdir)` is what `experiments/finetune.py` calls. Like pretraining (train/loop.py) it checkpoints the
trained state plus the data iterator's state with checkpoint.CheckpointManager, so rerunning the same command
resumes bit-exactly, and it writes WORKDIR/metrics.jsonl and WORKDIR/summary.json. What is trained:
  full   every weight, with the pretraining step (train.step.make_train_step); the checkpoint holds the model.
  lora   adapters only (train.finetune_step); the base is an argument of the step, never in the checkpoint.
  qlora  as lora over a base quantized to NF4 or int8 (quant_nf4), dequantized layer by layer in the forward.
  dpo    adapters on preference pairs (train.dpo): dpo.loss_type sigmoid (DPO, the default), ipo, hinge, robust,
         sppo_hard, nca_pair or kto_pair with the frozen base (adapter off) as the reference, or orpo
         (reference-free: no reference forward).
At the end: WORKDIR/hf (an HF InternLM2 folder of the fine-tuned model, adapters merged, with tokenizer.model)
and WORKDIR/adapter (PEFT adapter folder). A QLoRA adapter is merged into the dequantized base, the weights it
was trained against, so the HF folder computes exactly what was evaluated. Multiple-choice held-out records are
scored before (the model at step 0: the base, for QLoRA the NF4 base) and after. Held-out rows are evaluated
every eval_every steps and at the end (metrics.jsonl eval_*): SFT's loss over eval_batches batches, and for DPO
the DPO loss and rewards over every held-out pair (finetune.dpo_eval), also before training for the summary.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from internlm_jax import checkpoint as checkpoint_lib
from internlm_jax import params_io
from internlm_jax.config import ConfigError
from internlm_jax.data.sft import make_batches
from internlm_jax.finetune import base as base_lib
from internlm_jax.finetune import dpo_eval
from internlm_jax.finetune.data import build_finetune_data, split_list
from internlm_jax.finetune.evaluate import choice_accuracy
from internlm_jax.hf_io import save_hf_checkpoint
from internlm_jax.lora import LoraConfig, LoraError, apply_lora, init_lora, lora_shardings, loraplus, merge
from internlm_jax.lora_io import save_adapter
from internlm_jax.model import param_shardings
from internlm_jax.quant_nf4 import KINDS, QUANT_TARGETS, dequantize_params, quantize_params
from internlm_jax.sharding import DEFAULT_RULES, make_mesh
from internlm_jax.tokenizer import Tokenizer
from internlm_jax.train import metrics as metrics_lib
from internlm_jax.train.dpo import make_dpo_eval, make_dpo_step, settings_error
from internlm_jax.train.finetune_step import create_adapter_state, make_eval_loss, make_finetune_step
from internlm_jax.train.loop import TrainingHalted, make_workdir
from internlm_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from internlm_jax.train.state import TrainState, train_state_shardings
from internlm_jax.train.step import make_train_step

METHODS = ("full", "lora", "qlora", "dpo")


def lora_config_from(cfg) -> LoraConfig:
  try:
    return LoraConfig(rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha), dropout=float(cfg.lora.dropout),
                      targets=tuple(split_list(cfg.lora.targets)))
  except LoraError as e:
    raise ConfigError(f"config.lora: {e}") from None


def dpo_settings(cfg) -> dict:
  """make_dpo_step's / make_dpo_eval's loss settings from config.dpo (loss_type defaults to sigmoid)."""
  return dict(beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing,
              loss_type=cfg.dpo.get("loss_type", "sigmoid"))


def validate(cfg) -> None:
  """Fails fast, before loading or compiling anything, with one line that names the setting."""
  if cfg.method not in METHODS:
    raise ConfigError(f"config.method must be one of {METHODS}, got {cfg.method!r}")
  for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
    if int(cfg[key]) <= 0:
      raise ConfigError(f"config.{key} must be positive, got {cfg[key]}")
  if cfg.batch_size % cfg.grad_accum:
    raise ConfigError(f"config.batch_size={cfg.batch_size} must be divisible by grad_accum={cfg.grad_accum}")
  if cfg.method != "full":
    lora_config_from(cfg)
    if float(cfg.lora.get("loraplus_ratio", 1.0)) <= 0:
      raise ConfigError(f"config.lora.loraplus_ratio must be positive, got {cfg.lora.loraplus_ratio}")
  if cfg.method == "qlora" and cfg.qlora.kind not in KINDS:
    raise ConfigError(f"config.qlora.kind must be one of {KINDS}, got {cfg.qlora.kind!r}")
  if cfg.method == "qlora" and not set(split_list(cfg.qlora.targets)) <= set(QUANT_TARGETS):
    raise ConfigError(f"config.qlora.targets must be names from {list(QUANT_TARGETS)}, got {cfg.qlora.targets!r}")
  try:  # e.g. optimizer.moments, checked here rather than after the base is loaded
    OptimizerConfig(total_steps=cfg.steps, **dict(cfg.optimizer))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.optimizer: {e}") from None
  if cfg.method == "dpo" and (error := settings_error(**dpo_settings(cfg))):
    raise ConfigError(f"config.dpo.{error}")
  if cfg.data.source not in ("shakespeare", "files"):
    raise ConfigError(f"config.data.source must be 'shakespeare' or 'files', got {cfg.data.source!r}")
  if cfg.data.source == "files" and not split_list(cfg.data.train_paths):
    raise ConfigError("config.data.source='files' needs config.data.train_paths (comma-separated .jsonl files)")
  for key in ("train_paths", "eval_paths") if cfg.data.source == "files" else ("eval_paths",):
    for path in split_list(cfg.data[key]):
      if not os.path.exists(path):  # found now, not after minutes of loading the base and tokenizing
        raise ConfigError(f"config.data.{key}: data file {path!r} does not exist")
  base_lib.base_kind(cfg.base.checkpoint)


def _to_global(batch, sharding):
  """Global arrays when every host holds the whole batch (all hosts read all rows): each device takes its own."""
  return jax.tree.map(lambda v: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: np.asarray(v[idx])),
                      batch)


def _load(cfg, mesh):
  """(model config with this run's numerics, base params, tokenizer)."""
  model, params, tok_path = base_lib.load_base(
      cfg.base.checkpoint, mesh=mesh, preset=cfg.base.preset, overrides=dict(cfg.base.overrides),
      step=None if cfg.base.step < 0 else cfg.base.step)
  model = model.replace(dtype=cfg.model.dtype, remat_policy=cfg.model.remat_policy,
                        scan_layers=cfg.model.scan_layers, attention_impl=cfg.model.attention_impl)
  guessed = not (cfg.base.tokenizer or tok_path)
  tok_path = cfg.base.tokenizer or tok_path or base_lib.default_tokenizer(model.vocab_size)
  tokenizer = Tokenizer(tok_path)
  # A model may have more embeddings than pieces (padded vocabularies); a guessed tokenizer must match exactly.
  if tokenizer.vocab_size > model.vocab_size or (guessed and tokenizer.vocab_size != model.vocab_size):
    raise ConfigError(f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the base model has "
                      f"{model.vocab_size} embeddings; set config.base.tokenizer to the base model's tokenizer")
  return model, params, tokenizer


def _eval_loss(fn, args, rows, cfg, put) -> float:
  """Token-weighted mean loss over the first `eval_batches` batches of the held-out rows."""
  total = count = 0.0
  batches = make_batches(rows, cfg.batch_size, 0, shuffle=False, num_epochs=1)
  for i, batch in enumerate(batches):
    if i >= cfg.eval_batches:
      break
    n = float(batch["loss_mask"].sum())
    total += float(fn(*args, put(batch))) * n
    count += n
  return total / max(count, 1.0)


def run(cfg, workdir: str) -> dict:
  """Fine-tunes (or resumes) per `cfg`; returns the summary dict also written to WORKDIR/summary.json."""
  validate(cfg)
  make_workdir(workdir)
  mesh = make_mesh(**dict(cfg.mesh))
  model, base, tokenizer = _load(cfg, mesh)
  data = build_finetune_data(cfg, tokenizer)
  logging.info("data: %s", data.summary)
  opt_cfg = OptimizerConfig(total_steps=cfg.steps, **dict(cfg.optimizer))
  tx, schedule = make_optimizer(opt_cfg), learning_rate_schedule(opt_cfg)
  batch_sharding = DEFAULT_RULES.sharding(mesh, ("batch", "seq"))
  scored = cfg.eval.heldout_accuracy and any(r.get("options") for r in data.heldout)

  with jax.set_mesh(mesh):
    lcfg = None if cfg.method == "full" else lora_config_from(cfg)
    if lcfg is not None:
      tx = loraplus(tx, float(cfg.lora.get("loraplus_ratio", 1.0)))
    if cfg.method == "full":
      params_sharding = param_shardings(model, mesh)
      rng = jax.random.key_data(jax.random.key(cfg.seed))
      build = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=rng,
                                   skipped=jnp.zeros((), jnp.int32))
      abstract = jax.eval_shape(build, base)
      fresh_state = lambda: jax.jit(build, out_shardings=shardings)(base)
    else:
      if cfg.method == "qlora":
        quantize = lambda p: quantize_params(p, cfg.qlora.kind, targets=split_list(cfg.qlora.targets),
                                             block=cfg.qlora.block,
                                             double_quant=bool(cfg.qlora.get("double_quant", False)))
        base = jax.jit(quantize)(base)  # rebinding drops the float weights (nothing else holds them)
      params_sharding = lora_shardings(model, lcfg, mesh)
      fresh_state = lambda: create_adapter_state(init_lora(model, lcfg, jax.random.key(cfg.seed), mesh=mesh), tx,
                                                 seed=cfg.seed)
      abstract = jax.eval_shape(fresh_state)
    shardings = train_state_shardings(abstract, tx, mesh, params_sharding)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = checkpoint_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=cfg.checkpoint_every,
                                            keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
    state, data_state = ckpt.restore_or_init(abstract, fresh_state)
    start = int(state.step)
    # "before" is the model at step 0: the base, or base + zero adapters (exactly the base, or for QLoRA the NF4
    # base) so that it compiles once with "after".
    if cfg.method == "full":
      before_params = base
    else:
      before_params = apply_lora(base, jax.tree.map(jnp.zeros_like, state.params), lcfg)
    stopping = start < cfg.stop_after < cfg.steps  # this invocation ends early: nothing to compare against
    before = choice_accuracy(before_params, model, tokenizer, data.heldout) if scored and not stopping else None
    del before_params
    if cfg.method == "full":
      del base  # the state owns the weights now
      base = None

    common = dict(grad_accum=cfg.grad_accum, state_sharding=shardings, batch_sharding=batch_sharding,
                  lr_schedule=schedule)
    if cfg.method == "full":
      full_step = make_train_step(model, tx, **common)
      step_fn = lambda s, b: full_step(s, b)
      model_params = lambda s: s.params
      eval_fn, eval_args = make_eval_loss(model), lambda s: (s.params, None)
    else:
      base_sharding = jax.tree.map(lambda x: x.sharding, base)
      make = make_dpo_step if cfg.method == "dpo" else make_finetune_step
      extra = dpo_settings(cfg) if cfg.method == "dpo" else {}
      adapter_step = make(model, lcfg, tx, base_sharding=base_sharding, **common, **extra)
      step_fn = lambda s, b: adapter_step(s, base, b)
      model_params = lambda s: apply_lora(base, s.params, lcfg)
      eval_fn, eval_args = make_eval_loss(model, lcfg), lambda s: (base, s.params)
    put = lambda batch: _to_global(batch, batch_sharding)
    pairs_before = None
    if data.eval_rows is None:
      evaluate = None
    elif cfg.method == "dpo":
      pairs_fn = make_dpo_eval(model, lcfg, grad_accum=cfg.grad_accum, **dpo_settings(cfg))
      eval_pairs = lambda adapters: dpo_eval.evaluate_pairs(pairs_fn, base, adapters, data.eval_rows,
                                                            cfg.batch_size, tokenizer.pad_id, put)
      evaluate = lambda s: dpo_eval.eval_record(eval_pairs(s.params))
      if not stopping:  # the model at step 0 (adapter off): the reference itself, so margin 0 (sigmoid: log 2)
        pairs_before = eval_pairs(dpo_eval.zero_adapters(state.params))
    else:
      evaluate = lambda s: {"eval_loss": _eval_loss(eval_fn, eval_args(s), data.eval_rows, cfg, put)}

    train_iter = iter(make_batches(data.train_rows, cfg.batch_size, tokenizer.pad_id, seed=cfg.seed))
    if data_state is not None:
      train_iter.set_state(data_state)
    peak, _ = metrics_lib.peak_flops_per_device(cfg.peak_flops)
    total_peak = peak if jax.default_backend() == "cpu" else peak * jax.device_count()
    # Adapter methods skip the base's weight gradients: about 2/3 of a full step's model FLOPs.
    flops_per_token = model.flops_per_token(cfg.seq_len) * (1.0 if cfg.method == "full" else 2.0 / 3.0)
    writer = metrics_lib.MetricsWriter(workdir, cfg.steps, start, progress=cfg.progress)
    guard = checkpoint_lib.install_preemption_handler()
    try:
      state, stopped, loss, evaluated, tokens_per_sec = _train(
          cfg, state, start, step_fn, train_iter, ckpt, writer, guard, evaluate, put, flops_per_token / total_peak)
    finally:
      guard.uninstall()  # run() may be called again in this process (tests, notebooks)
      ckpt.close()
      writer.close()
    if stopped:
      return {"stopped": True, "step": int(state.step)}
    if evaluate is not None and evaluated is None:  # a rerun of a finished job still reports where it ended
      evaluated = evaluate(state)
    after = choice_accuracy(model_params(state), model, tokenizer, data.heldout) if scored else None
    outputs = _write_outputs(cfg, workdir, model, tokenizer, state, base, lcfg)
  summary = {"method": cfg.method, "step": int(state.step), "loss": loss,
             "eval_loss": evaluated["eval_loss"] if evaluated else None,
             "tokens_per_sec": tokens_per_sec, "skipped": int(state.skipped),
             "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
             "data": data.summary.as_dict(), "outputs": outputs,
             "heldout_accuracy_before": before and before["accuracy"],
             "heldout_accuracy_after": after and after["accuracy"],
             "heldout": {"before": before, "after": after}}
  if cfg.method == "dpo" and evaluated is not None:  # eval_pairs, eval_loss, ... without the prefix
    summary["heldout_pairs"] = {"before": pairs_before,
                                "after": {k[len("eval_"):]: v for k, v in evaluated.items()}}
  summary["loss_curve"] = metrics_lib.plot_loss_curve(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _train(cfg, state, start, step_fn, train_iter, ckpt, writer, guard, evaluate, put, mfu_per_token_per_sec):
  """Steps from `start` to cfg.steps (or a stop); returns (state, stopped, last loss, last evaluate(state) record
  or None, tokens/s). `evaluate` (None: no held-out data) only reads the state, so training is the same without."""
  rows_tokens = cfg.batch_size * cfg.seq_len
  nonfinite_run, last_time, last_step = 0, time.perf_counter(), start
  tokens_per_sec = loss = evaluated = None
  for step in range(start, cfg.steps):
    state, metrics = step_fn(state, put(next(train_iter)))
    done = step + 1
    nonfinite_run = 0 if bool(metrics["finite"]) else nonfinite_run + 1
    if nonfinite_run >= cfg.halt_after_nonfinite:
      raise TrainingHalted(f"{nonfinite_run} consecutive non-finite steps at step {done}: lower "
                           "optimizer.learning_rate; the last good checkpoint is kept")
    record = None
    if done % cfg.log_every == 0 or done == cfg.steps:
      now = time.perf_counter()
      tokens_per_sec = (done - last_step) * rows_tokens / (now - last_time)
      last_time, last_step = now, done
      record = {k: float(v) for k, v in metrics.items() if k != "finite"}
      record.update(tokens_per_sec=tokens_per_sec, mfu=tokens_per_sec * mfu_per_token_per_sec,
                    skipped=int(state.skipped))
      loss = record["loss"]
      writer.progress(done, loss, tokens_per_sec)
    if evaluate is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
      evaluated = evaluate(state)
      record = dict(record or {}, **evaluated)
      last_time = time.perf_counter()  # evaluation time is not training throughput
    if record is not None:
      writer.write(done, record)
    preempted = guard(done)
    stop = preempted or done == cfg.stop_after
    if ckpt.should_save(done) or done == cfg.steps or stop:
      ckpt.save(done, state, train_iter.get_state(), force=True)
      last_time = time.perf_counter()
    if stop:
      ckpt.wait()
      logging.warning("stopped after step %d (%s); rerun the same command to resume", done,
                      "preempted" if preempted else "config.stop_after")
      return state, True, loss, evaluated, tokens_per_sec
  return state, False, loss, evaluated, tokens_per_sec


def _write_outputs(cfg, workdir, model, tokenizer, state, base, lcfg) -> dict:
  """WORKDIR/hf (merged model) and WORKDIR/adapter, as configured; returns their paths."""
  out = {}
  if cfg.output.adapter and lcfg is not None:
    out["adapter"] = os.path.join(workdir, "adapter")
    save_adapter(out["adapter"], model, lcfg, state.params, base_model_name_or_path=cfg.base.checkpoint)
  if cfg.output.hf:
    if lcfg is None:
      params = state.params
    else:  # one compiled merge rather than a few eager ops per weight
      params = jax.jit(lambda b, a: merge(dequantize_params(b) if cfg.method == "qlora" else b, a, lcfg))(
          base, state.params)
    out["hf"] = os.path.join(workdir, "hf")
    save_hf_checkpoint(out["hf"], model, params, dtype=cfg.output.dtype or None)
    if jax.process_index() == 0:
      shutil.copyfile(tokenizer.path, os.path.join(out["hf"], "tokenizer.model"))
      if os.path.basename(tokenizer.path) == "tokenizer.model":  # an HF base: its chat-piece names, remote code
        params_io.copy_tokenizer_files(os.path.dirname(tokenizer.path), out["hf"])
  return out
