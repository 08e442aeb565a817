"""Answer checks (s3_protocol.md §3.2): normalisation, span match, exact match, token F1.

All take the generator's answer and the gold answers — a list or tuple of strings, a numpy array of them (as
parquet gives), or one bare string, which counts as one answer (s3 wraps it in a list) — and try each gold
answer; the best result counts.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import regex

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# pyserini's SimpleTokenizer: runs of letters, numbers and marks, or any other single character that is
# neither a separator nor a control/format/unassigned character.
_SIMPLE_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                              flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def gold_list(golden_answers: Any) -> list[str]:
  """The gold answers as a list of strings: a bare string is one answer, a list, tuple or numpy array gives
  its elements; anything else, or an element that is not a string, is a `TypeError` naming the value."""
  if isinstance(golden_answers, str):
    return [str(golden_answers)]
  if isinstance(golden_answers, np.ndarray):
    golden_answers = golden_answers.tolist()
    if isinstance(golden_answers, str):  # a 0-d array
      return [golden_answers]
  if not isinstance(golden_answers, (list, tuple)):
    raise TypeError(f"gold answers must be a string, a list/tuple or a numpy array of strings; got "
                    f"{type(golden_answers).__name__} {golden_answers!r}")
  for gold in golden_answers:
    if not isinstance(gold, str):
      raise TypeError(f"a gold answer must be a string; got {type(gold).__name__} {gold!r} in "
                      f"{golden_answers!r}")
  return [str(gold) for gold in golden_answers]  # plain str (numpy's str_ prints differently)


def normalize_answer(text: str) -> str:
  """SQuAD-style normalisation, in s3's order: lowercase, delete every `string.punctuation`
  character, replace the articles `a|an|the` (as words) with a space, collapse whitespace."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def _simple_tokens(text: str) -> list[str]:
  """pyserini `has_answers`'s view of a text: NFD, SimpleTokenizer tokens, lowercased."""
  return [m.group().lower() for m in _SIMPLE_TOKEN.finditer(unicodedata.normalize("NFD", text))]


def span_match(prediction: str, golden_answers: Sequence[str] | str) -> bool:
  """s3's span check: both sides normalised with `normalize_answer`, then pyserini `has_answers`
  (regex=False) semantics — some gold answer's token sequence occurs contiguously in the prediction's.
  A gold answer that normalises to nothing matches any prediction, as in s3."""
  tokens = _simple_tokens(normalize_answer(prediction))
  for gold in gold_list(golden_answers):
    needle = _simple_tokens(normalize_answer(gold))
    if any(tokens[i:i + len(needle)] == needle for i in range(len(tokens) - len(needle) + 1)):
      return True
  return False


def exact_match(prediction: str, golden_answers: Sequence[str] | str) -> bool:
  """s3's `em_check`: the normalised prediction equals some normalised gold answer."""
  normalized = normalize_answer(prediction)
  return any(normalized == normalize_answer(gold) for gold in gold_list(golden_answers))


def f1(prediction: str, golden_answers: Sequence[str] | str) -> float:
  """SQuAD token F1 of the normalised prediction against the best gold answer (whitespace tokens):
  2 P R / (P + R) over the multiset of shared tokens; 0 when nothing is shared."""
  predicted = normalize_answer(prediction).split()
  best = 0.0
  for gold in gold_list(golden_answers):
    reference = normalize_answer(gold).split()
    shared = sum((collections.Counter(predicted) & collections.Counter(reference)).values())
    if shared:
      precision, recall = shared / len(predicted), shared / len(reference)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best
