"""Preference tuning of LoRA / QLoRA adapters on pairs: DPO and its variants, with the frozen base (adapter off)
as the reference model, and the reference-free ORPO (train.orpo).

Shapes: P preference pairs per batch, T seq_len, V vocab.
Batch: {"chosen": rows, "rejected": rows}, each rows dict holding the pretraining fields (train.step.BATCH_KEYS)
as int32 [P, T]; row p of "chosen" and row p of "rejected" are one pair (same prompt), one sequence per row
(data.sft.build_dpo_rows). `loss_mask` marks the response tokens' positions, so a sequence's log-prob is
log pi(response | prompt). Optional float32 [P] "ref_chosen_logps" / "ref_rejected_logps" in the batch (summed,
as `make_reference_logps` gives them) replace the reference forward passes (precomputed once per dataset). A pair
with no loss token on either side (padding rows of a short final batch) counts for nothing.

loss_type (the definitions of XTuner's xtuner/model/dpo.py and TRL's DPOTrainer.dpo_loss), eps = label_smoothing:
  h         = (pi_c - pi_r) - (ref_c - ref_r)                  pi, ref: summed response log-probs
  z         = beta * h  (computed as beta * (pi_c - ref_c) - beta * (pi_r - ref_r))
  sigmoid   -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)                  (default; eps > 0: cDPO)
  robust    (-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps)   (Chowdhury et al., 2024)
  hinge     relu(1 - z)                                                     (RSO, Liu et al., 2023)
  ipo       (h - 1 / (2 beta))^2 with pi, ref the MEAN log-prob per response token, as XTuner and TRL average
            them for IPO (Azar et al., 2023, eq. 17; beta is the paper's tau)
  orpo      no reference: NLL of the chosen response + beta * odds-ratio loss (train.orpo), mean token log-probs
  sppo_hard (a - 1 / (2 beta))^2 + (b + 1 / (2 beta))^2, a = pi_c - ref_c, b = pi_r - ref_r  (SPPO, Wu et al., 2024)
  nca_pair  -log sigmoid(beta a) - log sigmoid(-beta a) / 2 - log sigmoid(-beta b) / 2      (NCA, Chen et al., 2024)
  kto_pair  (1 - sigmoid(beta (a - KL_r)) + 1 - sigmoid(beta (KL_c - b))) / 2 with KL_c = max(0, mean a) and
            KL_r = max(0, mean b) over the batch's valid pairs (HALOs / KTO eq. 7, as TRL's kto_pair; with
            gradient accumulation the means are per micro-batch)
loss = mean over valid pairs. Metrics: rewards = beta * (pi - ref) for chosen and rejected (with ipo's means),
margin = chosen - rejected, accuracy = mean(margin > 0); policy_*_logps are the log-probs the loss reads (sums,
means for ipo and orpo). For orpo, as XTuner and TRL log them: rewards = beta * mean log-probs and accuracy =
mean(log odds chosen > log odds rejected), plus nll_loss, log_odds_chosen / _rejected, log_odds_ratio and
odds_ratio_loss.

At init (b = 0) the policy equals the reference, so h = z = 0: sigmoid and robust give log 2, hinge 1, ipo
1 / (4 beta^2), sppo_hard 1 / (2 beta^2), nca_pair 2 log 2, kto_pair 1 / 2. `make_dpo_eval` computes the same sums without a gradient for held-out pairs (finetune.dpo_eval),
so training and evaluation share one loss.
"""
from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from internlm_jax.config import ModelConfig
from internlm_jax.lora import LoraConfig, apply_lora, warn_if_dropout
from internlm_jax.model import forward
from internlm_jax.quant_nf4 import gather_embedding
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules, constrain
from internlm_jax.train.finetune_step import accumulate, apply_update
from internlm_jax.train.orpo import orpo_loss
from internlm_jax.train.state import TrainState
from internlm_jax.train.step import BATCH_KEYS


LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sppo_hard", "nca_pair", "kto_pair", "orpo")
SMOOTHED = ("sigmoid", "robust")  # the loss types that read label_smoothing
MEAN_LOGPS = ("ipo", "orpo")      # the loss types that read mean log-probs per response token
REFERENCE_FREE = ("orpo",)


def settings_error(loss_type: str, beta: float, label_smoothing: float) -> str | None:
  """What is wrong with these settings, as one line starting with the setting's name; None when nothing is."""
  if loss_type not in LOSS_TYPES:
    return f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}"
  if not beta > 0:
    return f"beta must be positive, got {beta}"
  if loss_type in SMOOTHED and not 0.0 <= label_smoothing < 0.5:
    return f"label_smoothing must be in [0, 0.5) for loss_type {loss_type!r}, got {label_smoothing}"
  if loss_type not in SMOOTHED and label_smoothing != 0:
    return (f"label_smoothing must be 0 for loss_type {loss_type!r} (only {SMOOTHED} smooth labels), "
            f"got {label_smoothing}")
  return None


def sequence_logps(params, rows, config: ModelConfig, rules: ShardingRules | None = DEFAULT_RULES) -> jax.Array:
  """float32 [N]: sum over each row's loss positions of log p(target | prefix)."""
  chex.assert_equal_shape([rows["tokens"], rows["targets"], rows["loss_mask"]])
  params, tokens = gather_embedding(params, rows["tokens"])  # a quantized (QLoRA) embedding
  logits = forward(params, tokens, config, segment_ids=rows["segment_ids"], positions=rows["positions"],
                   rules=rules)
  token_logps = -optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
  return jnp.sum(token_logps * rows["loss_mask"].astype(jnp.float32), axis=-1)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair (loss, chosen reward, rejected reward), each float32 [P], from log-probs [P]: summed, or for
  loss_type "ipo" the mean per response token (XTuner, TRL). Not "orpo" (reference-free: train.orpo). `valid`
  [P] (1 for a real pair) restricts kto_pair's batch means to real pairs; all pairs count without it."""
  chex.assert_equal_shape([policy_chosen, policy_rejected, ref_chosen, ref_rejected])
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  z = chosen_reward - rejected_reward
  a, b = policy_chosen - ref_chosen, policy_rejected - ref_rejected
  if loss_type == "sigmoid":
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  elif loss_type == "robust":
    loss = ((-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)) /
            (1.0 - 2.0 * label_smoothing))
  elif loss_type == "hinge":
    loss = jax.nn.relu(1.0 - z)
  elif loss_type == "ipo":
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    loss = (h - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == "sppo_hard":
    loss = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
  elif loss_type == "nca_pair":
    loss = (-jax.nn.log_sigmoid(chosen_reward) - 0.5 * jax.nn.log_sigmoid(-chosen_reward)
            - 0.5 * jax.nn.log_sigmoid(-rejected_reward))
  elif loss_type == "kto_pair":
    weights = jnp.ones_like(a) if valid is None else valid.astype(a.dtype)
    mean = lambda x: jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)  # noqa: E731
    kl_chosen, kl_rejected = jnp.maximum(mean(a), 0.0), jnp.maximum(mean(b), 0.0)
    loss = ((1.0 - jax.nn.sigmoid(beta * (a - kl_rejected))) + (1.0 - jax.nn.sigmoid(beta * (kl_chosen - b)))) / 2
  else:
    raise ValueError(f"dpo_loss: loss_type must be one of {LOSS_TYPES[:-1]}, got {loss_type!r}")
  return loss, jax.lax.stop_gradient(chosen_reward), jax.lax.stop_gradient(rejected_reward)


def _pairs(batch):
  """chosen and rejected rows stacked into one [2P, T] batch: one forward pass for both."""
  fields = {k: jnp.concatenate([batch["chosen"][k], batch["rejected"][k]]) for k in BATCH_KEYS}
  has_c = jnp.sum(batch["chosen"]["loss_mask"], axis=-1) > 0
  has_r = jnp.sum(batch["rejected"]["loss_mask"], axis=-1) > 0
  return fields, (has_c & has_r).astype(jnp.float32)


def dpo_sums(config: ModelConfig, lcfg: LoraConfig, base, beta: float, label_smoothing: float,
             rules: ShardingRules | None, loss_type: str = "sigmoid"):
  """loss_fn(adapters, batch) -> (loss sum, (pairs, metric sums)) for `finetune_step.accumulate`."""
  def fn(adapters, batch):
    rows, valid = _pairs(batch)
    P = valid.shape[0]
    policy = sequence_logps(apply_lora(base, adapters, lcfg), rows, config, rules)
    if loss_type in MEAN_LOGPS:  # per response token; a row without response tokens divides by 1
      tokens = jnp.maximum(jnp.sum(rows["loss_mask"], axis=-1), 1).astype(jnp.float32)
      policy = policy / tokens
    extra, won = {}, None
    if loss_type in REFERENCE_FREE:  # no reference forward at all
      loss, extra = orpo_loss(policy[:P], policy[P:], beta)
      chosen, rejected = jax.lax.stop_gradient(beta * policy[:P]), jax.lax.stop_gradient(beta * policy[P:])
      won = extra["log_odds_ratio"] > 0  # log odds chosen > rejected
    else:
      if "ref_chosen_logps" in batch:
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if loss_type in MEAN_LOGPS:
          ref_c, ref_r = ref_c / tokens[:P], ref_r / tokens[P:]
      else:
        ref = jax.lax.stop_gradient(sequence_logps(base, rows, config, rules))  # adapter off
        if loss_type in MEAN_LOGPS:
          ref = ref / tokens
        ref_c, ref_r = ref[:P], ref[P:]
      loss, chosen, rejected = dpo_loss(policy[:P], policy[P:], ref_c, ref_r, beta, label_smoothing, loss_type,
                                        valid)
    sums = {
        "chosen_reward": jnp.sum(chosen * valid),
        "rejected_reward": jnp.sum(rejected * valid),
        "reward_accuracy": jnp.sum(((chosen > rejected) if won is None else won) * valid),
        "policy_chosen_logps": jnp.sum(jax.lax.stop_gradient(policy[:P]) * valid),
        "policy_rejected_logps": jnp.sum(jax.lax.stop_gradient(policy[P:]) * valid),
    }
    sums.update({k: jnp.sum(v * valid) for k, v in extra.items()})
    return jnp.sum(loss * valid), (jnp.sum(valid), sums)
  return fn


def make_dpo_step(config: ModelConfig, lcfg: LoraConfig, tx: optax.GradientTransformation, *, beta: float = 0.1,
                  label_smoothing: float = 0.0, loss_type: str = "sigmoid", grad_accum: int = 1,
                  rules: ShardingRules | None = DEFAULT_RULES, state_sharding=None, base_sharding=None,
                  batch_sharding=None, lr_schedule: Callable | None = None):
  """jit(step)(state, base, batch) -> (state, metrics); state.params are the adapters (see finetune_step).

  Metrics (means over valid pairs): loss, chosen_reward, rejected_reward, reward_margin, reward_accuracy,
  policy_chosen_logps, policy_rejected_logps (for orpo also nll_loss, log_odds_chosen, log_odds_rejected,
  log_odds_ratio, odds_ratio_loss); plus grad_norm, pairs, finite (and lr).
  """
  error = settings_error(loss_type, beta, label_smoothing)
  if error:
    raise ValueError(f"DPO: {error}")
  warn_if_dropout(lcfg)

  def step(state: TrainState, base, batch):
    fn = dpo_sums(config, lcfg, base, beta, label_smoothing, rules, loss_type)
    loss_sum, pairs, sums, grads = accumulate(fn, state.params, batch, grad_accum, rules)
    new_state, metrics = apply_update(state, tx, loss_sum, pairs, grads)
    denom = jnp.maximum(pairs, 1.0)
    metrics.update({k: v / denom for k, v in sums.items()})
    metrics["reward_margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
    metrics["pairs"] = pairs
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_sharding, base_sharding, batch_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)


def make_dpo_eval(config: ModelConfig, lcfg: LoraConfig, *, beta: float = 0.1, label_smoothing: float = 0.0,
                  loss_type: str = "sigmoid", grad_accum: int = 1, rules: ShardingRules | None = DEFAULT_RULES):
  """jit(fn)(base, adapters, batch) -> (loss sum, pairs, {metric: sum}) over the batch's valid pairs.

  The training step's per-pair loss and metric sums (`dpo_sums`, no LoRA dropout) without a gradient; sums, not
  means, so a caller adds batches and divides once. `grad_accum` micro-batches (split as in training) keep the
  activations and [2P/M, T, V] logits to a training micro-batch's size.
  """
  def fn(base, adapters, batch):
    sums_fn = dpo_sums(config, lcfg, base, beta, label_smoothing, rules, loss_type)

    def sums(rows):
      loss_sum, (pairs, metric_sums) = sums_fn(adapters, rows)
      return loss_sum, pairs, metric_sums

    if grad_accum == 1:
      return sums(batch)

    def split(x):
      x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
      return constrain(x, (None, "batch", "seq")[:x.ndim], rules)

    micro = jax.tree.map(split, batch)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(sums, jax.tree.map(lambda x: x[0], micro)))
    out, _ = jax.lax.scan(lambda carry, mb: (jax.tree.map(jnp.add, carry, sums(mb)), None), zeros, micro)
    return out
  return jax.jit(fn)


def make_reference_logps(config: ModelConfig, rules: ShardingRules | None = DEFAULT_RULES):
  """jit(fn)(base, batch) -> (ref_chosen_logps [P], ref_rejected_logps [P]) to precompute the reference once:
  summed log-probs for every loss type (the step divides them by the token counts for ipo; orpo needs none)."""
  def fn(base, batch):
    rows, _ = _pairs(batch)
    ref = sequence_logps(base, rows, config, rules)
    P = ref.shape[0] // 2
    return ref[:P], ref[P:]
  return jax.jit(fn)
