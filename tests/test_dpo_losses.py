"""Preference losses besides sigmoid DPO (config.dpo.loss_type robust, hinge, ipo, sppo_hard, nca_pair, kto_pair
and the reference-free orpo): each against a float64 numpy reference written from the papers' / TRL's formulas
(values, and gradients against finite differences), the sigmoid default unchanged, log1mexp's accuracy. The step,
held-out evaluation and config checks are in test_dpo_losses_model.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.train.dpo import dpo_loss
from internlm_jax.train.orpo import log1mexp, log_odds, orpo_loss


# ---- float64 references ------------------------------------------------------------------------------------
def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_dpo(loss_type, pc, pr, rc, rr, beta, eps):
  """TRL's DPOTrainer.dpo_loss / XTuner's DPO.compute_loss, with logits = (pc - pr) - (rc - rr)."""
  h = (pc - pr) - (rc - rr)
  if loss_type == "sigmoid":  # Rafailov et al. 2023 eq. 7; eps > 0: cDPO (Mitchell, 2023)
    return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
  if loss_type == "robust":  # Chowdhury et al. 2024 (rDPO)
    return (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps)
  if loss_type == "hinge":  # RSO, Liu et al. 2023
    return np.maximum(0.0, 1 - beta * h)
  if loss_type == "ipo":  # Azar et al. 2023 eq. 17 (beta = tau), on mean token log-probs
    return (h - 1 / (2 * beta)) ** 2
  raise AssertionError(loss_type)


def _np_orpo(xc, xr, beta):
  """ORPO (Hong et al. 2024, eqs. 4-7) with P(y|x) = exp(mean token log-prob): (loss, log odds c, log odds r)."""
  pc, pr = np.exp(xc), np.exp(xr)
  odds_c, odds_r = np.log(pc / (1 - pc)), np.log(pr / (1 - pr))
  return -xc - beta * _log_sigmoid(odds_c - odds_r), odds_c, odds_r


def _finite_diff(f, args, i, h=1e-6):
  """d sum(f(*args)) / d args[i], elementwise, by central differences in float64."""
  out = np.zeros_like(args[i])
  for j in range(args[i].size):
    up, down = [a.copy() for a in args], [a.copy() for a in args]
    up[i].flat[j] += h
    down[i].flat[j] -= h
    out.flat[j] = (np.sum(f(*up)) - np.sum(f(*down))) / (2 * h)
  return out


LOSSES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]


@pytest.mark.parametrize("loss_type,eps", LOSSES)
def test_dpo_losses_match_reference_values_and_gradients(loss_type, eps):
  rng = np.random.default_rng(1)
  if loss_type == "ipo":  # mean log-probs per token
    logps = [rng.uniform(-3.0, -0.1, 6) for _ in range(4)]
  else:
    logps = [rng.normal(-20, 3, 6) for _ in range(4)]
  beta = 0.3
  if loss_type == "hinge":  # away from the kink, where a finite difference would straddle it
    assert np.min(np.abs(beta * ((logps[0] - logps[1]) - (logps[2] - logps[3])) - 1)) > 1e-3
  args32 = [jnp.asarray(x, jnp.float32) for x in logps]
  x64 = [np.asarray(a, np.float64) for a in args32]  # the float32 inputs, exactly
  loss, chosen, rejected = dpo_loss(*args32, beta, eps, loss_type)
  np.testing.assert_allclose(loss, _np_dpo(loss_type, *x64, beta, eps), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chosen, beta * (x64[0] - x64[2]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rejected, beta * (x64[1] - x64[3]), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda c, r: jnp.sum(dpo_loss(c, r, args32[2], args32[3], beta, eps, loss_type)[0]),
                   argnums=(0, 1))(args32[0], args32[1])
  ref = lambda *a: _np_dpo(loss_type, *a, beta, eps)
  for i in (0, 1):
    np.testing.assert_allclose(grads[i], _finite_diff(ref, x64, i), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], -np.asarray(grads[0]), rtol=1e-6)  # each loss is a function of h
  h = (x64[0] - x64[1]) - (x64[2] - x64[3])
  if loss_type == "ipo":  # a target margin: descent moves h to 1 / (2 beta) from either side
    target = 1 / (2 * beta)
    assert np.any(h > target) and np.any(h < target)
    np.testing.assert_array_equal(np.sign(grads[0]), np.sign(h - target))
  elif eps == 0 or loss_type == "robust":  # descent raises pi_c and lowers pi_r (cDPO stops at a finite margin)
    assert np.all(np.asarray(grads[0]) <= 0)


def _np_pair_losses(loss_type, pc, pr, rc, rr, beta, valid=None):
  """TRL's DPOTrainer.dpo_loss for sppo_hard, nca_pair and kto_pair (its 2P losses averaged per pair)."""
  a, b = pc - rc, pr - rr
  if loss_type == "sppo_hard":  # Wu et al. 2024
    return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
  if loss_type == "nca_pair":  # Chen et al. 2024
    return -_log_sigmoid(beta * a) - 0.5 * _log_sigmoid(-beta * a) - 0.5 * _log_sigmoid(-beta * b)
  if loss_type == "kto_pair":  # HALOs eq. 7: each side's KL estimated from the other half of the batch
    w = np.ones_like(a) if valid is None else valid.astype(np.float64)
    kl_c, kl_r = max(np.sum(a * w) / np.sum(w), 0.0), max(np.sum(b * w) / np.sum(w), 0.0)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    return ((1 - sig(beta * (a - kl_r))) + (1 - sig(beta * (kl_c - b)))) / 2
  raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["sppo_hard", "nca_pair", "kto_pair"])
def test_pair_losses_match_reference_values_and_gradients(loss_type):
  """Losses that read the chosen and rejected log-ratios apart (not only their difference): values, and gradients
  by finite differences; kto_pair's batch means over the valid pairs only (the last pair is padding)."""
  rng = np.random.default_rng(2)
  x64 = [np.asarray(jnp.asarray(rng.normal(-20, 3, 6), jnp.float32), np.float64) for _ in range(4)]
  x64[0][:3] = x64[2][:3] + rng.uniform(0.5, 3.0, 3)   # some chosen log-ratios above 0, so KL_c > 0 for kto_pair
  args32 = [jnp.asarray(x, jnp.float32) for x in x64]
  x64 = [np.asarray(a, np.float64) for a in args32]
  valid = np.arange(6) < 5
  beta = 0.3
  loss = dpo_loss(*args32, beta, 0.0, loss_type, valid=jnp.asarray(valid))[0]
  ref = lambda *a: _np_pair_losses(loss_type, *a, beta, valid) * valid  # noqa: E731
  np.testing.assert_allclose(np.asarray(loss) * valid, ref(*x64), rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda c, r: jnp.sum(dpo_loss(c, r, args32[2], args32[3], beta, 0.0, loss_type,
                                                 valid=jnp.asarray(valid))[0] * valid), argnums=(0, 1))(*args32[:2])
  for i in (0, 1):
    np.testing.assert_allclose(grads[i], _finite_diff(ref, x64, i), rtol=2e-4, atol=1e-6)
  g_c, g_r = np.asarray(grads[0])[:5], np.asarray(grads[1])[:5]
  a, b = (x64[0] - x64[2])[:5], (x64[1] - x64[3])[:5]
  if loss_type == "sppo_hard":   # targets: the chosen log-ratio to 1 / (2 beta), the rejected one to -1 / (2 beta)
    assert np.any(a > 0.5 / beta) and np.any(a < 0.5 / beta)
    np.testing.assert_array_equal(np.sign(g_c), np.sign(a - 0.5 / beta))
    np.testing.assert_array_equal(np.sign(g_r), np.sign(b + 0.5 / beta))
  elif loss_type == "nca_pair":  # always lowers the rejected log-ratio; the chosen one rises up to sigmoid = 2 / 3
    assert np.all(g_r > 0)
    np.testing.assert_array_equal(np.sign(g_c), np.sign(1.5 / (1 + np.exp(-beta * a)) - 1))
  else:                          # kto_pair: always raises the chosen log-ratio
    assert np.all(g_c < 0)
  x = jnp.full((3,), -7.0)
  want = {"sppo_hard": 1 / (2 * beta ** 2), "nca_pair": 2 * math.log(2), "kto_pair": 0.5}[loss_type]
  np.testing.assert_allclose(dpo_loss(x, x, x, x, beta, 0.0, loss_type)[0], want, rtol=1e-6)


def test_loss_values_at_the_reference_and_robust_without_noise():
  """Policy == reference (h = 0): sigmoid and robust log 2, hinge 1, ipo 1 / (4 beta^2); robust with eps = 0 is
  sigmoid exactly."""
  x = jnp.full((3,), -7.0)
  beta = 0.2
  for loss_type, want in (("sigmoid", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0),
                          ("ipo", 1 / (4 * beta ** 2))):
    np.testing.assert_allclose(dpo_loss(x, x, x, x, beta, 0.0, loss_type)[0], want, rtol=1e-6)
  z = jnp.asarray(np.random.default_rng(0).normal(0, 5, 8), jnp.float32)
  zero = jnp.zeros_like(z)
  np.testing.assert_array_equal(dpo_loss(z, zero, zero, zero, 0.7, 0.0, "robust")[0],
                                dpo_loss(z, zero, zero, zero, 0.7, 0.0)[0])
  with pytest.raises(ValueError, match="loss_type must be one of"):
    dpo_loss(x, x, x, x, beta, 0.0, "orpo")  # reference-free: train.orpo, not a function of reference log-probs


def _previous_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
  """train.dpo.dpo_loss before loss types were added, verbatim."""
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  z = chosen_reward - rejected_reward
  loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return loss, jax.lax.stop_gradient(chosen_reward), jax.lax.stop_gradient(rejected_reward)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sigmoid_default_is_bit_identical_to_before(eps):
  rng = np.random.default_rng(2)
  args = [jnp.asarray(rng.normal(-20, 3, 7), jnp.float32) for _ in range(4)]
  for wrap in (lambda f: f, jax.jit):
    new = wrap(lambda *a: dpo_loss(*a, 0.3, eps))(*args)
    old = wrap(lambda *a: _previous_dpo_loss(*a, 0.3, eps))(*args)
    for got, want in zip(new, old):
      np.testing.assert_array_equal(got, want)
  grad = lambda f: jax.jit(jax.grad(lambda c, r: jnp.sum(f(c, r, args[2], args[3], 0.3, eps)[0]), (0, 1)))(
      args[0], args[1])
  for got, want in zip(grad(dpo_loss), grad(_previous_dpo_loss)):
    np.testing.assert_array_equal(got, want)


# ---- ORPO -------------------------------------------------------------------------------------------------
def test_orpo_loss_matches_reference_values_and_gradients():
  rng = np.random.default_rng(3)
  xc32, xr32 = (jnp.asarray(rng.uniform(-3.0, -0.05, 6), jnp.float32) for _ in range(2))
  xc, xr = np.asarray(xc32, np.float64), np.asarray(xr32, np.float64)
  beta = 0.25
  loss, metrics = orpo_loss(xc32, xr32, beta)
  want, odds_c, odds_r = _np_orpo(xc, xr, beta)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["log_odds_chosen"], odds_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["log_odds_rejected"], odds_r, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["log_odds_ratio"], odds_c - odds_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["odds_ratio_loss"], -_log_sigmoid(odds_c - odds_r), rtol=1e-5)
  np.testing.assert_allclose(metrics["nll_loss"], -xc, rtol=1e-6)
  grads = jax.grad(lambda c, r: jnp.sum(orpo_loss(c, r, beta)[0]), argnums=(0, 1))(xc32, xr32)
  ref = lambda c, r: _np_orpo(c, r, beta)[0]
  for i in (0, 1):
    np.testing.assert_allclose(grads[i], _finite_diff(ref, [xc, xr], i), rtol=2e-4, atol=1e-6)
  assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) > 0)


def test_log1mexp_is_accurate_near_zero_and_far_below():
  xs = np.array([-1e-30, -1e-20, -1e-10, -1e-7, -1e-5, -1e-3, -0.3, -math.log(2), -0.7, -1.0, -5.0, -20.0, -50.0,
                 -80.0, -100.0, -1000.0, -1e30], np.float32)
  x64 = xs.astype(np.float64)
  # float64 references, each form where it does not cancel (the split at -1, not -log 2, and 29 more bits):
  # log(1 - e^x) = log(-expm1(x)) = log1p(-e^x); d/dx = -e^x / (1 - e^x) = -1 / expm1(-x).
  with np.errstate(over="ignore", divide="ignore"):
    want = np.where(x64 > -1.0, np.log(-np.expm1(np.minimum(x64, -1e-300))), np.log1p(-np.exp(x64)))
    want_grad = -1.0 / np.expm1(-x64)
  got = np.asarray(jax.jit(log1mexp)(jnp.asarray(xs)), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-37)  # atol: exp(x) below float32's normal range
  grad = np.asarray(jax.jit(jax.vmap(jax.grad(log1mexp)))(jnp.asarray(xs)), np.float64)
  assert np.all(np.isfinite(grad))  # the branch not taken contributes no nan
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-37)
  # What the helper is for: the naive form is -inf at -1e-10 and off by 5% at -1e-7 in float32.
  naive = np.asarray(jnp.log1p(-jnp.exp(jnp.asarray(xs[2:4]))))
  assert naive[0] == -np.inf and abs(naive[1] / want[3] - 1) > 1e-3
  # log odds: P = 1 exactly (a mean log-prob of 0, or a row with no response tokens) stays finite.
  at_one, slope = jax.value_and_grad(lambda x: log_odds(x))(jnp.float32(0.0))
  assert np.isfinite(at_one) and at_one > 80 and np.isfinite(slope)
  np.testing.assert_allclose(log_odds(jnp.float32(-math.log(2))), 0.0, atol=1e-6)  # P = 1/2: even odds
