"""DPO held-out evaluation: the metrics over a batched held-out set against a numpy reference, one compile for every
batch, the loop's eval_ records, held-out pair data (errors, counted skips, the built-in tasks) and a missing eval
file. The runs end to end (training unchanged by evaluation, the CLI summary) are slow tests in
test_finetune_loop.py."""
import json
import math
import os
import re
import sys
import types

import jax
import numpy as np
import pytest

from internlm_jax import config as config_lib
from internlm_jax import lora as L
from internlm_jax import tokenizer as tk
from internlm_jax.config import ConfigError
from internlm_jax.data.sft import SFTDataError
from internlm_jax.finetune import dpo_eval, loop
from internlm_jax.finetune.data import build_finetune_data
from internlm_jax.model import ParamSpec, param_specs
from internlm_jax.train.dpo import make_dpo_eval, sequence_logps
from internlm_jax.train.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import dpo_lora_tiny  # noqa: E402

CONFIG = config_lib.get_preset("tiny").replace(num_layers=1, vocab_size=128)
LCFG = L.LoraConfig(rank=2, alpha=4.0, targets=("wqkv", "w2", "output"))
BETA, EPS = 0.5, 0.1


def _random_tree(tree, rng, scale):
  return jax.tree.map(lambda s: rng.normal(0, scale, s.shape).astype(np.float32), tree,
                      is_leaf=lambda x: isinstance(x, ParamSpec))


def random_base_and_adapters(seed=0):
  """A random tiny base (norm weights one) and adapters with B != 0, so the policy differs from the reference."""
  rng = np.random.default_rng(seed)
  base = _random_tree(param_specs(CONFIG), rng, 0.5)
  base = jax.tree.map(lambda x, s: np.ones_like(x) if s.init == "ones" else x, base, param_specs(CONFIG),
                      is_leaf=lambda x: isinstance(x, np.ndarray))
  return jax.device_put((base, _random_tree(L.lora_specs(CONFIG, LCFG), rng, 0.3)), jax.devices()[0])


def _pair_rows(P=5, T=10, prompt_len=4, seed=0):
  """{"chosen", "rejected"} rows of P pairs, one sequence per row; pair P-1 has no chosen response tokens."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(3, CONFIG.vocab_size, (P, prompt_len))
  out = {}
  for side in ("chosen", "rejected"):
    tokens = np.concatenate([prompt, rng.integers(3, CONFIG.vocab_size, (P, T + 1 - prompt_len))], 1)
    mask = np.zeros((P, T), np.int32)
    mask[:, prompt_len - 1:] = 1
    out[side] = {"tokens": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                 "segment_ids": np.ones((P, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (P, 1)),
                 "loss_mask": mask}
  out["chosen"]["loss_mask"][P - 1] = 0
  return out


def _np_metrics(pc, pr, rc, rr, valid):
  """The DPO definitions in float64 numpy over the valid pairs."""
  pc, pr, rc, rr = (np.asarray(x, np.float64)[valid] for x in (pc, pr, rc, rr))
  chosen, rejected = BETA * (pc - rc), BETA * (pr - rr)
  z = chosen - rejected
  log_sig = lambda x: -np.logaddexp(0.0, -x)
  loss = -(1 - EPS) * log_sig(z) - EPS * log_sig(-z)
  return {"pairs": int(valid.sum()), "loss": loss.mean(), "reward_accuracy": (chosen > rejected).mean(),
          "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(), "reward_margin": z.mean(),
          "policy_chosen_logps": pc.mean(), "policy_rejected_logps": pr.mean()}


def test_eval_metrics_match_numpy_reference_over_batches():
  base, adapters = random_base_and_adapters()
  rows = _pair_rows()

  @jax.jit
  def logps(base, adapters, rows):  # per-row log-probs, the quantities the reference below starts from
    return (sequence_logps(L.apply_lora(base, adapters, LCFG), rows, CONFIG, rules=None),
            sequence_logps(base, rows, CONFIG, rules=None))
  both = {k: np.concatenate([rows["chosen"][k], rows["rejected"][k]]) for k in rows["chosen"]}
  policy, ref = map(np.asarray, logps(base, adapters, both))
  P = 5
  valid = np.arange(P) < P - 1
  want = _np_metrics(policy[:P], policy[P:], ref[:P], ref[P:], valid)
  assert 0.0 < want["reward_accuracy"] < 1.0  # a set where the accuracy is not trivially 0 or 1

  fn = make_dpo_eval(CONFIG, LCFG, beta=BETA, label_smoothing=EPS, rules=None)
  got = dpo_eval.evaluate_pairs(fn, base, adapters, rows, batch_size=2, pad_id=0)  # 3 batches, the last padded
  assert got["pairs"] == want["pairs"] == 4 and got["reward_accuracy"] == want["reward_accuracy"]
  for k in dpo_eval.METRICS:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-5, err_msg=k)
  record = dpo_eval.eval_record(got)
  assert set(record) == {f"eval_{k}" for k in dpo_eval.METRICS} | {"eval_pairs"}

  # The model at step 0 (B = 0) is the reference: log 2, no margin, no pair counted as won; same compiled code.
  before = dpo_eval.evaluate_pairs(fn, base, dpo_eval.zero_adapters(adapters), rows, batch_size=2, pad_id=0)
  assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.0
  assert fn._cache_size() == 1

  # Micro-batches (grad_accum, as in training) change the memory, not the result.
  accumulated = dpo_eval.evaluate_pairs(make_dpo_eval(CONFIG, LCFG, beta=BETA, label_smoothing=EPS, rules=None,
                                                      grad_accum=2), base, adapters, rows, batch_size=4, pad_id=0)
  for k in dpo_eval.METRICS:
    np.testing.assert_allclose(accumulated[k], want[k], rtol=2e-5, atol=1e-5, err_msg=k)


class _Iter:
  def __init__(self):
    self.n = 0

  def __next__(self):
    self.n += 1
    return {"tokens": np.full((2, 4), self.n, np.int32)}

  def get_state(self):
    return {"n": self.n}


class _Checkpoints:
  def should_save(self, step):
    return False

  def save(self, *args, **kwargs):
    pass


def _fake_train(tmp_path, evaluate):
  """loop._train over 5 fake steps (eval_every 2); returns (metrics.jsonl records by step, what it returned)."""
  cfg = types.SimpleNamespace(steps=5, batch_size=2, seq_len=4, halt_after_nonfinite=3, log_every=1, eval_every=2,
                              stop_after=0)
  step_fn = lambda s, b: (types.SimpleNamespace(step=s.step + 1, skipped=0),
                          {"loss": np.float32(1.0 / (s.step + 1) + b["tokens"][0, 0]), "finite": True})
  writer = MetricsWriter(str(tmp_path), cfg.steps, 0, progress=False)
  try:
    out = loop._train(cfg, types.SimpleNamespace(step=0, skipped=0), 0, step_fn, _Iter(), _Checkpoints(), writer,
                      lambda done: False, evaluate, lambda b: b, 1.0)
  finally:
    writer.close()
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  return {r["step"]: r for r in records}, out


def test_loop_logs_eval_records_at_eval_steps_and_the_end(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # metrics.jsonl only: importing TensorBoard takes seconds
  seen = []

  def evaluate(state):
    seen.append(state.step)
    return {"eval_loss": 0.5 / state.step, "eval_reward_accuracy": 0.25, "eval_pairs": 3}

  with_eval, out = _fake_train(tmp_path / "a", evaluate)
  without, _ = _fake_train(tmp_path / "b", None)
  assert seen == [2, 4, 5]
  assert [s for s, r in sorted(with_eval.items()) if "eval_loss" in r] == [2, 4, 5]
  assert with_eval[4]["eval_reward_accuracy"] == 0.25 and with_eval[5]["eval_pairs"] == 3
  assert out[3] == {"eval_loss": 0.1, "eval_reward_accuracy": 0.25, "eval_pairs": 3}  # the last evaluation
  strip = lambda rs: {s: {k: v for k, v in r.items() if not k.startswith("eval_") and k not in ("tokens_per_sec",
                                                                                                  "mfu")}
                      for s, r in rs.items()}
  assert strip(with_eval) == strip(without)


# ---- held-out pair data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  text = "Which play is this from? Hamlet Macbeth to be or not to be, that is the question. A B C D "
  return tk.Tokenizer(tk.train_tokenizer(str(root / "tok"), 300, texts=[text * 20]))


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


PAIRS = [{"prompt": "Which play?", "chosen": "Hamlet", "rejected": "Macbeth"},
         {"prompt": [{"role": "user", "content": "to be?"}], "chosen": "or not to be", "rejected": "the question"}]
CHOICE = {"messages": [{"role": "user", "content": "Which play? A) Hamlet B) Macbeth"},
                       {"role": "assistant", "content": "A"}], "answer": "A", "options": ["Hamlet", "Macbeth"]}


def _cfg(tmp_path, eval_records, **over):
  c = dpo_lora_tiny.get_config()
  c.seq_len = 48
  c.data.source = "files"
  c.data.train_paths = _write(tmp_path / "train.jsonl", PAIRS * 2)
  c.data.eval_paths = _write(tmp_path / "eval.jsonl", eval_records)
  for key, value in over.items():
    c.data[key] = value
  return c


def test_heldout_pairs_become_dpo_rows(tmp_path, tokenizer):
  data = build_finetune_data(_cfg(tmp_path, PAIRS + [CHOICE]), tokenizer)
  # The multiple-choice record is scored for accuracy, not a pair; the pairs' rows are the training rows'.
  assert data.eval_summary.samples == 2 and data.eval_rows["chosen"]["tokens"].shape == (2, 48)
  np.testing.assert_array_equal(data.eval_rows["rejected"]["tokens"], data.train_rows["rejected"]["tokens"][:2])
  assert len(data.heldout) == 3


def test_bad_heldout_pairs_fail_or_are_counted_as_in_training(tmp_path, tokenizer, caplog):
  bad = {"prompt": "Which play?", "chosen": "Hamlet"}
  with pytest.raises(SFTDataError) as training:
    build_finetune_data(_cfg(tmp_path, PAIRS, train_paths=_write(tmp_path / "bad.jsonl", [PAIRS[0], bad])),
                        tokenizer)
  with pytest.raises(SFTDataError, match="^held-out records of config.data.eval_paths: ") as held_out:
    build_finetune_data(_cfg(tmp_path, [PAIRS[0], bad]), tokenizer)
  assert str(held_out.value).endswith(str(training.value)) and "missing field 'rejected'" in str(training.value)

  too_long = {"prompt": "to be or not to be " * 20, "chosen": "Hamlet", "rejected": "Macbeth"}
  data = build_finetune_data(_cfg(tmp_path, [PAIRS[0], bad, too_long], on_error="skip"), tokenizer)
  assert data.eval_summary.skipped == {"invalid": 1, "too_long": 1} and len(data.eval_rows["chosen"]["tokens"]) == 1
  assert "held-out data: 2 of 3 records skipped" in caplog.text
  with pytest.raises(ConfigError, match="^no held-out rows: .*too_long"):
    build_finetune_data(_cfg(tmp_path, [too_long], on_error="skip"), tokenizer)


def test_missing_eval_file_fails_before_loading_anything(tmp_path, monkeypatch):
  (tmp_path / "base").mkdir()
  (tmp_path / "base" / "config.json").write_text("{}")
  c = _cfg(tmp_path, PAIRS)
  c.base.checkpoint = str(tmp_path / "base")
  missing = str(tmp_path / "nope" / "dev_pairs.jsonl")
  c.data.eval_paths = f"{c.data.eval_paths},{missing}"
  monkeypatch.setattr(loop.base_lib, "load_base", lambda *a, **k: pytest.fail("loaded the base"))
  with pytest.raises(ConfigError) as e:
    loop.run(c, str(tmp_path / "work"))
  assert str(e.value) == f"config.data.eval_paths: data file {missing!r} does not exist"
  c.data.source, c.data.eval_paths = "shakespeare", missing  # the built-in data takes eval files too
  with pytest.raises(ConfigError, match=re.escape(repr(missing))):
    loop.validate(c)


def test_builtin_tasks_hold_out_pairs_like_their_training_pairs(tmp_path, tokenizer):
  c = dpo_lora_tiny.get_config()
  c.seq_len = 512
  c.data.shakespeare.update(n_train=4, n_heldout=6)
  data = build_finetune_data(c, tokenizer)
  assert data.eval_summary.samples == 6 and len(data.eval_rows["chosen"]["tokens"]) == 6
  assert len(data.heldout) == 6 and all(r["options"] for r in data.heldout)  # still scored for accuracy
  # Eval files replace the built-in held-out records.
  c.data.eval_paths = _write(tmp_path / "eval.jsonl", PAIRS)
  data = build_finetune_data(c, tokenizer)
  assert data.eval_summary.samples == 2 and len(data.heldout) == 2
