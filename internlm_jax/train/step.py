"""The jitted train step: masked next-token loss, gradient accumulation weighted by tokens, skip on non-finite.

Shapes: B global batch, M micro-batches (grad_accum), T seq_len, V vocab.
Batch fields, each int32 [B, T]: tokens, targets, segment_ids, positions, loss_mask.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from internlm_jax import layers
from internlm_jax.config import ModelConfig
from internlm_jax.model import hidden_states
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules, constrain
from internlm_jax.train.loss import head_cross_entropy
from internlm_jax.train.state import TrainState

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def cross_entropy_sums(params, batch, config: ModelConfig, rules: ShardingRules | None = DEFAULT_RULES):
  """(sum of masked token losses, number of loss tokens), both float32 scalars.

  The output head is fused with the loss (train/loss.py): the same numbers as the logits of `model.forward`
  through optax's cross-entropy, with a faster backward pass and, with config.loss_chunk_size, bounded memory.
  """
  x = hidden_states(params, batch["tokens"], config, segment_ids=batch["segment_ids"],
                    positions=batch["positions"], rules=rules)
  x = layers.rms_norm(x, params["norm"], config.rms_norm_eps)
  losses = head_cross_entropy(x, params["output"].astype(x.dtype), batch["targets"],
                              chunk_size=config.loss_chunk_size or None)
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def _accumulated_grads(params, batch, config, rules, grad_accum: int, scale=1.0):
  """Loss sum, token count and gradient of `scale` * the loss sum over `grad_accum` micro-batches (a lax.scan).

  Summing per-token losses and dividing once by the total count makes k micro-batches equal one big batch,
  however unevenly the loss tokens fall across them. The count does not depend on the parameters, so the step
  passes scale = 1 / count and gets the mean's gradient without another pass over the gradients.
  """
  def scaled_sums(p, b):
    loss_sum, count = cross_entropy_sums(p, b, config, rules)
    return loss_sum * scale, (loss_sum, count)

  grad_fn = lambda p, b: _unscaled(jax.value_and_grad(scaled_sums, has_aux=True)(p, b))
  if grad_accum == 1:
    (loss_sum, count), grads = grad_fn(params, batch)
    return loss_sum, count, grads

  def split(x):
    B = x.shape[0]
    x = x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)  # strided: each shard keeps rows
    return constrain(x, (None, "batch", "seq"), rules)

  micro = jax.tree.map(split, batch)

  def body(carry, mb):
    loss_acc, count_acc, grad_acc = carry
    (loss_sum, count), grads = grad_fn(params, mb)
    return (loss_acc + loss_sum, count_acc + count, jax.tree.map(jnp.add, grad_acc, grads)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss_sum, count, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(()), zeros), micro)
  return loss_sum, count, grads


def _unscaled(value_and_grads):
  (_, (loss_sum, count)), grads = value_and_grads
  return (loss_sum, count), grads


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    rules: ShardingRules | None = DEFAULT_RULES, state_sharding=None, batch_sharding=None,
                    lr_schedule: Callable | None = None):
  """jit(step)(state, batch) -> (state, metrics) with explicit shardings and the state donated."""

  def step(state: TrainState, batch):
    batch = {k: batch[k] for k in BATCH_KEYS}
    denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    loss_sum, count, grads = _accumulated_grads(state.params, batch, config, rules, grad_accum, 1.0 / denom)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)  # accumulators are float32
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
      updates, new_opt = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), new_opt

    # A cond, not a select: the skip branch costs nothing and the update branch no extra pass over the state.
    new_params, new_opt = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
    new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt, rng=state.rng,
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                 donate_argnums=0)
