"""The s3 search protocol (spec §2.1, §2.3, §2.6): the searcher's prompt, action parsing, the environment's
strings, and the documents D_s3 handed to the generator.

Trained s3 checkpoints only work when these strings match s3 exactly; tests check them against the spec.
"""

from __future__ import annotations

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

# The verbatim template (spec §2.1), kept in a text file so that no line wrapping or editor touches it (it
# carries a trailing space after the first example's "}", as s3's does).
_TEMPLATE = (Path(__file__).parent / "s3_prompt.txt").read_text(encoding="utf-8")


def build_prompt(question: str, initial_docs: Sequence[Doc], bm25: bool = False) -> str:
  """s3's user message (`make_prefix`): instructions, the BM25 note when retrieval is BM25, the worked
  example, the anchor sentence, the normalised question and the initial documents."""
  return (_TEMPLATE.replace("<<BM25_NOTE>>", BM25_NOTE + "\n" if bm25 else "").replace("<<ANCHOR>>", ANCHOR)
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
  `<query>` (JSON `{"query": ...}`, a list's first element, or the raw text; empty still searches); else
  invalid."""
  complete = _COMPLETE.search(text)
  if complete and complete.group(1).strip().lower() in ("true", "yes", "1", "y"):
    return Action("complete")
  query = _QUERY.search(text)
  if query is None:
    return Action("invalid")
  raw = query.group(1).strip()
  try:
    value = json.loads(raw)["query"]
    if isinstance(value, list):
      value = value[0]
    return Action("search", str(value))
  except Exception:  # s3 falls back to the raw text on any parse error
    return Action("search", raw)


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
  """The `(number, Doc)` pairs of an information block in any of the three formats of spec §2.5 (s3's
  pattern: a title containing ")" is cut there, as in s3)."""
  return [(int(n), Doc(id=n, title=title.strip(), text=text.strip()))
          for n, title, text in _DOC.findall(block)]


def selected_ids(content: str, max_id: int = _MAX_FAITHFUL_ID) -> list[int]:
  """Every integer in an `<important_info>` body within 1..max_id, de-duplicated in order ("[1, 4]", "1,4"
  and "Doc 1 and Doc 4" all give [1, 4])."""
  return list(dict.fromkeys(i for i in map(int, re.findall(r"\d+", content)) if 1 <= i <= max_id))


def selected_ids_in(text: str, block_size: int) -> list[int] | None:
  """The ids of the first `<important_info>` in `text`, bounded by the block size; None without a tag."""
  tag = _IMPORTANT.search(text)
  return None if tag is None else selected_ids(tag.group(1), max_id=block_size)


def extract_selected_docs_faithful(trajectory_text: str) -> list[Doc]:
  """D_s3 exactly as s3's `extract_titles_and_texts` builds it from the decoded prompt + responses (spec
  §2.6, quirks included): every `<information>` block after the anchor counts, including ones the searcher
  wrote itself; each `<important_info>` claims the block that starts last before it if that block is still
  unclaimed; claimed blocks give their selected docs (ids 1-8, any number of them), unclaimed blocks all
  their docs; selected docs come first; docs with the same text are given once. (s3 turns any parser
  exception into an empty context; here a trajectory without the anchor is an error.)"""
  _, found, rest = trajectory_text.partition(ANCHOR)
  if not found:
    raise ValueError(f"the trajectory lacks the prompt's anchor sentence {ANCHOR!r}")
  blocks = [(m.start(), m.group(1)) for m in _INFORMATION.finditer(rest)]
  claimed: set[int] = set()
  selected: list[Doc] = []
  for tag in _IMPORTANT.finditer(rest):
    before = [i for i, (start, _) in enumerate(blocks) if start < tag.start()]
    if not before or before[-1] in claimed:
      continue
    claimed.add(before[-1])
    docs = dict(parse_docs(blocks[before[-1]][1]))
    selected.extend(docs[i] for i in selected_ids(tag.group(1)) if i in docs)
  unclaimed = [doc for i, (_, block) in enumerate(blocks) if i not in claimed
               for _, doc in parse_docs(block)]
  return _unique_texts(selected + unclaimed)


def extract_selected_docs_safe(blocks: Sequence[Sequence[Doc]], turns: Sequence[tuple[int, str]],
                               max_select: int) -> list[Doc]:
  """D_s3 from what the environment itself showed (a deliberate fix of spec §12 item 6): `blocks[b]` is the
  b-th block of documents the environment inserted (0 = the initial naive-RAG block) and each turn is
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
