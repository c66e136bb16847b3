"""The jitted LoRA / QLoRA step: only adapters are differentiated, updated and held in the optimizer state.

Shapes: B global batch, M micro-batches (grad_accum), T seq_len, V vocab.
Batch fields as pretraining (train.step.BATCH_KEYS), each int32 [B, T]; for SFT rows `loss_mask` marks the
positions whose target is a trained (assistant) token.

    lcfg = LoraConfig(rank=16, alpha=32)
    base = params                                   # or quant_nf4.quantize_params(params, "nf4") for QLoRA
    state = create_adapter_state(init_lora(config, lcfg, key), tx, seed=0)
    step = make_finetune_step(config, lcfg, tx)
    state, metrics = step(state, base, batch)       # state.params is the adapter tree; base is never changed

The base is an argument of the step, not part of the state: it is neither donated nor differentiated (and sits
behind stop_gradient inside `LoraWeight`), so the optimizer state covers adapter leaves only. Full fine-tuning
uses the pretraining step (`train.step.make_train_step`) unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from internlm_jax.config import ModelConfig
from internlm_jax import layers
from internlm_jax.lora import LoraConfig, apply_lora
from internlm_jax.model import hidden_states
from internlm_jax.quant_nf4 import QuantizedWeight
from internlm_jax.quant_nf4_ops import gather_embedding, quantized_head_cross_entropy, vocab_chunk
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules, constrain
from internlm_jax.train.state import TrainState, train_state_shardings
from internlm_jax.train.step import BATCH_KEYS, cross_entropy_sums

# loss_fn(trainable, micro_batch) -> (loss sum, (denominator, {metric name: sum}))
SumsFn = Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]


def create_adapter_state(adapters, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
  """A TrainState whose params are the adapters; with sharded adapters (lora.init_lora(mesh=...)) the optimizer
  moments get each adapter's sharding and scalars are replicated."""
  rng = jax.random.key_data(jax.random.key(seed))

  def build(adapters):
    return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters), rng=rng,
                      skipped=jnp.zeros((), jnp.int32))

  shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), adapters)
  first = jax.tree.leaves(shardings)[0] if jax.tree.leaves(shardings) else None
  out_shardings = None
  if isinstance(first, NamedSharding):
    out_shardings = train_state_shardings(jax.eval_shape(build, adapters), tx, first.mesh, shardings)
  return jax.jit(build, out_shardings=out_shardings)(adapters)


def accumulate(loss_fn: SumsFn, trainable, batch, grad_accum: int, rules: ShardingRules | None):
  """Sums of (loss, denominator, metrics) and the gradient of the loss sum over `grad_accum` micro-batches.

  Every leaf of `batch` is split along its first axis, strided as in train.step so each data shard keeps its
  rows. Dividing the summed loss once by the summed denominator makes M micro-batches equal one big batch.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    (loss_sum, (denom, sums)), grads = grad_fn(trainable, batch)
    return loss_sum, denom, sums, grads

  def split(x):
    x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch", "seq")[:x.ndim], rules)

  micro = jax.tree.map(split, batch)
  shapes = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

  def body(carry, mb):
    out = grad_fn(trainable, mb)
    return jax.tree.map(lambda acc, new: acc + new.astype(jnp.float32), carry, out), None

  ((loss_sum, (denom, sums)), grads), _ = jax.lax.scan(body, zeros, micro)
  return loss_sum, denom, sums, grads


def apply_update(state: TrainState, tx: optax.GradientTransformation, loss_sum, denom, grads):
  """Mean loss and gradients, one optimizer update; skipped (state kept) when loss or grads are not finite.

  The skip is a lax.cond, not a select between the new and old state: with the state donated, a select needs the
  old moments alive next to the new ones, so XLA copied every moment up front (twice the optimizer state in
  temporaries, live through the whole forward and backward: +97 MiB on the QLoRA r64 benchmark)."""
  denom = jnp.maximum(denom, 1.0)
  loss = loss_sum / denom
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state, grads):
    updates, new_opt = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt

  new_params, new_opt = jax.lax.cond(finite, update, lambda p, o, g: (p, o), state.params, state.opt_state, grads)
  new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt, rng=state.rng,
                         skipped=state.skipped + (~finite).astype(jnp.int32))
  return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def base_cross_entropy_sums(params, batch, config: ModelConfig, rules: ShardingRules | None = DEFAULT_RULES):
  """`train.step.cross_entropy_sums` for params whose frozen embedding and/or output head may be quantized
  (QLoRA with quant_nf4 targets "embed" / "output"): the embedding rows of the batch are decoded alone
  (quant_nf4.gather_embedding) and a quantized head is decoded one vocabulary chunk at a time inside the loss
  (quant_nf4.quantized_head_cross_entropy), so neither is ever dequantized whole. Plain params: unchanged."""
  params, tokens = gather_embedding(params, batch["tokens"])
  head = params["output"]
  if isinstance(head, QuantizedWeight) and vocab_chunk(head) is not None:
    x = hidden_states(params, tokens, config, segment_ids=batch["segment_ids"], positions=batch["positions"],
                      rules=rules)
    x = layers.rms_norm(x, params["norm"], config.rms_norm_eps)
    losses = quantized_head_cross_entropy(x, head, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)
  return cross_entropy_sums(params, dict(batch, tokens=tokens), config, rules)


def lora_loss_sums(config: ModelConfig, lcfg: LoraConfig, base, rules: ShardingRules | None,
                   dropout_key: jax.Array | None = None) -> SumsFn:
  """Masked next-token cross-entropy sums of base + adapters (the pretraining loss), LoRA dropout with a key."""
  def fn(adapters, batch):
    params = apply_lora(base, adapters, lcfg, dropout_key)
    loss_sum, count = base_cross_entropy_sums(params, batch, config, rules)
    return loss_sum, (count, {})
  return fn


def make_finetune_step(config: ModelConfig, lcfg: LoraConfig, tx: optax.GradientTransformation, *,
                       grad_accum: int = 1, rules: ShardingRules | None = DEFAULT_RULES, state_sharding=None,
                       base_sharding=None, batch_sharding=None, lr_schedule: Callable | None = None):
  """jit(step)(state, base, batch) -> (state, metrics); the adapter state is donated, the base is not.

  Metrics: loss (mean over loss tokens), grad_norm (adapters), tokens, finite, and lr with `lr_schedule`.
  For QLoRA pass a quantized base; use config.remat_policy="full" to keep merged weights out of the saved
  activations (see lora.py).
  """
  def step(state: TrainState, base, batch):
    batch = {k: batch[k] for k in BATCH_KEYS}
    dropout_key = None
    if lcfg.dropout > 0:  # a fresh mask every step, reproducible on resume
      dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss_sum, count, _, grads = accumulate(lora_loss_sums(config, lcfg, base, rules, dropout_key), state.params,
                                           batch, grad_accum, rules)
    new_state, metrics = apply_update(state, tx, loss_sum, count, grads)
    metrics["tokens"] = count
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_sharding, base_sharding, batch_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)


def make_eval_loss(config: ModelConfig, lcfg: LoraConfig | None = None, rules: ShardingRules | None = DEFAULT_RULES):
  """jit(fn)(base, adapters_or_None, batch) -> mean masked loss; adapters None evaluates the base alone."""
  def fn(base, adapters, batch):
    params = base if adapters is None else apply_lora(base, adapters, lcfg)
    loss_sum, count = base_cross_entropy_sums(params, {k: batch[k] for k in BATCH_KEYS}, config, rules)
    return loss_sum / jnp.maximum(count, 1.0)
  return jax.jit(fn)
