"""Random access to corpus rows by position without loading the corpus: a byte-offset table over the
corpus JSONL (8 bytes per row) and a memory map. A 21M-passage wiki-18 needs ~170 MB of offsets instead
of tens of GB of Python objects, and opening it takes milliseconds."""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from s3_jax.data.corpus import Doc, doc_from_row
from s3_jax.data.jsonl import DataFormatError


def check_row(raw: bytes, corpus: str | Path, line_no: int, ids: dict[str, int]) -> None:
  """Checks one non-blank corpus line (JSON, a valid row, a new id; `ids` maps the ids seen to their row);
  raises `DataFormatError` naming `corpus` and `line_no`."""
  try:
    row = json.loads(raw.decode("utf-8"))
    if not isinstance(row, dict):
      raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    doc = doc_from_row(row)
  except UnicodeDecodeError as e:
    raise DataFormatError(corpus, line_no,
                          f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from e
  except ValueError as e:
    raise DataFormatError(corpus, line_no, str(e)) from e
  if doc.id in ids:
    raise DataFormatError(corpus, line_no, f"duplicate doc id {doc.id!r} (first at row {ids[doc.id]})")
  ids[doc.id] = len(ids)


def build_offsets(corpus: str | Path, out: str | Path) -> int:
  """Writes the start offset of every non-blank line of `corpus` to `out` (.npy); validates each row.
  Returns the number of rows."""
  offsets = []
  ids: dict[str, int] = {}
  with open(corpus, "rb") as f:
    position = 0
    for line_no, raw in enumerate(f, start=1):
      if raw.strip():
        check_row(raw, corpus, line_no, ids)
        offsets.append(position)
      position += len(raw)
  np.save(out, np.asarray(offsets, np.uint64))
  return len(offsets)


class DocStore:
  """`store[rows] -> list[Doc]` for row positions of a corpus JSONL."""

  def __init__(self, corpus: str | Path, offsets: str | Path):
    self.path = Path(corpus)
    self.offsets = np.load(offsets, mmap_mode="r")
    self._file = open(self.path, "rb")  # stays open as long as the mmap
    self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

  def __len__(self) -> int:
    return len(self.offsets)

  def raw(self, rows: Sequence[int]) -> list[bytes]:
    """The corpus JSONL lines of `rows`, as stored (without their newline)."""
    lines = []
    for start in self.offsets[np.asarray(rows, np.int64)].tolist():
      end = self._map.find(b"\n", start)
      lines.append(self._map[start:end if end != -1 else len(self._map)])
    return lines

  def get(self, rows: Sequence[int], scores: Sequence[float] | None = None) -> list[Doc]:
    return docs_from_lines(self.raw(rows), scores)

  def close(self) -> None:
    self._map.close()
    self._file.close()


def docs_from_lines(lines: Sequence[bytes], scores: Sequence[float] | None = None) -> list[Doc]:
  """`Doc`s from corpus JSONL lines (either row format), with their scores when given."""
  docs = []
  for i, line in enumerate(lines):
    doc = doc_from_row(json.loads(line))
    docs.append(doc if scores is None else Doc(doc.id, doc.title, doc.text, float(scores[i])))
  return docs
