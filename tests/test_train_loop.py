"""The training script end to end: metrics, resume after kill -9 to identical bits, bad configs, multi-process."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small text corpus and a tokenizer trained on it (no network, a few seconds)."""
  from internlm_jax.tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ("the king queen lord lady sword crown night day love death honour speak hear fair foul "
           "good ill come go stay fly heaven earth").split()
  for split, n_docs in (("train", 60), ("val", 8)):
    os.makedirs(root / split)
    for d in range(n_docs):
      text = " ".join(rng.choice(words, size=int(rng.integers(20, 120))))
      (root / split / f"doc{d}.txt").write_text(text + ".\n")
  tok = train_tokenizer(str(root / "tok"), 300, files=[str(root / "train" / f) for f in os.listdir(root / "train")])
  return root, tok


def _args(corpus, workdir, steps=8, extra=()):
  root, tok = corpus
  return [sys.executable, TRAIN, "--config=" + os.path.join(ROOT, "configs", "pretrain_tiny.py"),
          f"--workdir={workdir}", f"--config.steps={steps}", "--config.batch_size=8", "--config.seq_len=32",
          "--config.model.preset=tiny", "--config.log_every=1", "--config.eval_every=4",
          "--config.eval_batches=2", "--config.checkpoint_every=2", "--config.keep_checkpoints=10",
          "--config.data.corpus=files", f"--config.data.train_paths={root / 'train'}",
          f"--config.data.val_paths={root / 'val'}", f"--config.data.tokenizer={tok}",
          "--config.sample_tokens=8", "--config.progress=False", "--config.peak_flops=1e11",
          "--config.optimizer.warmup_steps=2", *extra]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the script sets its own simulated device count
  env["PYTHONPATH"] = ROOT
  return env


def _losses(workdir):
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        by_step[r["step"]] = r["loss"]  # a resumed run rewrites the steps after its checkpoint
  return by_step


def _final_params(workdir, step):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = ocp.StandardCheckpointer().restore(path)
  return tree["params"] if isinstance(tree, dict) else tree.params


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  eval_config = workdir / "eval_config.py"  # in-training task evaluation (issue: evaluation during training)
  eval_config.write_text("from internlm_jax.eval import presets\n\ndef get_config():\n  return presets.eval_config("
                         "{'shakespeare': presets.shakespeare_ppl(limit=2)}, batch_size=4, workers=1)\n")
  extra = [f"--config.task_eval_config={eval_config}", "--config.task_eval_every=4"]
  out = subprocess.run(_args(corpus, workdir, extra=extra), env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out.stdout


def test_training_writes_metrics_plot_and_report(uninterrupted):
  workdir, stdout = uninterrupted
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
  for key in ("step", "loss", "tokens_per_sec", "mfu", "lr", "grad_norm"):
    assert key in records[-1]
  assert any("val_loss" in r for r in records)
  assert [r["step"] for r in records if "eval/shakespeare/perplexity" in r] == [4, 8]
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert "validation loss" in stdout and "unigram baseline" in stdout and "sample:" in stdout


@pytest.mark.slow  # two training subprocesses, ~40 s: with the SIGTERM resume test in the slow suite
def test_kill_minus_nine_then_rerun_is_bit_identical(corpus, uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_args(corpus, workdir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  ckpt_dir = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
    if any(int(d) >= 4 for d in done):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be killed; make it longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = subprocess.run(_args(corpus, workdir), env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _losses(workdir) == _losses(full_dir)
  # The killed run's records past its checkpoint were dropped on resume: every step is logged once.
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
  a, b = _final_params(workdir, 8), _final_params(full_dir, 8)
  import jax
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("override,message", [
    ("--config.batch_size=6", "batch_size=6 must be divisible"),
    ("--config.seq_len=100000", "exceeds the model's max_position_embeddings"),
    ("--config.model.loss_chunk_size=48", "loss_chunk_size=48 must divide config.seq_len"),
    ("--config.model.preset=internlm9", "unknown preset 'internlm9'"),
    ("--config.data.train_paths=/nonexistent/corpus", "/nonexistent/corpus"),
])
def test_bad_config_fails_fast_with_one_line(corpus, tmp_path, override, message):
  start = time.time()
  out = subprocess.run(_args(corpus, tmp_path / "bad", extra=[override]), env=_env(), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and message in last, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert time.time() - start < 60


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_of_eight(corpus, tmp_path):
  full_dir = tmp_path / "single"
  single = subprocess.run(_args(corpus, full_dir, extra=["--config.data.host_sharding=rows"]), env=_env(),
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  port = 20000 + os.getpid() % 20000
  procs = []
  for pid in range(2):
    env = _env()
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(_args(corpus, tmp_path / "mp", extra=["--cpu_devices=4", "--config.data.host_sharding=rows"]), env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  np.testing.assert_allclose(list(_losses(tmp_path / "mp").values()), list(_losses(full_dir).values()), rtol=1e-5)


def test_report_turns_a_real_run_into_a_page_with_plots(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  sweep = tmp_path / "results.md"
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"), f"--workdir={workdir}",
                        f"--out={tmp_path / 'report.md'}"], env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  page = (tmp_path / "report.md").read_text()
  assert "## Training" in page and "final validation loss" in page and "unigram baseline" in page
  for png in ("train_loss.png", "train_throughput.png"):
    assert (workdir / "report_plots" / png).stat().st_size > 1000
  empty = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"), f"--workdir={tmp_path}"],
                         env=_env(), capture_output=True, text=True, timeout=120)
  assert empty.returncode != 0 and "no metrics.jsonl" in empty.stderr
  del sweep


def test_convert_training_workdir_to_hf_folder(uninterrupted, tmp_path):
  from internlm_jax import load_hf_checkpoint
  from internlm_jax.tokenizer import Tokenizer
  workdir, _ = uninterrupted
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "convert.py"), f"--from_ckpt={workdir}",
                        f"--to_hf={tmp_path / 'hf'}"], env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  _, params = load_hf_checkpoint(tmp_path / "hf")
  import jax
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params,
               _final_params(workdir, 8))
  assert Tokenizer(tmp_path / "hf").vocab_size == params["embed"].shape[0]


def test_workdir_mistakes_are_one_clear_error(corpus, tmp_path):
  """A workdir that is a file, and one holding another model's checkpoints: a ConfigError / CheckpointError, and
  the run on disk keeps its model_config.json (it used to be overwritten before the resume failed)."""
  import jax
  import jax.numpy as jnp
  from configs import pretrain_tiny
  from internlm_jax import checkpoint as checkpoint_lib
  from internlm_jax.config import ConfigError, get_preset
  from internlm_jax.train.loop import run
  from internlm_jax.train.optimizer import OptimizerConfig, make_optimizer
  root, tok = corpus
  cfg = pretrain_tiny.get_config()
  cfg.model.preset, cfg.steps, cfg.batch_size, cfg.seq_len = "tiny", 2, 8, 32
  cfg.data.corpus, cfg.data.train_paths, cfg.data.tokenizer = "files", str(root / "train"), tok
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="is a file, not a folder"):
    run(cfg, str(tmp_path / "file"))
  missing = cfg.copy_and_resolve_references()
  missing.init_from = str(tmp_path / "no_such_model")
  with pytest.raises(ConfigError, match="init_from=.*does not exist"):
    run(missing, str(tmp_path / "fresh"))
  # A run of a wider model (eager zeros: no compile) in the workdir.
  other = get_preset("tiny").replace(vocab_size=320, hidden_size=128)
  abstract = checkpoint_lib.abstract_train_state(other, make_optimizer(OptimizerConfig(total_steps=2)))
  with checkpoint_lib.CheckpointManager(tmp_path / "run" / "checkpoints", save_every=1, async_save=False) as ckpt:
    ckpt.save(1, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
  (tmp_path / "run" / "model_config.json").write_text('{"hidden_size": 128}')
  with pytest.raises(checkpoint_lib.CheckpointError, match="a different one needs a new workdir"):
    run(cfg, str(tmp_path / "run"))
  assert (tmp_path / "run" / "model_config.json").read_text() == '{"hidden_size": 128}'


def test_config_flag_mistakes_are_one_line(tmp_path):
  """ml_collections' bare AttributeError for an unknown override key, and its deferred error for a missing
  config file, used to end in tracebacks. Only absl and the launch helpers load here: no JAX, about a second."""
  script = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from absl import app; "
            "from _launch import define_config, parse_flags; c = define_config(sys.argv.pop(1), ''); "
            "app.run(lambda argv: print('steps', c.value.steps), flags_parser=parse_flags)")
  base = [sys.executable, "-c", script, os.path.join(ROOT, "experiments"),
          os.path.join(ROOT, "configs", "pretrain_tiny.py")]
  for extra, expected in ((["--config.steps=3"], None),
                          (["--config.stepz=3"], "names a key the config does not have: 'stepz' Did you mean"),
                          ([f"--config={ROOT}/configs/pretrain_tiny.py", "--config.model.overrides.num_layers=2"],
                           "does not have: 'num_layers'"),
                          ([f"--config={tmp_path}/nope.py"], "error: cannot load --config=")):
    out = subprocess.run(base + extra, env=_env(), capture_output=True, text=True, timeout=60)
    if expected is None:
      assert out.returncode == 0 and out.stdout.strip() == "steps 3", out.stderr[-2000:]
    else:
      assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
      assert out.stderr.strip().splitlines()[-1].startswith("error: ") and expected in out.stderr


def test_resumed_metrics_drop_replayed_steps_and_a_torn_line(tmp_path):
  """A kill leaves records past the restored checkpoint (those steps run again) and maybe a torn last line, which
  the next record would be glued to: the writer keeps the records up to the restored step."""
  from internlm_jax.train import metrics as metrics_lib
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == list(range(1, 7))
  writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=8, initial_step=4, progress=False)
  writer.write(5, {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 5


def test_progress_bar_shows_loss_throughput_mfu_and_eta(tmp_path, capsys):
  import re
  from internlm_jax.train import metrics as metrics_lib
  writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=100, initial_step=0, progress=True)
  writer.progress(10, 2.5, 1234.0, 0.42)
  writer.progress(20, 2.25, 1300.0, 0.43)
  writer.close()
  err = capsys.readouterr().err
  assert "loss=2.250" in err and "tok/s=1,300" in err and "mfu=0.43" in err, err
  assert re.search(r"20/100 \[\d\d:\d\d<\d\d:\d\d", err), err  # elapsed < remaining (the ETA)


def test_sweep_writes_csv_and_markdown_tables(tmp_path):
  """The grid's runs, already finished (a rerun of a sweep skips them): no training here, only the tables."""
  import csv
  names = []
  for lr in ("1e-3", "3e-3"):
    for batch in ("8", "16"):
      names.append(f"learning_rate={lr}_batch_size={batch}")
      os.makedirs(tmp_path / names[-1])
      (tmp_path / names[-1] / "summary.json").write_text(json.dumps(
          {"val_loss": float(lr) * 1000 + int(batch), "tokens_per_sec": 10.0}))
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), f"--workdir={tmp_path}",
                        "--grid=optimizer.learning_rate=1e-3,3e-3", "--grid=batch_size=8,16"],
                       env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert [(r["optimizer.learning_rate"], r["batch_size"], float(r["val_loss"])) for r in rows] == [
      ("1e-3", "8", 9.0), ("1e-3", "16", 17.0), ("3e-3", "8", 11.0), ("3e-3", "16", 19.0)]
  table = (tmp_path / "results.md").read_text().splitlines()
  assert table[0] == "| optimizer.learning_rate | batch_size | val_loss | tokens_per_sec | workdir |"
  assert table[2].startswith("| 1e-3 | 8 | 9.0000 |") and len(table) == 6


@pytest.mark.slow
def test_init_from_an_hf_folder_takes_its_shape_and_weights(corpus, tmp_path):
  """config.init_from: continued pretraining from an HF folder. With a zero learning rate the run's checkpoint
  holds the folder's weights bit for bit, in the folder's shape (one more layer than the config's preset)."""
  import jax
  from internlm_jax import PRESETS, hf_io, init_params
  base = PRESETS["tiny"].replace(num_layers=PRESETS["tiny"].num_layers + 1)
  params = init_params(base, jax.random.key(7))
  hf_io.save_hf_checkpoint(tmp_path / "hf", base, params)
  workdir = tmp_path / "continued"
  extra = [f"--config.init_from={tmp_path / 'hf'}", "--config.optimizer.learning_rate=0.0"]
  out = subprocess.run(_args(corpus, workdir, steps=2, extra=extra), env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((workdir / "model_config.json").read_text())["num_layers"] == base.num_layers
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               _final_params(workdir, 2), params)


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_the_rerun_matches(corpus, uninterrupted, tmp_path):
  """A preemption notice (SIGTERM) mid-run: a checkpoint of the step it stopped at, exit code 0, and the rerun
  ends with the uninterrupted run's losses and parameters."""
  full_dir, _ = uninterrupted
  workdir = tmp_path / "preempted"
  proc = subprocess.Popen(_args(corpus, workdir), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (workdir / "metrics.jsonl").exists() and '"step": 3' in (workdir / "metrics.jsonl").read_text():
      break
    time.sleep(0.1)
  assert proc.poll() is None, "the run finished before the signal; make it longer"
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  stopped = int(stdout.split("preempted at step ")[1].split(";")[0])
  assert stopped < 8 and (workdir / "checkpoints" / str(stopped) / "commit_success.txt").exists()
  out = subprocess.run(_args(corpus, workdir), env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _losses(workdir) == _losses(full_dir)
  import jax
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               _final_params(workdir, 8), _final_params(full_dir, 8))


@pytest.mark.slow
def test_diverging_run_halts_in_one_line_and_keeps_finite_checkpoints(corpus, tmp_path):
  workdir = tmp_path / "diverged"
  extra = ["--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=1",
           "--config.halt_after_nonfinite=2", "--config.optimizer.grad_clip=0.0"]
  out = subprocess.run(_args(corpus, workdir, steps=12, extra=extra), env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: 2 consecutive non-finite steps") and "lower optimizer.learning_rate" in last
  import jax
  for step in [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]:
    for leaf in jax.tree.leaves(_final_params(workdir, step)):
      assert np.isfinite(np.asarray(leaf, np.float32)).all(), step
