"""Preference losses besides sigmoid DPO (config.dpo.loss_type robust, hinge, ipo and the reference-free orpo):
each against a float64 numpy reference written from the papers' / TRL's formulas (values, and gradients against
finite differences), the sigmoid default unchanged, the step and held-out evaluation on a tiny model (ipo on mean
log-probs, ORPO's metrics, no reference forward for ORPO), log1mexp's accuracy, the config checks, and (slow)
fine-tuning runs end to end."""
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax import config as config_lib
from internlm_jax import lora as L
from internlm_jax.config import ConfigError
from internlm_jax.finetune import dpo_eval, loop
from internlm_jax.model import ParamSpec, param_specs
from internlm_jax.train import OptimizerConfig, make_optimizer
from internlm_jax.train import dpo as dpo_lib
from internlm_jax.train.dpo import dpo_loss, make_dpo_eval, make_dpo_step, sequence_logps
from internlm_jax.train.finetune_step import create_adapter_state
from internlm_jax.train.orpo import log1mexp, log_odds, orpo_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import dpo_lora_tiny  # noqa: E402
from test_finetune_loop import _cfg as loop_cfg, _records as loop_records, setup  # noqa: E402,F401 (fixture)

CONFIG = config_lib.get_preset("tiny").replace(num_layers=1, vocab_size=128)
LCFG = L.LoraConfig(rank=2, alpha=4.0, targets=("wqkv", "w2", "output"))


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


# ---- the step and held-out evaluation on a tiny model --------------------------------------------------------
def _random_tree(tree, rng, scale):
  return jax.tree.map(lambda s: rng.normal(0, scale, s.shape).astype(np.float32), tree,
                      is_leaf=lambda x: isinstance(x, ParamSpec))


def _pair_rows(P=5, T=10, seed=0):
  """{"chosen", "rejected"} rows of P pairs with responses of different lengths; pair P-1 is padding."""
  rng = np.random.default_rng(seed)
  out = {}
  for side, prompt_len in (("chosen", 4), ("rejected", 6)):
    tokens = rng.integers(3, CONFIG.vocab_size, (P, T + 1))
    tokens[:, :4] = np.arange(3, 7)  # one prompt for every pair
    mask = np.zeros((P, T), np.int32)
    mask[:, prompt_len - 1:] = 1
    out[side] = {"tokens": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                 "segment_ids": np.ones((P, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (P, 1)),
                 "loss_mask": mask}
  out["chosen"]["loss_mask"][P - 1] = 0
  return out


@pytest.fixture(scope="module")
def model():
  """(base, adapters with B != 0, pair rows, per-row float64 policy / reference log-prob sums and token counts)."""
  rng = np.random.default_rng(0)
  base = _random_tree(param_specs(CONFIG), rng, 0.5)
  base = jax.tree.map(lambda x, s: np.ones_like(x) if s.init == "ones" else x, base, param_specs(CONFIG),
                      is_leaf=lambda x: isinstance(x, np.ndarray))
  base, adapters = jax.device_put((base, _random_tree(L.lora_specs(CONFIG, LCFG), rng, 0.3)), jax.devices()[0])
  rows = _pair_rows()
  both = {k: np.concatenate([rows["chosen"][k], rows["rejected"][k]]) for k in rows["chosen"]}
  policy, ref = jax.jit(lambda b, a, r: (sequence_logps(L.apply_lora(b, a, LCFG), r, CONFIG, rules=None),
                                         sequence_logps(b, r, CONFIG, rules=None)))(base, adapters, both)
  counts = both["loss_mask"].sum(-1).astype(np.float64)
  return base, adapters, rows, np.asarray(policy, np.float64), np.asarray(ref, np.float64), counts


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust", "nca_pair", "orpo"])
def test_heldout_metrics_match_reference(model, loss_type):
  """make_dpo_eval (the training step's dpo_sums without a gradient) over batches with a padding pair."""
  base, adapters, rows, policy, ref, counts = model
  P, beta, eps = 5, 0.5, 0.1 if loss_type == "robust" else 0.0
  valid = np.arange(P) < P - 1
  if loss_type in ("ipo", "orpo"):  # mean log-prob per response token (the padding pair's 0 / 0 is dropped)
    with np.errstate(invalid="ignore"):
      policy, ref = policy / counts, ref / counts
  pc, pr, rc, rr = (x[valid] for x in (policy[:P], policy[P:], ref[:P], ref[P:]))
  if loss_type == "orpo":
    loss, odds_c, odds_r = _np_orpo(pc, pr, beta)
    chosen, rejected, won = beta * pc, beta * pr, odds_c > odds_r
  else:
    if loss_type == "nca_pair":
      loss = _np_pair_losses(loss_type, pc, pr, rc, rr, beta)
    else:
      loss = _np_dpo(loss_type, pc, pr, rc, rr, beta, eps)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    won = chosen > rejected
  want = {"loss": loss.mean(), "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
          "reward_margin": (chosen - rejected).mean(), "reward_accuracy": won.mean(),
          "policy_chosen_logps": pc.mean(), "policy_rejected_logps": pr.mean()}
  if loss_type == "orpo":
    want.update(nll_loss=-pc.mean(), log_odds_chosen=odds_c.mean(), log_odds_rejected=odds_r.mean(),
                log_odds_ratio=(odds_c - odds_r).mean(), odds_ratio_loss=-_log_sigmoid(odds_c - odds_r).mean())
  assert 0 < want["reward_accuracy"] < 1  # pairs won and lost: the accuracy is not trivially right
  fn = make_dpo_eval(CONFIG, LCFG, beta=beta, label_smoothing=eps, loss_type=loss_type, rules=None)
  got = dpo_eval.evaluate_pairs(fn, base, adapters, rows, batch_size=2, pad_id=0)  # 3 batches, the last padded
  assert got["pairs"] == 4 and got["reward_accuracy"] == want["reward_accuracy"]
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=2e-5, atol=1e-5, err_msg=k)
  record = dpo_eval.eval_record(got)
  extra = set(dpo_eval.ORPO_METRICS) if loss_type == "orpo" else set()
  assert set(record) == {f"eval_{k}" for k in (*dpo_eval.METRICS, *extra)} | {"eval_pairs"}


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid"])
def test_precomputed_reference_sums_give_the_reference_forwards_loss(monkeypatch, loss_type):
  """make_reference_logps' sums in the batch are averaged per token for ipo as the reference forward's are.
  Log-probs stand in for the model here (apply_lora and sequence_logps replaced), so nothing compiles."""
  rows = _pair_rows()
  both = {k: np.concatenate([rows["chosen"][k], rows["rejected"][k]]) for k in rows["chosen"]}
  rng = np.random.default_rng(4)
  sums = {"policy": rng.normal(-20, 3, 10).astype(np.float32), "base": rng.normal(-20, 3, 10).astype(np.float32)}
  monkeypatch.setattr(dpo_lib, "apply_lora", lambda base, adapters, lcfg: "policy")
  monkeypatch.setattr(dpo_lib, "sequence_logps", lambda params, rows, *a: jnp.asarray(sums[params]))
  fn = dpo_lib.dpo_sums(CONFIG, LCFG, "base", 0.5, 0.0, None, loss_type)
  loss_fwd, (pairs, metrics_fwd) = fn(None, rows)
  loss_pre, (_, metrics_pre) = fn(None, dict(rows, ref_chosen_logps=sums["base"][:5],
                                             ref_rejected_logps=sums["base"][5:]))
  assert float(pairs) == 4
  np.testing.assert_allclose(loss_pre, loss_fwd, rtol=1e-6)
  for k in metrics_fwd:
    np.testing.assert_allclose(metrics_pre[k], metrics_fwd[k], rtol=1e-6, err_msg=k)
  counts = both["loss_mask"].sum(-1)
  assert len(set(counts[:4])) == 1 and len(set(counts[5:])) == 1 and counts[0] != counts[5]  # chosen 7, rejected 5
  div = counts.clip(1) if loss_type == "ipo" else np.ones(10)
  pol, ref = sums["policy"] / div, sums["base"] / div
  want = _np_dpo(loss_type, pol[:4], pol[5:9], ref[:4], ref[5:9], 0.5, 0.0).sum()
  np.testing.assert_allclose(loss_fwd, want, rtol=1e-5)


def _count_forwards(monkeypatch, loss_type, base, adapters, batch):
  """How many model forwards one traced DPO step (value and gradient) makes."""
  calls = []
  real = dpo_lib.forward
  monkeypatch.setattr(dpo_lib, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
  tx = make_optimizer(OptimizerConfig(warmup_steps=0, total_steps=10))
  step = make_dpo_step(CONFIG, LCFG, tx, beta=0.1, loss_type=loss_type, rules=None)
  step.trace(create_adapter_state(adapters, tx), base, batch)
  monkeypatch.setattr(dpo_lib, "forward", real)
  return len(calls)


def test_orpo_makes_no_reference_forward(model, monkeypatch):
  base, adapters, rows, *_ = model
  ref = {"ref_chosen_logps": np.zeros(5, np.float32), "ref_rejected_logps": np.zeros(5, np.float32)}
  assert _count_forwards(monkeypatch, "sigmoid", base, adapters, rows) == 2  # policy, then the frozen base
  assert _count_forwards(monkeypatch, "orpo", base, adapters, rows) == 1  # the policy only
  assert _count_forwards(monkeypatch, "orpo", base, adapters, dict(rows, **ref)) == 1  # references ignored


@pytest.mark.slow
def test_orpo_step_learns_the_preference(model):
  """Five ORPO steps (about 8 s on 2 busy cores, most of it compiling the step)."""
  base, _, rows, *_ = model
  tx = make_optimizer(OptimizerConfig(learning_rate=5e-3, warmup_steps=0, total_steps=20, weight_decay=0.0))
  state = create_adapter_state(L.init_lora(CONFIG, LCFG, jax.random.key(1)), tx)
  step = make_dpo_step(CONFIG, LCFG, tx, beta=0.5, loss_type="orpo", rules=None)
  state, first = step(state, base, rows)
  assert float(first["pairs"]) == 4 and bool(first["finite"])
  np.testing.assert_allclose(first["loss"], first["nll_loss"] + 0.5 * first["odds_ratio_loss"], rtol=1e-6)
  for _ in range(4):
    state, metrics = step(state, base, rows)
  assert float(metrics["nll_loss"]) < float(first["nll_loss"])
  assert float(metrics["log_odds_ratio"]) > float(first["log_odds_ratio"])
  assert float(metrics["loss"]) < float(first["loss"])


# ---- configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dpo,message", [
    ({"loss_type": "kto"}, "config.dpo.loss_type must be one of ('sigmoid', 'ipo', 'hinge', 'robust', 'sppo_hard', "
                           "'nca_pair', 'kto_pair', 'orpo'), got 'kto'"),
    ({"beta": 0.0}, "config.dpo.beta must be positive, got 0.0"),
    ({"loss_type": "orpo", "beta": -1.0}, "config.dpo.beta must be positive, got -1.0"),
    ({"loss_type": "robust", "label_smoothing": 0.5},
     "config.dpo.label_smoothing must be in [0, 0.5) for loss_type 'robust', got 0.5"),
    ({"loss_type": "robust", "label_smoothing": -0.1},
     "config.dpo.label_smoothing must be in [0, 0.5) for loss_type 'robust', got -0.1"),
    ({"label_smoothing": 0.5}, "config.dpo.label_smoothing must be in [0, 0.5) for loss_type 'sigmoid', got 0.5"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "config.dpo.label_smoothing must be 0 for loss_type 'ipo'"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "config.dpo.label_smoothing must be 0 for loss_type 'hinge'"),
    ({"loss_type": "orpo", "label_smoothing": 0.1}, "config.dpo.label_smoothing must be 0 for loss_type 'orpo'"),
])
def test_bad_loss_settings_fail_before_the_base_loads(tmp_path, monkeypatch, dpo, message):
  c = dpo_lora_tiny.get_config()
  (tmp_path / "base").mkdir()
  (tmp_path / "base" / "config.json").write_text("{}")
  c.base.checkpoint = str(tmp_path / "base")
  c.dpo.update(dpo)
  monkeypatch.setattr(loop.base_lib, "load_base", lambda *a, **k: pytest.fail("loaded the base"))
  with pytest.raises(ConfigError) as e:
    loop.run(c, str(tmp_path / "work"))
  assert str(e.value).startswith(message) and "\n" not in str(e.value)
  c.method = "lora"  # the dpo settings are only read by method dpo
  loop.validate(c)
  tx = make_optimizer(OptimizerConfig())
  with pytest.raises(ValueError, match=re.escape(message[len("config.dpo."):])):
    make_dpo_step(CONFIG, LCFG, tx, **dict(dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid"), **dpo))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("robust", 0.0),
                                           ("hinge", 0.0), ("ipo", 0.0), ("orpo", 0.0)])
def test_good_loss_settings_validate(tmp_path, loss_type, eps):
  c = dpo_lora_tiny.get_config()
  (tmp_path / "config.json").write_text("{}")
  c.base.checkpoint = str(tmp_path)
  c.dpo.update(loss_type=loss_type, label_smoothing=eps)
  loop.validate(c)
  assert dpo_lora_tiny.get_config().dpo.loss_type == "sigmoid"  # the demo and its numbers are unchanged
  del c.dpo["loss_type"]  # a config written before loss types: sigmoid
  assert loop.dpo_settings(c)["loss_type"] == "sigmoid"


# ---- end to end (slow) -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["ipo", "orpo"])
def test_finetune_runs_with_loss_type(setup, tmp_path, loss_type):
  """experiments/finetune.py's run() with dpo.loss_type on test_finetune_loop's tiny base and pairs, held-out
  pairs evaluated: the loss at step 1 (ipo: 1 / (4 beta^2) with the adapter off), ORPO's metrics logged."""
  root, _ = setup
  over = {"dpo.loss_type": loss_type, "data.eval_paths": str(root / "pairs.jsonl"), "output.hf": False,
          "output.adapter": False}
  summary = loop.run(loop_cfg(setup, "dpo", steps=2, over=over), str(tmp_path))
  records = loop_records(tmp_path)
  assert sorted(records) == [1, 2] and all(np.isfinite(r["loss"]) for r in records.values())
  before, after = summary["heldout_pairs"]["before"], summary["heldout_pairs"]["after"]
  assert after["pairs"] == 8 and before["reward_margin"] is not None
  if loss_type == "ipo":
    assert records[1]["loss"] == pytest.approx(1 / (4 * 0.1 ** 2), rel=1e-5)
    assert before["loss"] == pytest.approx(25.0, rel=1e-5) and before["reward_margin"] == 0
  else:
    assert {"nll_loss", "log_odds_chosen", "log_odds_rejected", "log_odds_ratio", "odds_ratio_loss",
            "eval_log_odds_ratio"} <= set(records[2])
    assert records[1]["loss"] == pytest.approx(records[1]["nll_loss"] + 0.1 * records[1]["odds_ratio_loss"],
                                               rel=1e-5)
