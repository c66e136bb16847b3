"""The fine-tuning loop end to end on a tiny model: every method, resume, outputs that load back, bad configs,
the Shakespeare tasks, and (slow) the demo that fine-tuning beats the pretrained model on held-out questions."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax import config as config_lib
from internlm_jax import tokenizer as tk
from internlm_jax.config import ConfigError
from internlm_jax.data import shakespeare_tasks as st
from internlm_jax.finetune import run, validate
from internlm_jax.hf_io import load_hf_checkpoint, save_hf_checkpoint
from internlm_jax.lora import apply_lora, lora_delta
from internlm_jax.lora_io import load_adapter
from internlm_jax.model import ParamSpec, forward, param_specs
from internlm_jax.quant_nf4 import dequantize, quantize

fwd = jax.jit(forward, static_argnums=2)  # one compile per params structure, not one per op
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import sft_lora_tiny  # noqa: E402

TEXT = ("Which play is this from? Answer with the letter. A) B) C) D) Hamlet Macbeth speaks the king queen "
        "to be or not to be, that is the question. Continue this speech. Tell me a story about a sword. ")


def _mc(i):
  options = ["Hamlet", "Macbeth", "Lear", "Tempest"]
  gold = "ABCD"[i % 4]
  prompt = f"Which play? line {i}\n" + "\n".join(f"{l}) {o}" for l, o in zip("ABCD", options))
  return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": gold}],
          "answer": gold, "options": options, "task": "play"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tokenizer, a random tiny base saved as an HF folder, and SFT / preference / held-out jsonl files."""
  root = tmp_path_factory.mktemp("ft")
  tok_path = tk.train_tokenizer(str(root / "tok"), 400, texts=[TEXT * 20])
  tok = tk.Tokenizer(tok_path)
  model = config_lib.get_preset("tiny").replace(vocab_size=-(-tok.vocab_size // 64) * 64)
  base_dir = root / "base"
  # numpy init: a jitted random init costs seconds of compile for nothing this test looks at.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (np.ones(s.shape, np.float32) if s.init == "ones" else
                                   rng.normal(0, 0.02, s.shape).astype(np.float32)),
                        param_specs(model), is_leaf=lambda x: isinstance(x, ParamSpec))
  save_hf_checkpoint(base_dir, model, params)
  os.replace(tok_path, base_dir / "tokenizer.model")
  train = [{"instruction": "Tell me a story", "output": "about a sword"},
           {"messages": [{"role": "user", "content": "to be?"}, {"role": "assistant", "content": "or not"}]}]
  train += [_mc(i) for i in range(20)]
  pairs = [{"prompt": "Which play?", "chosen": "A", "rejected": "B"}, {"prompt": "to be?", "chosen": "or not to be",
                                                                     "rejected": "sword"}] * 4
  for name, records in (("train", train), ("pairs", pairs), ("heldout", [_mc(i) for i in range(20, 28)])):
    with open(root / f"{name}.jsonl", "w") as f:
      f.write("\n".join(json.dumps(r) for r in records) + "\n")
  return root, base_dir


def _cfg(setup, method, steps=3, over=None):
  root, base_dir = setup
  c = sft_lora_tiny.get_config()
  c.method = method
  c.steps, c.batch_size, c.seq_len = steps, 8, 64
  c.log_every, c.eval_every, c.checkpoint_every = 1, 2, 2
  c.progress, c.peak_flops = False, 1e11
  c.eval.heldout_accuracy = False
  c.base.checkpoint = str(base_dir)
  c.lora.rank = 4
  c.data.source = "files"
  c.data.train_paths = str(root / ("pairs.jsonl" if method == "dpo" else "train.jsonl"))
  c.data.eval_paths = str(root / "heldout.jsonl")
  c.optimizer.warmup_steps = 1
  for key, value in (over or {}).items():
    node = c
    *path, last = key.split(".")
    for k in path:
      node = node[k]
    node[last] = value
  return c


def _records(workdir):
  by_step = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    by_step.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")})
  return by_step


@pytest.fixture(scope="module")
def lora_run(setup, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora")
  return workdir, run(_cfg(setup, "lora", steps=4, over={"eval.heldout_accuracy": True}), str(workdir))


def test_lora_run_writes_metrics_summary_and_outputs(lora_run):
  workdir, summary = lora_run
  records = _records(workdir)
  assert sorted(records) == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and "lr" in r and "grad_norm" in r for r in records.values())
  assert "eval_loss" in records[2] and "eval_loss" in records[4]
  assert summary["heldout"]["before"]["n"] == 8 and summary["heldout_accuracy_after"] is not None
  assert summary["data"]["kept"] == 22 and summary["trainable_params"] < 50_000
  assert os.path.isfile(workdir / "adapter" / "adapter_config.json")
  assert os.path.isfile(workdir / "hf" / "tokenizer.model")
  assert json.load(open(workdir / "summary.json"))["step"] == 4


def test_rerun_after_interruption_resumes_to_identical_metrics(setup, lora_run, tmp_path):
  # A run killed after its step-2 checkpoint: the fixture's workdir without step 4's checkpoint and records.
  full_dir, _ = lora_run
  shutil.copytree(full_dir / "checkpoints", tmp_path / "checkpoints", ignore=shutil.ignore_patterns("4"))
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(l for l in open(full_dir / "metrics.jsonl") if json.loads(l)["step"] <= 2)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  # stop_after=3 (checkpoint and stop, as on preemption) keeps this to one short run.
  stopped = run(_cfg(setup, "lora", steps=4, over={"stop_after": 3}), str(tmp_path))
  assert stopped == {"stopped": True, "step": 3} and (tmp_path / "checkpoints" / "3").is_dir()
  assert _records(tmp_path) == {step: r for step, r in _records(full_dir).items() if step <= 3}


def test_merged_hf_folder_and_adapter_reproduce_the_trained_model(setup, lora_run):
  workdir, _ = lora_run
  _, base_dir = setup
  config, base = load_hf_checkpoint(base_dir)
  merged_config, merged = load_hf_checkpoint(workdir / "hf")
  lcfg, adapters = load_adapter(workdir / "adapter", config)
  assert merged_config.vocab_size == config.vocab_size and lcfg.rank == 4
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 16)), jnp.int32)
  want = fwd(apply_lora(base, adapters, lcfg), tokens, config)
  assert float(jnp.max(jnp.abs(want - fwd(base, tokens, config)))) > 1e-4  # the adapter did something
  np.testing.assert_allclose(fwd(merged, tokens, config), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["full", "qlora", "dpo"])
def test_other_methods_train_and_export(setup, method, tmp_path):
  summary = run(_cfg(setup, method, steps=2, over={"data.eval_paths": ""}), str(tmp_path))
  records = _records(tmp_path)
  assert sorted(records) == [1, 2] and all(np.isfinite(r["loss"]) for r in records.values())
  config, hf = load_hf_checkpoint(tmp_path / "hf")
  _, base = load_hf_checkpoint(setup[1])
  changed = float(np.max(np.abs(np.asarray(hf["layers"]["w2"]) - np.asarray(base["layers"]["w2"]))))
  assert changed > 0  # two steps moved the exported weights
  if method == "dpo":
    assert {"reward_margin", "reward_accuracy", "chosen_reward"} <= set(records[2])
    assert abs(records[1]["loss"] - np.log(2)) < 1e-3  # policy == reference (adapter off) at the start
  if method == "full":
    assert summary["trainable_params"] == config.num_params() and not os.path.exists(tmp_path / "adapter")
  if method == "qlora":
    # The HF folder holds the dequantized NF4 base plus the adapters: exactly the weights that were trained.
    lcfg, adapters = load_adapter(tmp_path / "adapter", config)
    w2, lora_w2 = base["layers"]["w2"], adapters["layers"]["w2"]
    want = jax.jit(lambda w, a, b: dequantize(quantize(w, "nf4", n_lead=1)) + lora_delta(a, b, lcfg.scale, 1))(
        w2, lora_w2["a"], lora_w2["b"])
    np.testing.assert_allclose(np.asarray(hf["layers"]["w2"]), np.asarray(want), atol=1e-6)


@pytest.mark.slow
def test_dpo_heldout_evaluation_is_logged_and_leaves_training_unchanged(setup, tmp_path):
  """DPO with held-out pairs (the training pairs, for a 3-step test) against the same run without: eval_* records
  at the eval steps, training metrics bitwise equal (JSON floats round-trip exactly). About 1 minute."""
  root, _ = setup
  over = {"output.hf": False, "output.adapter": False}
  runs = {name: run(_cfg(setup, "dpo", steps=3, over=dict(over, **{"data.eval_paths": paths})), str(tmp_path / name))
          for name, paths in (("eval", str(root / "pairs.jsonl")), ("plain", ""))}
  with_eval, plain = _records(tmp_path / "eval"), _records(tmp_path / "plain")
  assert [s for s, r in sorted(with_eval.items()) if "eval_loss" in r] == [2, 3]  # eval_every 2, and the end
  keys = {"eval_loss", "eval_reward_accuracy", "eval_chosen_reward", "eval_rejected_reward", "eval_reward_margin",
          "eval_policy_chosen_logps", "eval_policy_rejected_logps", "eval_pairs"}
  assert keys <= set(with_eval[2]) and with_eval[3]["eval_pairs"] == 8
  assert {s: {k: v for k, v in r.items() if not k.startswith("eval_")} for s, r in with_eval.items()} == plain
  pairs = runs["eval"]["heldout_pairs"]
  assert pairs["before"]["loss"] == pytest.approx(np.log(2), abs=1e-6) and pairs["before"]["reward_margin"] == 0
  assert pairs["after"]["loss"] == with_eval[3]["eval_loss"] == runs["eval"]["eval_loss"]
  assert "heldout_pairs" not in runs["plain"] and runs["plain"]["eval_loss"] is None


@pytest.mark.slow
def test_cli_prints_dpo_heldout_pairs_before_and_after(setup, tmp_path):
  root, base_dir = setup
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  flags = {"base.checkpoint": base_dir, "data.source": "files", "data.train_paths": root / "pairs.jsonl",
           "data.eval_paths": root / "pairs.jsonl", "steps": 2, "batch_size": 8, "seq_len": 64, "lora.rank": 4,
           "optimizer.warmup_steps": 1, "mesh.fsdp": 1, "progress": False, "eval.heldout_accuracy": False,
           "output.hf": False, "output.adapter": False}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "finetune.py"),
                        "--config=" + os.path.join(ROOT, "configs", "dpo_lora_tiny.py"), f"--workdir={tmp_path}",
                        "--cpu_devices=1", *(f"--config.{k}={v}" for k, v in flags.items())],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"^held-out pairs \(8\): reward accuracy before 0\.0%, after [\d.]+%; preference loss 0\.693 -> "
                   r"[\d.]+; reward margin 0\.000 -> -?[\d.]+ \(chosen -?[\d.]+, rejected -?[\d.]+\)$",
                   out.stdout, re.M), out.stdout[-2000:]
  assert "nats/trained token" not in out.stdout


@pytest.mark.parametrize("override,message", [
    ({"method": "sgd"}, "config.method must be one of"),
    ({"base.checkpoint": ""}, "config.base.checkpoint is empty"),
    ({"base.checkpoint": "/nonexistent/base"}, "no such folder"),
    ({"lora.targets": "wqkv,lm_head"}, "config.lora: LoRA targets"),
    ({"lora.loraplus_ratio": 0.0}, "config.lora.loraplus_ratio must be positive"),
    ({"qlora.kind": "fp8", "method": "qlora"}, "config.qlora.kind"),
    ({"batch_size": 6, "grad_accum": 4}, "divisible by grad_accum"),
])
def test_bad_config_is_one_clear_error(setup, override, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(_cfg(setup, "lora", over=override))


@pytest.mark.parametrize("name,method,outputs", [
    ("sft_lora_tiny", "lora", (True, True)), ("sft_full_tiny", "full", (True, False)),
    ("sft_qlora_tiny", "qlora", (True, True)), ("dpo_lora_tiny", "dpo", (True, True))])
def test_every_finetune_config_validates(setup, name, method, outputs):
  # The loop tests start from sft_lora_tiny and override the method; the committed configs are checked here.
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config()
  c.base.checkpoint = str(setup[1])
  validate(c)
  assert c.method == method and (bool(c.output.hf), bool(c.output.adapter)) == outputs


def test_skipped_records_are_reported(setup, tmp_path, caplog):
  """Records dropped for length were only counted in summary.json, under a script that logs at WARNING."""
  from internlm_jax.finetune.data import build_finetune_data
  root, base_dir = setup
  (tmp_path / "long.jsonl").write_text(json.dumps({"instruction": "to be " * 80, "output": "or not"}) + "\n" +
                                       json.dumps({"instruction": "Tell me a story", "output": "a sword"}) + "\n")
  cfg = _cfg(setup, "lora", over={"data.train_paths": str(tmp_path / "long.jsonl"), "data.eval_paths": ""})
  data = build_finetune_data(cfg, tk.Tokenizer(base_dir / "tokenizer.model"))
  assert data.summary.skipped == {"too_long": 1}
  assert "training data: 1 of 2 records skipped {'too_long': 1}" in caplog.text


def test_cli_reports_bad_config_in_one_line(setup, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "finetune.py"),
                        f"--workdir={tmp_path}", "--config.base.checkpoint=/nonexistent/base", "--cpu_devices=1"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: config.base.checkpoint='/nonexistent/base'")


def test_shakespeare_tasks_are_deterministic_and_held_out():
  train, heldout = st.build_tasks(seed=3, tasks=("play", "speaker", "continue"), n_train=60, n_heldout=12)
  assert (train, heldout) == st.build_tasks(seed=3, tasks=("play", "speaker", "continue"), n_train=60, n_heldout=12)
  assert [r["task"] for r in train[:3]] == ["play", "speaker", "continue"]
  quote = lambda r: r["messages"][0]["content"].split('"')[1]
  mc = lambda records: {quote(r) for r in records if r["task"] != "continue"}
  assert not mc(heldout) & mc(train)
  for r in train + heldout:
    assert r["messages"][-1] == {"role": "assistant", "content": r["answer"]}
    if r["task"] != "continue":
      assert len(r["options"]) == 4 and r["answer"] in "ABCD"
      assert f"{r['answer']}) " in r["messages"][0]["content"]
  pairs = st.to_preferences(train[:6])
  assert all(p["chosen"] != p["rejected"] for p in pairs)


@pytest.mark.slow
def test_fine_tuning_beats_the_pretrained_model_on_held_out_questions(tmp_path):
  """The demo with the configs as committed: pretrain the tiny model on Shakespeare (configs/pretrain_tiny.py,
  200 steps), fine-tune it on the play task (configs/sft_full_tiny.py: all weights, 200 steps), compare held-out
  accuracy. About 6 minutes on 2 CPU cores; measured 2026-11-29: 30.5% before, 80.0% after (200 questions,
  chance 25%). LoRA (configs/sft_lora_tiny.py, LoRA+ since 2026-11-30: 30.5% -> 64.5%) is not the tested demo:
  it needs 800 steps (~7.5 minutes) to learn the task from this 5M base, see that config."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  one_device = ["--cpu_devices=1", "--config.mesh.fsdp=1", "--config.progress=False"]
  pre = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"),
                        "--config=" + os.path.join(ROOT, "configs", "pretrain_tiny.py"), f"--workdir={tmp_path / 'pre'}",
                        "--config.sample_tokens=0", *one_device],
                       env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
  assert pre.returncode == 0, pre.stderr[-3000:]
  ft = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "finetune.py"),
                       "--config=" + os.path.join(ROOT, "configs", "sft_full_tiny.py"), f"--workdir={tmp_path / 'ft'}",
                       f"--config.base.checkpoint={tmp_path / 'pre'}", "--config.output.hf=False", *one_device],
                      env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
  assert ft.returncode == 0, ft.stderr[-3000:]
  assert re.search(r"^data: \d+ samples: .* tokens, \d+ trained", ft.stdout, re.M), ft.stdout[-2000:]
  found = re.search(r"held-out accuracy: before ([\d.]+)%, after ([\d.]+)%", ft.stdout)
  assert found, ft.stdout[-2000:]
  before, after = float(found.group(1)), float(found.group(2))
  assert after >= before + 20.0, ft.stdout[-2000:]  # +49.5 points measured
