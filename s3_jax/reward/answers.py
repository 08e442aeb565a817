"""Answer normalisation shared by every answer check (spec §3.2)."""

from __future__ import annotations

import re
import string

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD-style normalisation, in s3's order: lowercase, delete every `string.punctuation`
  character, replace the articles `a|an|the` (as words) with a space, collapse whitespace."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())
