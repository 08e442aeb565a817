"""JSON Lines reading and writing with errors that name the file and the line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataFormatError(ValueError):
  """A data file row is malformed; the message names the file and the line (or table row)."""

  def __init__(self, path: str | os.PathLike, line: int, reason: str, unit: str = "line"):
    self.path = str(path)
    self.line = line
    self.reason = reason
    where = f"{self.path}:{line}" if unit == "line" else f"{self.path}: {unit} {line}"
    super().__init__(f"{where}: {reason}")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields `(line_number, row)` for every non-blank line of a JSONL file (1-based lines).

  Raises `DataFormatError` naming the file and line for invalid JSON or a row that is not an object,
  and `FileNotFoundError` naming the path when it does not exist.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"data file not found: {path}")
  # Binary mode, decoded line by line: a text-mode reader decodes in blocks and would blame the
  # wrong line for invalid UTF-8.
  with path.open("rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataFormatError(path, line_no, f"not valid UTF-8 ({e.reason})") from e
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})") from e
      if not isinstance(row, dict):
        raise DataFormatError(path, line_no, f"expected a JSON object, got {type(row).__name__}")
      yield line_no, row


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
  """Writes rows to `path` atomically (temp file + rename); returns the number of rows."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  count = 0
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return count
