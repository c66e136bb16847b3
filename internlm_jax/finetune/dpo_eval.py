"""Held-out evaluation of DPO (every dpo.loss_type, ORPO too): the training loss and metrics over every held-out
preference pair.

The per-pair math is the training step's (train.dpo.dpo_sums through train.dpo.make_dpo_eval, so there is one
definition of the loss); this module only walks the held-out pairs in order, in batches of the training batch
size, and turns the summed metrics into means. Pairs are read once each, unshuffled; a short final batch is
padded with empty pairs, which count for nothing, so every batch has one shape and the function compiles once.
Batch sums are added on the host in float64: a large held-out set loses no precision to a float32 running sum.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from internlm_jax.data.sft import make_batches

# Per-pair means reported (as eval_NAME in metrics.jsonl), named as the training step's metrics.
METRICS = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin", "policy_chosen_logps",
           "policy_rejected_logps")
# Also reported when the loss gives them (dpo.loss_type "orpo").
ORPO_METRICS = ("nll_loss", "log_odds_chosen", "log_odds_rejected", "log_odds_ratio", "odds_ratio_loss")


def evaluate_pairs(eval_fn, base, adapters, rows, batch_size: int, pad_id: int,
                   to_device: Callable = lambda batch: batch) -> dict:
  """{"pairs": count, METRICS...: mean over the pairs} of `eval_fn` (train.dpo.make_dpo_eval) on DPO rows."""
  loss = pairs = 0.0
  sums: dict[str, float] = {}
  for batch in make_batches(rows, batch_size, pad_id, shuffle=False, num_epochs=1):
    batch_loss, batch_pairs, batch_sums = jax.device_get(eval_fn(base, adapters, to_device(batch)))
    loss += float(batch_loss)
    pairs += float(batch_pairs)
    for k, v in batch_sums.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  denom = max(pairs, 1.0)
  out = {"pairs": int(pairs), "loss": loss / denom}
  out.update({k: v / denom for k, v in sums.items()})
  out["reward_margin"] = out["chosen_reward"] - out["rejected_reward"]
  return out


def eval_record(metrics: dict) -> dict:
  """The metrics.jsonl fields of an evaluation, prefixed as the SFT loop's eval_loss: the means and eval_pairs."""
  names = METRICS + tuple(k for k in ORPO_METRICS if k in metrics)
  return {"eval_pairs": int(metrics["pairs"]), **{f"eval_{k}": float(metrics[k]) for k in names}}


def zero_adapters(adapters):
  """Adapters of the model at step 0 (B = 0: exactly the base) with the same shapes, dtypes and shardings as
  `adapters`, so evaluating them reuses the compiled evaluation."""
  return jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding), adapters)
