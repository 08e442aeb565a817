"""Lucene's English analyzer (pyserini's default, hence s3's BM25) in Python: StandardTokenizer word rules,
EnglishPossessiveFilter, LowerCaseFilter, the 33 English stopwords, PorterStemFilter.

The tokenizer follows the Unicode word-break rules (UAX #29) that Lucene's StandardTokenizer implements, for
the cases that occur in Wikipedia text: letters joined across an apostrophe, period or colon ("hold'em",
"u.s", "e.t"), digits joined across a comma, period or semicolon ("500,000", "8,848.86"), Hebrew letters
across a gershayim, combining marks and format characters kept inside a word, underscores joining words but
never forming a token alone, "½" and "²" not word characters, each Han ideograph and Hiragana letter a token
of its own, emoji (and the symbols Lucene treats as emoji, such as "☉") as tokens, and tokens longer than
255 characters split as Lucene splits them. On wiki-vital's 10,033 passages and 1,901 questions the terms
equal Lucene's for every text.
"""

from __future__ import annotations

import re
import unicodedata

from s3_jax.retrieval.porter import stem

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET.
LUCENE_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no",
    "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to",
    "was", "will", "with"))



def _char_classes(*groups: tuple[str, ...]) -> list[str]:
  """For each group of Unicode categories, a regex class body (ranges) of the Basic Multilingual Plane's
  characters in it; one pass over the plane."""
  ranges: list[list[str]] = [[] for _ in groups]
  starts: list[int | None] = [None] * len(groups)
  for code in range(0x10001):
    category = unicodedata.category(chr(code)) if code < 0x10000 else ""
    for g, categories in enumerate(groups):
      inside = category in categories
      if inside and starts[g] is None:
        starts[g] = code
      elif not inside and starts[g] is not None:
        ranges[g].append(f"\\u{starts[g]:04x}-\\u{code - 1:04x}")
        starts[g] = None
  return ["".join(r) for r in ranges]


def _ranges(spec: str) -> str:
  """"00a9 2194-2199" -> a regex class body of those code points."""
  out = []
  for part in spec.split():
    first, _, last = part.partition("-")
    out.append(re.escape(chr(int(first, 16))) + (f"-{re.escape(chr(int(last, 16)))}" if last else ""))
  return "".join(out)


# Characters StandardTokenizer emits as emoji tokens (one each, or one sequence joined by U+200D or skin
# tones), as recorded from Lucene 9 (pyserini 1.6.0) for the symbol blocks.
_EMOJI = _ranges(
    "00a9 00ae 203c 2049 2122 2194-2199 21a9-21aa 231a-231b 2328 2388 23cf 23e9-23f3 23f8-23fa "
    "25aa-25ab 25b6 25c0 25fb-25fe 2600-2605 2607-2612 2614-2685 2690-2705 2708-2712 2714 2716 271d "
    "2721 2728 2733-2734 2744 2747 274c 274e 2753-2755 2757 2763-2767 2795-2797 27a1 27b0 27bf "
    "2934-2935 2b05-2b07 2b1b-2b1c 2b50 2b55 1f000-1f02b 1f030-1f093 1f0a0-1f0ae 1f0b1-1f0bf "
    "1f0c1-1f0cf 1f0d1-1f0f5 1f10d-1f10f 1f12f-1f149 1f150-1f169 1f16c-1f189 1f18e 1f191-1f19a "
    "1f1ad 1f200-1f202 1f21a 1f22f 1f232-1f23a 1f250-1f251 1f260-1f265 1f300-1f53d 1f546-1f64f "
    "1f680-1f6d7 1f6dd-1f6ec 1f6f0-1f6fc 1f7d5-1f7d8 1f7e0-1f7eb 1f7f0 1f8b0-1f8b1 1f90c-1f93a "
    "1f93c-1f945 1f947-1fa53 1fa60-1fa6d 1fa70-1fa74 1fa78-1fa7c 1fa80-1fa86 1fa90-1faac "
    "1fab0-1faba 1fac0-1fac5 1fad0-1fad9 1fae0-1fae7 1faf0-1faf6")
_SKIN_TONES = _ranges("1f3fb-1f3ff")
# Symbols that UAX #29 counts as letters (modifier letters, Armenian and Hebrew marks, circled letters).
_SYMBOL_LETTERS = _ranges("02c2-02c5 02d2-02d7 02de-02df 02ed 02ef-02ff 055b-055c 055e 05f3 109e-109f "
                          "19de-19df 1aa0-1aa6 1aa8-1aad 24b6-24e9")
_IDEOGRAPHIC = "\u2e80-\u2fd5\u3040-\u309f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# "½", "²" (No): not word characters in UAX #29, but in Python's \w; combining marks and format characters
# (Mn, Mc, Me, Cf) stay inside a token.
_OTHER_NUMBERS, _EXTEND = _char_classes(("No",), ("Mn", "Mc", "Me", "Cf"))
_WORD = rf"(?:[^\W{_IDEOGRAPHIC}{_OTHER_NUMBERS}]|[{_SYMBOL_LETTERS}])"  # letters, digits, underscore
_LETTER = rf"(?:[^\W\d_{_IDEOGRAPHIC}{_OTHER_NUMBERS}]|[{_SYMBOL_LETTERS}])"
# Joiners between letters (MidLetter, MidNumLet, Single_Quote) and between digits (MidNum, MidNumLet, SQ).
_MID_LETTER = _ranges("27 2e 3a b7 387 5f4 2018 2019 2024 2027 fe13 fe52 fe55 ff07 ff0e ff1a")
_MID_NUM = _ranges("27 2e 2c 3b 37e 589 60c 60d 66c 7f8 2018 2019 2024 2044 fe10 fe14 fe50 fe52 fe54 ff07 "
                   "ff0c ff0e ff1b")
_TOKEN = re.compile(
    rf"[{_EMOJI}](?:\u200d[{_EMOJI}]|[{_SKIN_TONES}]|[{_EXTEND}])*"
    rf"|[{_IDEOGRAPHIC}]"
    rf"|{_WORD}(?:{_WORD}|[{_EXTEND}])*"
    rf"(?:(?:(?<={_LETTER})[{_MID_LETTER}](?={_LETTER})|(?<=\d)[{_MID_NUM}](?=\d)|(?<=[\u05d0-\u05ea])\"(?=[\u05d0-\u05ea]))"
    rf"(?:{_WORD}|[{_EXTEND}])+)*")
# The same rules for ASCII text, which most queries are (2x faster than the Unicode classes).
_ASCII_TOKEN = re.compile(r"[A-Za-z0-9_]+(?:(?:(?<=[A-Za-z])['.:](?=[A-Za-z])|(?<=[0-9])['.,;](?=[0-9]))"
                          r"[A-Za-z0-9_]+)*")
_ALNUM = re.compile(r"[^\W_]")
_SYMBOL = re.compile(rf"[{_EMOJI}{_SYMBOL_LETTERS}{_IDEOGRAPHIC}]")
_MAX_TOKEN = 255


def tokenize(text: str) -> list[str]:
  """StandardTokenizer: the word tokens of `text`, case kept."""
  tokens = []
  for token in (_ASCII_TOKEN if text.isascii() else _TOKEN).findall(text):
    if not _ALNUM.search(token) and not _SYMBOL.match(token):
      continue  # underscores only
    if len(token) > _MAX_TOKEN:
      tokens.extend(token[i:i + _MAX_TOKEN] for i in range(0, len(token), _MAX_TOKEN))
    else:
      tokens.append(token)
  return tokens


def analyze(text: str) -> list[str]:
  """The index terms of `text`, as Lucene's English analyzer (Porter) produces them."""
  terms = []
  for token in tokenize(text):
    if len(token) >= 2 and token[-1] in "sS" and token[-2] in "'\u2019\uff07":
      token = token[:-2]  # EnglishPossessiveFilter
    token = token.replace("\u0130", "i").lower()  # Java lowercases "İ" to "i", Python to "i" + U+0307
    if token not in LUCENE_STOPWORDS:
      terms.append(stem(token))
  return terms
