"""Answer extraction and scores: option letters, GSM8K numbers, MATH boxed answers, pass@k, BLEU, ROUGE,
perplexity and bits per byte. Pure functions on text and numbers, so each rule is testable on its own."""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

# ---- multiple choice --------------------------------------------------------------------------------------------

def extract_option(text: str, labels: Sequence[str] = "ABCD") -> str:
  """The option letter a free-form answer chooses ("" if none): an explicit "answer is (B)" first, then a letter
  leading the answer ("B.", "(B)", "B"), then the first standalone option letter, then the first capital among
  the labels anywhere (OpenCompass's first_capital fallback)."""
  labels = [str(x) for x in labels]
  if not text:
    return ""
  group = "|".join(re.escape(x) for x in labels)
  patterns = (rf"answer\s*(?:is|:)?\s*[:：]?\s*\(?\**\s*({group})\b",
              rf"^\s*\(?\**({group})(?:[.:)\s*]|$)",
              rf"(?<![A-Za-z])({group})(?![A-Za-z])")
  for flags, pattern in zip((re.IGNORECASE, 0, 0), patterns):
    m = re.search(pattern, text, flags)
    if m:
      return m.group(1).upper() if m.group(1).upper() in labels else m.group(1)
  for ch in text:
    if ch in labels:
      return ch
  return ""


# ---- GSM8K ----------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")


def last_number(text: str) -> str:
  """OpenCompass's GSM8K rule: cut at the next "Question:", drop thousands separators, take the last number."""
  text = text.split("Question:")[0]
  text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else ""


def numbers_equal(pred: str, reference: str) -> bool:
  if not pred:
    return False
  if pred == reference:
    return True
  try:
    return abs(float(pred) - float(reference)) < 1e-6
  except ValueError:
    return False


# ---- MATH -----------------------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}; braces balanced), or of `\\boxed x`; None when absent."""
  starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text or "")]
  if not starts:
    return None
  m = starts[-1]
  i = m.end()
  if i < len(text) and text[i] != "{":
    token = re.match(r"[^\s$]+", text[i:])
    return token.group(0) if token else None
  depth = 0
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i + 1:j]
  return None


def _braced_fracs(s: str) -> str:
  """\\frac12 -> \\frac{1}{2}, \\frac1{x} -> \\frac{1}{x}: the same value written with braces."""
  out, parts = [], s.split("\\frac")
  out.append(parts[0])
  for part in parts[1:]:
    if part.startswith("{"):
      out.append(part)
      continue
    if len(part) < 2:
      return s
    a, rest = part[0], part[1:]
    if rest.startswith("{"):
      out.append("{" + a + "}" + rest)
    else:
      out.append("{" + a + "}{" + rest[0] + "}" + rest[1:])
  return "\\frac".join(out)


def _slash_fraction(s: str) -> str:
  m = re.fullmatch(r"(-?\d+)/(\d+)", s)
  return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def normalize_math(answer: str) -> str:
  """A canonical string for a MATH answer, so equal answers written differently compare equal (our own
  rules after the spirit of the Hendrycks MATH normalization: spacing, units, degrees, dollars, fraction and
  sqrt forms, leading zeros, a short `x =` prefix)."""
  s = str(answer).strip().replace("\n", "").replace("\\!", "")
  s = re.sub(r"\\+", r"\\", s)
  s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
  s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
  s = s.replace("\\%", "").replace("%", "")
  s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s).strip() or s  # trailing units
  s = re.sub(r"\\(?:text|mbox|mathrm)\{([^}]*)\}", r"\1", s)
  s = s.replace(" .", " 0.").replace("{.", "{0.")
  if s.startswith("."):
    s = "0" + s
  lhs = re.match(r"^\s*[a-zA-Z]\w{0,1}\s*=\s*(.+)$", s)
  if lhs:
    s = lhs.group(1)
  s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
  s = s.replace(" ", "")
  s = _braced_fracs(s)
  if s == "0.5":
    s = "\\frac{1}{2}"
  s = _slash_fraction(s)
  s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)  # 3.0 -> 3
  return s


def math_equal(pred: str | None, reference: str) -> bool:
  if pred is None:
    return False
  a, b = normalize_math(pred), normalize_math(reference)
  if a == b:
    return True
  try:
    return abs(float(a) - float(b)) < 1e-6
  except ValueError:
    return False


# ---- code -----------------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable running product."""
  if n < k:
    raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ---- text overlap ---------------------------------------------------------------------------------------------

def bleu(predictions: list[str], references: list[str]) -> float:
  """Corpus BLEU (sacrebleu's default 13a tokenization), 0..100."""
  import sacrebleu
  return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemming), 0..100."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
  for p, r in zip(predictions, references):
    for key, value in scorer.score(r, p).items():
      totals[key] += value.fmeasure
  n = max(len(predictions), 1)
  return {k: 100.0 * v / n for k, v in totals.items()}


# ---- language modeling ----------------------------------------------------------------------------------------

def perplexity(total_logprob: float, num_tokens: int) -> float:
  return math.exp(-total_logprob / max(num_tokens, 1))


def bits_per_byte(total_logprob: float, num_bytes: int) -> float:
  """Tokenizer-independent: the text's negative log-likelihood in bits over its UTF-8 length."""
  return -total_logprob / (math.log(2) * max(num_bytes, 1))
