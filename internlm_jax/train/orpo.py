"""ORPO (Hong, Lee and Thorne, 2024: "ORPO: Monolithic Preference Optimization without Reference Model"): SFT and
preference alignment in one loss, with no reference model, so no reference forward pass.

Per pair, with x = the response's mean log-prob per token (the paper's length-normalized likelihood
P(y|x) = exp(x), as XTuner's ORPO and TRL's ORPOTrainer compute it):

  log odds(y) = log(P / (1 - P)) = x - log(1 - exp(x))          (x < 0; log(1 - exp(x)) by `log1mexp`)
  ratio       = log odds(chosen) - log odds(rejected)
  loss        = -x_chosen + beta * (-log sigmoid(ratio))        (NLL of the chosen response + beta * L_OR)

beta is the paper's lambda (XTuner's and TRL's default 0.1). XTuner and TRL take the NLL as one token mean over
every chosen token of the batch; here it is each pair's own token mean, averaged over pairs like every other
preference loss (train.dpo), so a pair weighs the same in any batch and gradient accumulation changes nothing.
"""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

_MINUS_LOG2 = -math.log(2.0)


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x <= 0, to float precision everywhere (Maechler, 2012, "Accurately Computing
  log(1 - exp(-|a|))"): log(-expm1(x)) above -log 2, where 1 - exp(x) would cancel, and log1p(-exp(x)) below,
  where exp(x) is small. Each branch only sees inputs it computes well, so the gradient of the branch not taken
  is never inf * 0 = nan. log1mexp(0) = -inf."""
  near_zero = x > _MINUS_LOG2
  near = jnp.log(-jnp.expm1(jnp.where(near_zero, x, _MINUS_LOG2)))
  far = jnp.log1p(-jnp.exp(jnp.where(near_zero, _MINUS_LOG2, x)))
  return jnp.where(near_zero, near, far)


def log_odds(mean_logps: jax.Array) -> jax.Array:
  """log(P / (1 - P)) with log P = mean_logps. A mean of exactly 0 (P = 1 in float32, or a row with no response
  tokens) is taken as the largest float below 0, so the odds stay finite (about +87) and the gradient too."""
  x = jnp.minimum(mean_logps, -jnp.finfo(mean_logps.dtype).tiny)
  return x - log1mexp(x)


def orpo_loss(chosen: jax.Array, rejected: jax.Array, beta: float) -> tuple[jax.Array, dict]:
  """(per-pair loss, per-pair metrics) from mean token log-probs [P]; the metrics carry no gradient:
  nll_loss (-chosen), log_odds_chosen, log_odds_rejected, log_odds_ratio (their difference) and odds_ratio_loss
  (-log sigmoid(log_odds_ratio), before the beta weight)."""
  chex.assert_equal_shape([chosen, rejected])
  odds_chosen, odds_rejected = log_odds(chosen), log_odds(rejected)
  ratio = odds_chosen - odds_rejected
  odds_ratio_loss = -jax.nn.log_sigmoid(ratio)
  nll = -chosen
  loss = nll + beta * odds_ratio_loss
  metrics = {"nll_loss": nll, "log_odds_chosen": odds_chosen, "log_odds_rejected": odds_rejected,
             "log_odds_ratio": ratio, "odds_ratio_loss": odds_ratio_loss}
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
