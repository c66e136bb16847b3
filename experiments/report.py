"""Turns a run directory into one markdown page with PNG plots.

  python experiments/report.py --workdir=runs/tiny [--out=runs/tiny/report.md]

Reads what the other scripts leave behind, wherever it sits under the workdir: training `metrics.jsonl` (loss
and throughput curves), the training `summary.json`, evaluation summaries (a JSON list of
{dataset, metric, mode, score}), sweep tables (`results.md`) and existing PNGs such as a needle heatmap.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

WORKDIR = flags.DEFINE_string("workdir", None, "run directory to report on", required=True)
OUT = flags.DEFINE_string("out", None, "markdown file (default WORKDIR/report.md)")


def _plot(path, series, ylabel, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, points in series:
    if points:
      ax.plot(*zip(*points), "o-" if len(points) < 20 else "-", label=label, markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _read_jsonl(path):
  records = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue  # blank, or the torn last line of a run killed (or still running) mid-write
  return [r for r in records if isinstance(r, dict) and "step" in r]


def _numeric(records, key):
  return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def training_section(workdir, metrics_path, plot_dir):
  records = _read_jsonl(metrics_path)
  rel = os.path.relpath(os.path.dirname(metrics_path), workdir)
  name = rel.replace(os.sep, "_") if rel != "." else "train"
  lines = [f"## Training: `{rel}`", ""]
  if not records:
    return lines + ["(no logged steps)", ""]
  loss_png = os.path.join(plot_dir, f"{name}_loss.png")
  _plot(loss_png, [("train", _numeric(records, "loss")), ("validation", _numeric(records, "val_loss"))],
        "loss (nats/token)", "loss")
  tput_png = os.path.join(plot_dir, f"{name}_throughput.png")
  _plot(tput_png, [("tokens/s", _numeric(records, "tokens_per_sec"))], "tokens/s", "throughput")
  last = records[-1]
  tps = sorted(v for _, v in _numeric(records, "tokens_per_sec"))
  mfus = sorted(v for _, v in _numeric(records, "mfu"))
  lines += [f"- steps logged: {len(records)}, last step {last['step']}",
            f"- final train loss: {_numeric(records, 'loss')[-1][1]:.4f}" if _numeric(records, "loss") else "",
            f"- median tokens/s: {tps[len(tps) // 2]:,.0f}; median MFU: {mfus[len(mfus) // 2]:.3f}" if tps and mfus
            else ""]
  val = _numeric(records, "val_loss")
  if val:
    lines.append(f"- final validation loss: {val[-1][1]:.4f}")
  summary_path = os.path.join(os.path.dirname(metrics_path), "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    if isinstance(summary, dict) and summary.get("unigram_val_loss") is not None:
      lines.append(f"- unigram baseline validation loss: {summary['unigram_val_loss']:.4f}")
    if isinstance(summary, dict) and summary.get("sample"):
      lines += ["", "Sample:", "", "```", summary["sample"], "```"]
  lines += ["", f"![loss]({os.path.relpath(loss_png, workdir)})",
            f"![throughput]({os.path.relpath(tput_png, workdir)})", ""]
  return [l for l in lines if l is not None]


def eval_section(workdir, path):
  with open(path) as f:
    rows = json.load(f)
  lines = [f"## Evaluation: `{os.path.relpath(path, workdir)}`", "", "| dataset | metric | mode | score |",
           "|---|---|---|---|"]
  for r in rows:
    score = r.get("score")
    lines.append(f"| {r.get('dataset')} | {r.get('metric')} | {r.get('mode')} | "
                 f"{score:.4f} |" if isinstance(score, (int, float)) else f"| {r.get('dataset')} | "
                 f"{r.get('metric')} | {r.get('mode')} | {score} |")
  return lines + [""]


def build_report(workdir: str, out: str | None = None) -> str:
  out = out or os.path.join(workdir, "report.md")
  plot_dir = os.path.join(workdir, "report_plots")
  os.makedirs(plot_dir, exist_ok=True)
  lines = [f"# Report: `{os.path.abspath(workdir)}`", ""]
  found = False
  for root, dirs, files in sorted(os.walk(workdir)):
    dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "report_plots", "tensorboard"))
    if "metrics.jsonl" in files:
      lines += training_section(workdir, os.path.join(root, "metrics.jsonl"), plot_dir)
      found = True
    for name in sorted(files):
      path = os.path.join(root, name)
      if name == "summary.json":
        with open(path) as f:
          data = json.load(f)
        if isinstance(data, list):
          lines += eval_section(workdir, path)
          found = True
      elif name == "results.md":
        with open(path) as f:
          lines += [f"## Sweep: `{os.path.relpath(path, workdir)}`", "", f.read().strip(), ""]
        found = True
      elif name.endswith(".png") and name != "loss_curve.png":
        lines += [f"## Figure: `{os.path.relpath(path, workdir)}`", "", f"![{name}]({os.path.relpath(path, workdir)})",
                  ""]
        found = True
  if not found:
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl, evaluation summary.json, results.md or PNG to report")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  return out


def main(argv):
  del argv
  try:
    print(build_report(WORKDIR.value, OUT.value))
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
