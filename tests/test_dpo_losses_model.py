"""Preference losses on a tiny model: held-out evaluation against references (ipo on mean log-probs, ORPO's
metrics), precomputed reference sums, no reference forward for ORPO, the config checks, and (slow) the ORPO step
and fine-tuning runs end to end. The loss formulas themselves: test_dpo_losses.py."""
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
from internlm_jax.train import OptimizerConfig, make_optimizer
from internlm_jax.train import dpo as dpo_lib
from internlm_jax.train.dpo import make_dpo_eval, make_dpo_step, sequence_logps
from internlm_jax.train.finetune_step import create_adapter_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import dpo_lora_tiny  # noqa: E402
from test_dpo_eval import random_base_and_adapters  # noqa: E402
from test_dpo_losses import _log_sigmoid, _np_dpo, _np_orpo, _np_pair_losses  # noqa: E402
from test_finetune_loop import _cfg as loop_cfg, _records as loop_records, setup  # noqa: E402,F401 (fixture)

CONFIG = config_lib.get_preset("tiny").replace(num_layers=1, vocab_size=128)
LCFG = L.LoraConfig(rank=2, alpha=4.0, targets=("wqkv", "w2", "output"))


# ---- the step and held-out evaluation on a tiny model --------------------------------------------------------
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
  base, adapters = random_base_and_adapters()
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
