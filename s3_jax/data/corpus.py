"""Corpus records (`Doc`) and the corpus JSONL reader.

Two row formats are accepted everywhere (DESIGN.md, "Interfaces"):
  * wiki-18 / FlashRAG: `{"id", "contents"}` with `contents = '"Title"\\ntext'`;
  * split fields: `{"id", "title", "text"}`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from s3_jax.data.jsonl import DataFormatError, iter_jsonl


@dataclasses.dataclass(frozen=True, slots=True)
class Doc:
  """One corpus passage. `title` is stored without the wiki-18 surrounding quotes.

  `score` is the retriever's score when the doc comes from a search, `None` otherwise.
  """

  id: str
  title: str
  text: str
  score: float | None = None

  @property
  def contents(self) -> str:
    """The wiki-18 `contents` string: the quoted title, a newline, the text."""
    return f'"{self.title}"\n{self.text}'

  def to_row(self) -> dict[str, str]:
    """The corpus JSONL row in wiki-18 form."""
    return {"id": self.id, "contents": self.contents}


def split_contents(contents: str) -> tuple[str, str]:
  """Splits wiki-18 `contents` into `(title, text)`.

  The title is the first line with one pair of surrounding double quotes removed (when both are
  present); the text is everything after the first newline (empty when there is none).
  """
  title, _, text = contents.partition("\n")
  if len(title) >= 2 and title.startswith('"') and title.endswith('"'):
    title = title[1:-1]
  return title, text


def doc_from_row(row: dict[str, Any]) -> Doc:
  """Builds a `Doc` from a corpus row of either format; raises `ValueError` with the reason."""
  doc_id = row.get("id")
  if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
    raise ValueError(f"'id' must be a string or an integer, got {doc_id!r}")
  if "contents" in row:
    contents = row["contents"]
    if not isinstance(contents, str):
      raise ValueError(f"'contents' must be a string, got {type(contents).__name__}")
    title, text = split_contents(contents)
  elif "title" in row and "text" in row:
    title, text = row["title"], row["text"]
    if not isinstance(title, str) or not isinstance(text, str):
      raise ValueError("'title' and 'text' must be strings")
  else:
    raise ValueError(
        f"a corpus row needs 'contents' or both 'title' and 'text'; got keys {sorted(row)}")
  return Doc(id=str(doc_id), title=title, text=text)


def _numbered_docs(path: str | os.PathLike) -> Iterator[tuple[int, Doc]]:
  for line_no, row in iter_jsonl(path):
    try:
      yield line_no, doc_from_row(row)
    except ValueError as e:
      raise DataFormatError(path, line_no, str(e)) from e


def iter_corpus(path: str | os.PathLike) -> Iterator[Doc]:
  """Streams the `Doc`s of a corpus JSONL file; a malformed row raises naming file and line."""
  for _, doc in _numbered_docs(path):
    yield doc


def read_corpus(path: str | os.PathLike, limit: int | None = None) -> list[Doc]:
  """Reads a corpus JSONL file into memory (the first `limit` docs when given).

  Duplicate ids are an error: retrieval results are keyed by id.
  """
  docs: list[Doc] = []
  first_line: dict[str, int] = {}
  for line_no, doc in _numbered_docs(path):
    if limit is not None and len(docs) >= limit:
      break
    if doc.id in first_line:
      raise DataFormatError(
          path, line_no, f"duplicate doc id {doc.id!r} (first at line {first_line[doc.id]})")
    first_line[doc.id] = line_no
    docs.append(doc)
  return docs
