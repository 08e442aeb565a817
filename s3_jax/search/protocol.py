"""The s3 search protocol (s3_protocol.md §2.1, §2.3, §2.6): the searcher's prompt, action parsing, the
environment's strings, and the documents D_s3 handed to the generator.

Trained s3 checkpoints only work when these strings match s3 exactly; tests check them against the spec.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

from s3_jax.data.corpus import Doc
from s3_jax.data.qa import normalize_question
from s3_jax.search.formats import initial_block

ANCHOR = "Now, start the loop with the following question and initial searched results:"
BM25_NOTE = ("Note: The search query should use Boolean operators (AND, OR) and parentheses for grouping "
             "terms appropriately.")
NUDGE = ("\n\nThe information is not enough to answer the question. Let me dive deeper by generating a brand "
         "new search query between <query> and </query> tags in JSON format:\n<query>\n")

# The verbatim template (s3_protocol.md §2.1), kept in a text file so that no line wrapping or editor touches
# it (it carries a trailing space after the first example's "}", as s3's does).
_TEMPLATE = (Path(__file__).parent / "s3_prompt.txt").read_text(encoding="utf-8")


def build_prompt(question: str, initial_docs: Sequence[Doc], bm25: bool = False) -> str:
  """s3's user message (`make_prefix`), whitespace included: the instructions (ending `\\n`), the BM25 note
  when retrieval is BM25 (no newline of its own, so the e5 prompt has a blank line before `For a question`
  and the BM25 prompt none), the worked example, the anchor sentence, the normalised question and the
  initial documents; it ends with `</information>\\n`."""
  return (_TEMPLATE.replace("<<BM25_NOTE>>", BM25_NOTE if bm25 else "").replace("<<ANCHOR>>", ANCHOR)
          .replace("<<QUESTION>>", normalize_question(question))
          .replace("<<INITIAL>>", initial_block(initial_docs).strip()))


@dataclasses.dataclass(frozen=True)
class Action:
  kind: str  # "search" | "complete" | "invalid"
  query: str | None = None


_COMPLETE = re.compile(r"<search_complete>(.*?)</search_complete>", re.DOTALL)
_QUERY = re.compile(r"<query>(.*?)</query>", re.DOTALL)


def parse_action(text: str) -> Action:
  """s3's `postprocess_predictions`: a first `<search_complete>` of true/yes/1/y wins; else the first
  `<query>` (see `query_string`; empty still searches); else invalid."""
  complete = _COMPLETE.search(text)
  if complete and complete.group(1).strip().lower() in ("true", "yes", "1", "y"):
    return Action("complete")
  query = _QUERY.search(text)
  if query is None:
    return Action("invalid")
  return Action("search", query_string(query.group(1).strip()))


def query_string(raw: str) -> str:
  """The search string of a stripped `<query>` body, as s3 derives it: a JSON object's `"query"` when it is a
  string, or the first element of a list when that is a string; the raw text for anything else (not JSON, not
  an object, no `"query"` key, a number / null / boolean / object value, an empty list).

  Where s3 has no string of its own, this differs (README, "Differences from s3"): a list whose first element
  is not a string is sent by s3 as that value, which its server rejects (every search of the batch then
  returns "Error"), and JSON that Python cannot parse without a `RecursionError` or an over-long integer
  crashes s3's rollout; both search the raw text here."""
  try:
    data = json.loads(raw)
  except (ValueError, RecursionError):  # JSONDecodeError and int-conversion limits are ValueErrors
    return raw
  if not isinstance(data, dict) or "query" not in data:
    return raw
  value = data["query"]
  if isinstance(value, list):
    value = value[0] if value else None
  return value if isinstance(value, str) else raw


def cut_response(text: str) -> str:
  """s3's post-processing of a sampled turn: everything after the first `</query>` is dropped, and
  `<query>\\n` is prepended when the kept text closes a query it never opened (after the nudge)."""
  end = text.find("</query>")
  if end == -1:
    return text
  text = text[:end + len("</query>")]
  return text if "<query>" in text else "<query>\n" + text


def observation_text(docs_string: str) -> str:
  """The environment's reply to a search: the formatted documents inside `<information>`."""
  return f"\n\n<information>{docs_string.strip()}</information>\n\n"


_INFORMATION = re.compile(r"<information>(.*?)</information>", re.DOTALL)
_IMPORTANT = re.compile(r"<important_info>(.*?)</important_info>", re.DOTALL)
_DOC = re.compile(r'Doc\s*(\d+)\s*\(\s*Title\s*:\s*"?([^")]+)"?\)\s*(.*?)(?=Doc\s*\d+\s*\(\s*Title\s*:|$)',
                  re.IGNORECASE | re.DOTALL)
_NUMBER = re.compile(r"\d+")
_MAX_FAITHFUL_ID = 8  # s3 hard-codes ids 1..8


def _unique_texts(docs: Sequence[Doc]) -> list[Doc]:
  seen: set[str] = set()
  out = []
  for doc in docs:
    if doc.text not in seen:
      seen.add(doc.text)
      out.append(doc)
  return out


def parse_docs(block: str) -> list[tuple[int, Doc]]:
  """The `(number, Doc)` pairs of an information block in any of the three formats of s3_protocol.md §2.5, by
  s3's pattern: a title containing `"` or `)` is cut there (the rest leaks into the text), a number that
  occurs twice gives two docs, and a doc whose number `int()` cannot convert (over 4,300 digits) is dropped,
  as s3 drops it."""
  docs = []
  for match in _DOC.finditer(block):
    try:
      number = int(match.group(1))
    except ValueError:
      continue
    docs.append((number, Doc(id=match.group(1), title=match.group(2).strip(), text=match.group(3).strip())))
  return docs


def _faithful_ids(content: str) -> list[int]:
  """s3's ids of an `<important_info>` body: every integer in 1..8, de-duplicated in order; if any number of
  the body cannot be converted (over 4,300 digits) the list is empty, as s3's `except` leaves it."""
  try:
    ids = [int(n) for n in _NUMBER.findall(content) if 1 <= int(n) <= _MAX_FAITHFUL_ID]
  except ValueError:
    return []
  return list(dict.fromkeys(ids))


def selected_ids(content: str, max_id: int) -> list[int]:
  """Every integer in an `<important_info>` body within 1..max_id, de-duplicated in order ("[1, 4]", "1,4"
  and "Doc 1 and Doc 4" all give [1, 4]); a number too long to convert is out of range. Never raises."""
  ids = []
  for n in _NUMBER.findall(content):
    try:
      value = int(n)
    except ValueError:  # over 4,300 digits: far outside any block
      continue
    if 1 <= value <= max_id:
      ids.append(value)
  return list(dict.fromkeys(ids))


def selected_ids_in(text: str, block_size: int) -> list[int] | None:
  """The ids of the first `<important_info>` in `text`, bounded by the block size; None without a tag."""
  tag = _IMPORTANT.search(text)
  return None if tag is None else selected_ids(tag.group(1), max_id=block_size)


def extract_selected_docs_faithful(trajectory_text: str) -> list[Doc]:
  """D_s3 exactly as s3 builds it from the decoded prompt + responses: `extract_titles_and_texts` on
  `trajectory_text.split(ANCHOR)[1]` (s3_protocol.md §2.6, quirks included; the same documents in the same
  order for every input that holds the anchor).

  Only the text between the first and a second anchor sentence counts. Every `<information>` block in it
  counts, including ones the searcher wrote itself. Each `<important_info>` claims the block that starts last
  before it, if that block is still unclaimed, and keeps, in the block's own order, every parsed doc whose
  number is among its ids (1-8, any number of them); unclaimed blocks give all their docs; selected docs come
  first; a text already given is not given again. s3 returns an empty list when its parser raises; nothing
  here raises on model output. A text without the anchor (not a trajectory of this prompt) is an error here,
  where s3's reward function raises an IndexError."""
  parts = trajectory_text.split(ANCHOR)
  if len(parts) < 2:
    raise ValueError(f"the trajectory lacks the prompt's anchor sentence {ANCHOR!r}")
  rest = parts[1]
  blocks = [(m.start(), m.group(1)) for m in _INFORMATION.finditer(rest)]
  starts = [start for start, _ in blocks]
  claimed: set[int] = set()
  selected: list[Doc] = []
  for tag in _IMPORTANT.finditer(rest):
    b = bisect.bisect_left(starts, tag.start()) - 1  # the block that starts last before the tag
    if b < 0 or b in claimed:
      continue
    claimed.add(b)
    ids = _faithful_ids(tag.group(1))
    selected.extend(doc for number, doc in parse_docs(blocks[b][1]) if number in ids)
  unclaimed = [doc for i, (_, block) in enumerate(blocks) if i not in claimed
               for _, doc in parse_docs(block)]
  return _unique_texts(selected + unclaimed)


def extract_selected_docs_safe(blocks: Sequence[Sequence[Doc]], turns: Sequence[tuple[int, str]],
                               max_select: int) -> list[Doc]:
  """D_s3 from what the environment itself showed (a deliberate fix of s3_protocol.md §12 item 6): `blocks[b]`
  is the b-th block of documents the environment inserted (0 = the initial naive-RAG block) and each turn is
  `(b, text)`, the searcher's text and the block it followed. The first `<important_info>` among the turns
  that followed a block selects from it, ids are bounded by the block's size, at most `max_select` are kept;
  text the searcher writes (including `<information>` blocks of its own) never becomes a document. Blocks
  without a selection give all their documents, as in s3; selected documents come first; equal texts are
  given once."""
  selections: dict[int, list[int]] = {}
  for b, text in turns:
    if not 0 <= b < len(blocks):
      raise ValueError(f"a turn follows block {b}, but the environment inserted {len(blocks)} blocks")
    ids = selected_ids_in(text, len(blocks[b]))
    if ids is not None and b not in selections:
      selections[b] = ids[:max_select]
  selected = [blocks[b][j - 1] for b in sorted(selections) for j in selections[b]]
  unclaimed = [doc for b, block in enumerate(blocks) if b not in selections for doc in block]
  return _unique_texts(selected + unclaimed)
