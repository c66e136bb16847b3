"""DPO: the loss and its gradients against a small reference computation, log 2 at init, learning the preference,
precomputed reference log-probs, padding pairs ignored."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax import PRESETS, forward, init_params
from internlm_jax import lora as L
from internlm_jax.train import OptimizerConfig, make_optimizer
from internlm_jax.train.dpo import dpo_loss, make_dpo_step, make_reference_logps, sequence_logps
from internlm_jax.train.finetune_step import create_adapter_state

CONFIG = PRESETS["tiny"]
LCFG = L.LoraConfig(rank=4, alpha=8.0, targets=("wqkv", "w2", "output"))


def _np_dpo(pc, pr, rc, rr, beta, eps):
  z = beta * ((pc - rc) - (pr - rr))
  log_sig = lambda x: -np.log1p(np.exp(-x))
  return -(1 - eps) * log_sig(z) - eps * log_sig(-z)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_and_gradients_match_reference(eps):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 3, 5).astype(np.float32) for _ in range(4))
  beta = 0.3
  loss, chosen, rejected = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta, eps)
  np.testing.assert_allclose(loss, _np_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-5)
  np.testing.assert_allclose(chosen - rejected, beta * ((pc - rc) - (pr - rr)), rtol=1e-5, atol=1e-5)
  # d loss / d pi_c = -beta * ((1 - eps) * sigmoid(-z) - eps * sigmoid(z)), and the opposite for pi_r.
  grad_c, grad_r = jax.grad(lambda c, r: jnp.sum(dpo_loss(c, r, rc, rr, beta, eps)[0]), argnums=(0, 1))(pc, pr)
  z = beta * ((pc - rc) - (pr - rr))
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = -beta * ((1 - eps) * sig(-z) - eps * sig(z))
  np.testing.assert_allclose(grad_c, want, rtol=1e-4)
  np.testing.assert_allclose(grad_r, -want, rtol=1e-4)
  if eps == 0.0:
    assert np.all(grad_c < 0) and np.all(grad_r > 0)  # descent raises chosen and lowers rejected log-probs


def _rows(tokens, prompt_len):
  B, T1 = tokens.shape
  T = T1 - 1
  mask = np.zeros((B, T), np.int32)
  mask[:, prompt_len - 1:] = 1  # positions whose target is a response token
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "loss_mask": mask}


def _pairs(P=4, T=12, prompt_len=6, seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(3, CONFIG.vocab_size, (P, prompt_len))
  chosen = np.concatenate([prompt, rng.integers(3, 50, (P, T + 1 - prompt_len))], 1).astype(np.int32)
  rejected = np.concatenate([prompt, rng.integers(50, 100, (P, T + 1 - prompt_len))], 1).astype(np.int32)
  return {"chosen": _rows(chosen, prompt_len), "rejected": _rows(rejected, prompt_len)}


@pytest.fixture(scope="module")
def base():
  return init_params(CONFIG, jax.random.key(0))


def test_sequence_logps_reference(base):
  rows = _pairs()["chosen"]
  got = sequence_logps(base, rows, CONFIG, rules=None)
  logits = np.asarray(forward(base, jnp.asarray(rows["tokens"]), CONFIG), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(got, (picked * rows["loss_mask"]).sum(-1), rtol=1e-5)


def test_dpo_step_starts_at_log2_and_learns_the_preference(base):
  tx = make_optimizer(OptimizerConfig(learning_rate=5e-3, warmup_steps=0, total_steps=20, weight_decay=0.0))
  state = create_adapter_state(L.init_lora(CONFIG, LCFG, jax.random.key(1)), tx)
  step = make_dpo_step(CONFIG, LCFG, tx, beta=0.5, rules=None)
  batch = _pairs()
  batch["chosen"]["loss_mask"][3] = 0  # a padding pair: no response tokens, so it counts for nothing
  state, first = step(state, base, batch)
  assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)
  assert float(first["reward_margin"]) == 0.0 and float(first["pairs"]) == 3.0
  # A precomputed reference gives the same step.
  ref_c, ref_r = make_reference_logps(CONFIG, rules=None)(base, batch)
  state2 = create_adapter_state(L.init_lora(CONFIG, LCFG, jax.random.key(1)), tx)
  _, again = step(state2, base, dict(batch, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r))
  for k in ("loss", "grad_norm", "policy_chosen_logps"):
    np.testing.assert_allclose(again[k], first[k], rtol=1e-6)
  for _ in range(5):
    state, metrics = step(state, base, batch)
  assert float(metrics["loss"]) < math.log(2) - 0.1
  assert float(metrics["reward_margin"]) > 0 and float(metrics["reward_accuracy"]) == 1.0
  assert float(metrics["chosen_reward"]) > float(metrics["rejected_reward"])
  np.testing.assert_allclose(metrics["reward_margin"], metrics["chosen_reward"] - metrics["rejected_reward"])


def test_dpo_rejects_bad_beta():
  tx = make_optimizer(OptimizerConfig())
  with pytest.raises(ValueError, match="beta must be positive"):
    make_dpo_step(CONFIG, LCFG, tx, beta=0.0)
