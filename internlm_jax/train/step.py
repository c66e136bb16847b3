"""The jitted train step: masked next-token loss, gradient accumulation weighted by tokens, skip on non-finite.

Shapes: B global batch, M micro-batches (grad_accum), T seq_len, V vocab.
Batch fields, each int32 [B, T]: tokens, targets, segment_ids, positions, loss_mask.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from internlm_jax.config import ModelConfig
from internlm_jax.model import forward
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules, constrain
from internlm_jax.train.state import TrainState

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def cross_entropy_sums(params, batch, config: ModelConfig, rules: ShardingRules | None = DEFAULT_RULES):
  """(sum of masked token losses, number of loss tokens), both float32 scalars."""
  logits = forward(params, batch["tokens"], config, segment_ids=batch["segment_ids"],
                   positions=batch["positions"], rules=rules)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def _accumulated_grads(params, batch, config, rules, grad_accum: int):
  """Loss sum, token count and gradient of the loss sum over `grad_accum` micro-batches (a lax.scan).

  Summing per-token losses and dividing once by the total count makes k micro-batches equal one big batch,
  however unevenly the loss tokens fall across them.
  """
  grad_fn = jax.value_and_grad(lambda p, b: cross_entropy_sums(p, b, config, rules), has_aux=True)
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


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    rules: ShardingRules | None = DEFAULT_RULES, state_sharding=None, batch_sharding=None,
                    lr_schedule: Callable | None = None):
  """jit(step)(state, batch) -> (state, metrics) with explicit shardings and the state donated."""

  def step(state: TrainState, batch):
    batch = {k: batch[k] for k in BATCH_KEYS}
    loss_sum, count, grads = _accumulated_grads(state.params, batch, config, rules, grad_accum)
    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    grad_norm = optax.global_norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state), rng=state.rng,
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                 donate_argnums=0)
