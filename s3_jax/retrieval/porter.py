"""The Porter stemmer exactly as Lucene's `PorterStemFilter` applies it (the English analyzer of pyserini,
hence of s3's BM25 runs).

Lucene ports Martin Porter's ANSI C implementation, which departs from the 1980 paper that most Python
stemmers (PyStemmer's "porter", Snowball) follow: words of one or two letters are left alone ("us" stays
"us", not "u"), and step 2 maps "-bli" to "-ble" and "-logi" to "-log" ("possibly" -> "possibl",
"mythology" -> "mytholog"). Any character that is not a vowel counts as a consonant, as in Lucene, so
tokens such as "hold'em" or "u.s" are stemmed the same way.

Written from the algorithm's description; `tests/test_bm25_lucene.py` checks it against Lucene's output.
"""

from __future__ import annotations

import functools

_VOWELS = frozenset("aeiou")

# Step 2 (the paper's numbering): by the second-to-last letter, (suffix, replacement) tried in order; the
# first suffix that matches ends the step, whether or not the measure allows the replacement.
_STEP2 = {
    "a": (("ational", "ate"), ("tional", "tion")),
    "c": (("enci", "ence"), ("anci", "ance")),
    "e": (("izer", "ize"),),
    "l": (("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous")),
    "o": (("ization", "ize"), ("ation", "ate"), ("ator", "ate")),
    "s": (("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous")),
    "t": (("aliti", "al"), ("iviti", "ive"), ("biliti", "ble")),
    "g": (("logi", "log"),),
}
# Step 3: by the last letter.
_STEP3 = {
    "e": (("icate", "ic"), ("ative", ""), ("alize", "al")),
    "i": (("iciti", "ic"),),
    "l": (("ical", "ic"), ("ful", "")),
    "s": (("ness", ""),),
}
# Step 4: suffixes removed when the measure of the rest is > 1, by the second-to-last letter.
_STEP4 = {
    "a": ("al",), "c": ("ance", "ence"), "e": ("er",), "i": ("ic",), "l": ("able", "ible"),
    "n": ("ant", "ement", "ment", "ent"), "o": ("ion", "ou"), "s": ("ism",), "t": ("ate", "iti"),
    "u": ("ous",), "v": ("ive",), "z": ("ize",),
}


def _consonant(w: str, i: int) -> bool:
  ch = w[i]
  if ch in _VOWELS:
    return False
  if ch == "y":
    return i == 0 or not _consonant(w, i - 1)
  return True


def _measure(w: str, end: int) -> int:
  """Number of vowel-consonant sequences in w[:end]."""
  n, i = 0, 0
  while i < end and _consonant(w, i):
    i += 1
  while i < end:
    while i < end and not _consonant(w, i):
      i += 1
    if i >= end:
      break
    n += 1
    while i < end and _consonant(w, i):
      i += 1
  return n


def _has_vowel(w: str, end: int) -> bool:
  return any(not _consonant(w, i) for i in range(end))


def _double_consonant(w: str) -> bool:
  return len(w) >= 2 and w[-1] == w[-2] and _consonant(w, len(w) - 1)


def _cvc(w: str, end: int) -> bool:
  """w[:end] ends consonant-vowel-consonant, the last consonant not w, x or y."""
  i = end - 1
  return (i >= 2 and _consonant(w, i) and not _consonant(w, i - 1) and _consonant(w, i - 2)
          and w[i] not in "wxy")


def _step1(w: str) -> str:
  if w.endswith("s"):
    if w.endswith("sses"):
      w = w[:-2]
    elif w.endswith("ies"):
      w = w[:-2]
    elif len(w) >= 2 and w[-2] != "s":
      w = w[:-1]
  if w.endswith("eed"):
    if _measure(w, len(w) - 3) > 0:
      w = w[:-1]
    return w
  for suffix in ("ed", "ing"):
    if w.endswith(suffix) and _has_vowel(w, len(w) - len(suffix)):
      w = w[:-len(suffix)]
      if w.endswith(("at", "bl", "iz")):
        w += "e"
      elif _double_consonant(w):
        if w[-1] not in "lsz":
          w = w[:-1]
      elif _measure(w, len(w)) == 1 and _cvc(w, len(w)):
        w += "e"
      return w
  return w


def _replace_first(w: str, rules, min_measure: int = 0) -> str:
  for suffix, replacement in rules:
    if w.endswith(suffix):
      stem = len(w) - len(suffix)
      return w[:stem] + replacement if _measure(w, stem) > min_measure else w
  return w


@functools.lru_cache(maxsize=1 << 20)
def stem(word: str) -> str:
  """The stem Lucene's PorterStemFilter gives `word` (expected lowercase)."""
  w = word
  if len(w) <= 2:
    return w
  w = _step1(w)
  if w.endswith("y") and _has_vowel(w, len(w) - 1):  # step 1c
    w = w[:-1] + "i"
  if len(w) > 1:
    w = _replace_first(w, _STEP2.get(w[-2], ()))
  w = _replace_first(w, _STEP3.get(w[-1], ()))
  if len(w) > 1:
    for suffix in _STEP4.get(w[-2], ()):
      if w.endswith(suffix):
        stem_end = len(w) - len(suffix)
        if suffix == "ion" and not (stem_end > 0 and w[stem_end - 1] in "st"):
          continue
        if _measure(w, stem_end) > 1:
          w = w[:stem_end]
        break
  if w.endswith("e"):  # step 5a
    m = _measure(w, len(w) - 1)
    if m > 1 or (m == 1 and not _cvc(w, len(w) - 1)):
      w = w[:-1]
  if w.endswith("ll") and _measure(w, len(w)) > 1:  # step 5b
    w = w[:-1]
  return w
