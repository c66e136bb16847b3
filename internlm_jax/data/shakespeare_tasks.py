"""Instruction data built from the Shakespeare corpus, with held-out examples: a task that shows fine-tuning works.

Tasks (each record is an OpenAI-messages SFT record plus gold fields):
  play      "Which play is this speech from?", lettered titles, then the quote attributed to its speaker
            ("... -- SHYLOCK"); answer: the letter.
  speaker   "In <play>, who speaks these lines?", lettered speakers of that play, then the quote; answer: the letter.
  continue  "Continue this speech by <speaker> in <play>:" with up to three lines; answer: the next line.

    train, heldout = build_tasks(seed=0, tasks=("play",), n_train=600, n_heldout=200,
                                 plays=["hamlet", "macbeth", "romeo_and_juliet", "merchant_of_venice"],
                                 shuffle_options=False)
    train[0] = {"messages": [{"role": "user", ...}, {"role": "assistant", "content": "C"}],
                "answer": "C", "options": ["...", ...], "task": "play", "play": "macbeth"}

Options are shuffled per question, or (`shuffle_options=False`) listed in a fixed order: the selected plays in
the order given, a play's most frequent speakers sorted. With fixed options and as many plays as options every
play question shows the same list, a 4-way classification with lettered labels; shuffled options additionally
ask the model to find the right title in the list, which the tiny CPU model does not learn in minutes.
The question and options come first and the quote last, so the clues sit right before the answer.

Held-out examples, by `heldout`:
  "slice"  a seeded fraction of every play's speeches is set aside; train records never use those speeches. The
           play and speaker tasks stay answerable (same plays, same speakers) but the lines are new.
  "plays"  held-out records come from data.corpus.VALIDATION_PLAYS, which pretraining never saw either.
Everything is a pure function of the seed (speeches are parsed in file order, choices come from one numpy
Generator per split), so two calls give identical records.

Parsing: a speech is a blank-line separated paragraph whose first line is the speaker's name followed by a
period ("MACBETH.", "Hor.", "FIRST WITCH."); bracketed stage directions are dropped. Poems (no speakers) and
speakers with fewer than `min_speeches` speeches are left out, so every option is a real, frequent speaker.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np

from internlm_jax.data import corpus
from internlm_jax.data.sources import DataError

TASKS = ("play", "speaker", "continue")
LETTERS = "ABCDEFGH"
_SPEAKER_RE = re.compile(r"^([A-Z][A-Za-z'\- ]{0,40}[A-Za-z])\.$")
_DIRECTION_RE = re.compile(r"\[[^\]]*\]")


@dataclasses.dataclass(frozen=True)
class Speech:
  play: str         # file stem, e.g. "macbeth"
  speaker: str      # as printed, without the period: "MACBETH", "Hor."
  lines: tuple[str, ...]


@dataclasses.dataclass
class Play:
  name: str
  title: str        # e.g. "Macbeth", "Hamlet, Prince Of Denmark"
  speeches: list[Speech]
  speakers: list[str]  # frequent speakers, most speeches first


def _title_case(text: str) -> str:
  """"LOVE'S LABOUR'S LOST" -> "Love's Labour's Lost", keeping roman numerals ("Henry IV")."""
  words = [w if re.fullmatch(r"[IVX]+,?", w) else w[:1].upper() + w[1:].lower() for w in text.split()]
  return " ".join(words)


def parse_play(path: str, min_speeches: int = 10) -> Play:
  """Speeches of one `*_gut.txt` file (see the module doc)."""
  name = os.path.basename(path)[:-len("_gut.txt")]
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  title = _title_case(text.strip().splitlines()[0].strip())
  speeches = []
  for para in re.split(r"\n\s*\n", text):
    rows = [r.strip() for r in para.strip().splitlines()]
    if len(rows) < 2:
      continue
    head = _SPEAKER_RE.match(rows[0])
    # A lowercase speaker line of more than one short word is verse ending in a period, not a name.
    if head is None or (head.group(1) != head.group(1).upper() and len(head.group(1)) > 6):
      continue
    lines = tuple(l for l in (_DIRECTION_RE.sub("", r).strip() for r in rows[1:]) if l)
    if lines:
      speeches.append(Speech(name, head.group(1), lines))
  counts: dict[str, int] = {}
  for s in speeches:
    counts[s.speaker] = counts.get(s.speaker, 0) + 1
  speakers = sorted((s for s, n in counts.items() if n >= min_speeches), key=lambda s: (-counts[s], s))
  return Play(name, title, [s for s in speeches if s.speaker in speakers], speakers)


def load_plays(split: str, min_speeches: int = 10, min_speakers: int = 4) -> list[Play]:
  """Plays of a corpus split that have at least `min_speakers` frequent speakers (poems have none)."""
  plays = [parse_play(p, min_speeches) for p in corpus.shakespeare_files(split)]
  return [p for p in plays if len(p.speakers) >= min_speakers]


def _quote(lines: Sequence[str], max_chars: int) -> str:
  """Whole lines from the start, up to about max_chars (at least one line, cut if that one is longer)."""
  out, size = [], 0
  for line in lines:
    if out and size + len(line) > max_chars:
      break
    out.append(line)
    size += len(line) + 1
  return "\n".join(out)[:max_chars]


def _choices(rng: np.random.Generator, correct: str, pool: Sequence[str], k: int,
             shuffle: bool = True) -> tuple[list[str], str]:
  """k options holding `correct` and k-1 others from `pool`; (options, gold letter). Shuffled, or in pool order
  (with k == len(pool) every question then shows the same list, a k-way classification with lettered labels)."""
  others = [x for x in pool if x != correct]
  picked = [others[i] for i in rng.choice(len(others), size=k - 1, replace=False)] + [correct]
  options = [picked[i] for i in rng.permutation(k)] if shuffle else [x for x in pool if x in picked]
  return options, LETTERS[options.index(correct)]


def _options_text(options: Sequence[str]) -> str:
  return "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))


def _record(task: str, prompt: str, answer: str, **extra) -> dict:
  return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
          "answer": answer, "task": task, **extra}


def make_example(task: str, speech: Speech, plays: dict[str, Play], rng: np.random.Generator, *,
                 num_options: int = 4, max_chars: int = 200, min_chars: int = 60,
                 shuffle_options: bool = True) -> dict | None:
  """One record of `task` about `speech` (None when the speech cannot carry that task: a quote shorter than
  `min_chars` gives too little to go on, and a speaker outside the play's `num_options` most frequent ones
  cannot be asked about with fixed options)."""
  play = plays[speech.play]
  if task in ("play", "speaker") and len(_quote(speech.lines, max_chars)) < min_chars:
    return None
  speakers = play.speakers if shuffle_options else sorted(play.speakers[:num_options])
  if task == "speaker" and speech.speaker not in speakers:
    return None
  if task == "play":
    options, letter = _choices(rng, play.title, [p.title for p in plays.values()], num_options, shuffle_options)
    prompt = (f"Which play is this speech from? Answer with the letter.\n{_options_text(options)}\n"
              f"\"{_quote(speech.lines, max_chars)}\" -- {speech.speaker}")
    return _record(task, prompt, letter, options=options, play=play.name)
  if task == "speaker":
    options, letter = _choices(rng, speech.speaker, speakers, num_options, shuffle_options)
    prompt = (f"In {play.title}, who speaks these lines? Answer with the letter.\n{_options_text(options)}\n"
              f"\"{_quote(speech.lines, max_chars)}\"")
    return _record(task, prompt, letter, options=options, play=play.name)
  if task == "continue":
    if len(speech.lines) < 2:
      return None
    cut = int(rng.integers(1, len(speech.lines)))
    opening = _quote(speech.lines[max(0, cut - 3):cut], max_chars)
    prompt = f"Continue this speech by {speech.speaker} in {play.title}:\n{opening}"
    return _record(task, prompt, speech.lines[cut], play=play.name)
  raise DataError(f"unknown Shakespeare task {task!r}; choose from {TASKS}")


def _examples(tasks, speeches, plays, n: int, rng, **options) -> list[dict]:
  """n records, tasks in turn, each about a speech drawn at random from `speeches` (without replacement
  until the pool runs out, so small pools repeat speeches rather than fail)."""
  out, order, i = [], [], 0
  attempts = 0
  while len(out) < n:
    if i >= len(order):
      order, i = rng.permutation(len(speeches)), 0
    record = make_example(tasks[len(out) % len(tasks)], speeches[order[i]], plays, rng, **options)
    i += 1
    attempts += 1
    if record is not None:
      out.append(record)
    elif attempts > 20 * n + 100:
      raise DataError(f"cannot build {n} examples of tasks {list(tasks)}: too few usable speeches")
  return out


def build_tasks(seed: int = 0, tasks: Sequence[str] = ("play", "speaker"), n_train: int = 2000,
                n_heldout: int = 200, *, heldout: str = "slice", heldout_fraction: float = 0.2,
                plays: Sequence[str] | None = None, num_options: int = 4, max_chars: int = 200,
                shuffle_options: bool = True) -> tuple[list[dict], list[dict]]:
  """(train records, held-out records); see the module doc. `plays` limits the plays used (file stems), in
  that order (the option order when `shuffle_options` is False)."""
  tasks = tuple(tasks)
  if not tasks or any(t not in TASKS for t in tasks):
    raise DataError(f"Shakespeare tasks must be names from {TASKS}, got {list(tasks)}")
  if not 2 <= num_options <= len(LETTERS):
    raise DataError(f"num_options must be in 2..{len(LETTERS)}, got {num_options}")
  if heldout not in ("slice", "plays") or not 0.0 < heldout_fraction < 1.0:
    raise DataError(f"heldout must be 'slice' or 'plays' and 0 < heldout_fraction < 1, got {heldout!r}, "
                    f"{heldout_fraction}")

  def pick(found: list[Play], names: Sequence[str] | None) -> dict[str, Play]:
    by_name = {p.name: p for p in found}
    unknown = [n for n in names or () if n not in by_name]
    if unknown:
      raise DataError(f"unknown or speakerless plays {unknown}; choose from {sorted(by_name)}")
    chosen = {n: by_name[n] for n in (names if names is not None else by_name)}
    if len(chosen) < num_options and "play" in tasks:
      raise DataError(f"the play task needs at least {num_options} plays, have {sorted(chosen)}")
    if not chosen:
      raise DataError(f"no plays left after selecting {list(names or [])}")
    return chosen

  rng = np.random.default_rng(seed)
  train_plays = pick(load_plays("train"), plays)
  if heldout == "plays":  # `plays` selects training plays; the held-out ones are all the validation plays
    eval_plays = pick(load_plays("validation"), None)
    train_speeches = [s for p in train_plays.values() for s in p.speeches]
    eval_speeches = [s for p in eval_plays.values() for s in p.speeches]
  else:
    eval_plays = train_plays
    train_speeches, eval_speeches = [], []
    for p in train_plays.values():
      held = rng.random(len(p.speeches)) < heldout_fraction
      train_speeches += [s for s, h in zip(p.speeches, held) if not h]
      eval_speeches += [s for s, h in zip(p.speeches, held) if h]
  options = dict(num_options=num_options, max_chars=max_chars, shuffle_options=shuffle_options)
  train = _examples(tasks, train_speeches, train_plays, n_train, np.random.default_rng([seed, 1]), **options)
  held_out = _examples(tasks, eval_speeches, eval_plays, n_heldout, np.random.default_rng([seed, 2]), **options)
  return train, held_out


def to_preferences(records: Sequence[dict], seed: int = 0) -> list[dict]:
  """DPO pairs from task records: the gold answer is chosen; a wrong option (multiple choice) or another
  record's answer (continue) is rejected."""
  rng = np.random.default_rng(seed)
  answers = [r["answer"] for r in records]
  out = []
  for r in records:
    if r.get("options"):
      wrong = [LETTERS[i] for i in range(len(r["options"])) if LETTERS[i] != r["answer"]]
    else:
      wrong = [a for a in answers if a != r["answer"]] or ["..."]
    prompt = [m for m in r["messages"] if m["role"] != "assistant"]
    out.append({"prompt": prompt, "chosen": r["answer"], "rejected": wrong[int(rng.integers(len(wrong)))],
                "task": r["task"]})
  return out
