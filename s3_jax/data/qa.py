"""QA examples in the FlashRAG row format, question normalisation, and the QA reader.

Rows: `{"id", "question", "golden_answers": [...], "data_source"}` plus an optional `metadata` object.
s3's verl parquet files (s3_protocol.md §7) are read too: when `golden_answers` is absent the answers come
from `reward_model.ground_truth.target`, and when `id` is absent it is `{data_source}_{extra_info.index}`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from s3_jax.data.jsonl import DataFormatError, iter_jsonl


def normalize_question(question: str) -> str:
  """The one question normaliser (s3_protocol.md §2.1): strip, then append `?` if it does not end with one.

  Every cache is keyed by this string.
  """
  if not isinstance(question, str):
    raise ValueError(f"question must be a string, got {type(question).__name__}")
  question = question.strip()
  if not question:
    raise ValueError("question is empty")
  if not question.endswith("?"):
    question += "?"
  return question


@dataclasses.dataclass(frozen=True, slots=True)
class QAExample:
  """One question with its gold answers; `question` is already normalised."""

  id: str
  question: str
  golden_answers: tuple[str, ...]
  data_source: str
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def to_row(self) -> dict[str, Any]:
    row = {"id": self.id, "question": self.question, "golden_answers": list(self.golden_answers),
           "data_source": self.data_source}
    if self.metadata:
      row["metadata"] = self.metadata
    return row


def _answers_from(value: Any) -> tuple[str, ...]:
  """Gold answers of a row: a list (or a parquet numpy array) of strings or numbers, or one bare string
  (one answer, as s3 wraps it)."""
  if hasattr(value, "tolist"):  # numpy arrays from parquet
    value = value.tolist()
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple)):
    raise ValueError(f"'golden_answers' must be a string or a list of strings, got {type(value).__name__} "
                     f"{value!r}")
  answers = []
  for answer in value:
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
      raise ValueError(f"a gold answer must be a string or a number, got {answer!r}")
    answers.append(str(answer))
  if not answers:
    raise ValueError("'golden_answers' is empty")
  return tuple(answers)


def example_from_row(row: dict[str, Any], default_source: str | None = None) -> QAExample:
  """Builds a `QAExample` from a FlashRAG (or s3 verl parquet) row; raises `ValueError`."""
  if "question" not in row:
    raise ValueError(f"missing 'question' (keys: {sorted(row)})")
  question = normalize_question(row["question"])
  data_source = row.get("data_source", default_source)
  if not isinstance(data_source, str) or not data_source:
    raise ValueError(f"missing or invalid 'data_source': {data_source!r}")
  if "golden_answers" in row and row["golden_answers"] is not None:
    answers = _answers_from(row["golden_answers"])
  else:
    target = ((row.get("reward_model") or {}).get("ground_truth") or {}).get("target")
    if target is None:
      raise ValueError("missing 'golden_answers' (and no reward_model.ground_truth.target)")
    answers = _answers_from(target)
  row_id = row.get("id")
  if row_id is None and isinstance(row.get("extra_info"), dict) and "index" in row["extra_info"]:
    row_id = f"{data_source}_{row['extra_info']['index']}"
  if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
    raise ValueError(f"'id' must be a string or an integer, got {row_id!r}")
  metadata = row.get("metadata") or {}
  if not isinstance(metadata, dict):
    raise ValueError(f"'metadata' must be an object, got {type(metadata).__name__}")
  return QAExample(id=str(row_id), question=question, golden_answers=answers,
                   data_source=data_source, metadata=metadata)


SPLIT_NAMES = ("train", "test", "dev", "val", "valid", "validation")


def source_from_path(path: str | os.PathLike) -> str:
  """The `data_source` of rows that have none: the file's name without its suffix (`my_questions.jsonl` ->
  `my_questions`), or its folder's when the name is a split (`nq/test.jsonl` -> `nq`)."""
  path = Path(path)
  return path.parent.name if path.stem.lower() in SPLIT_NAMES and path.parent.name else path.stem


def iter_qa(path: str | os.PathLike, default_source: str | None = None) -> Iterator[QAExample]:
  """Streams QA examples from a `.jsonl` or `.parquet` file.

  `default_source` fills `data_source` for rows without one (default: `source_from_path(path)`). Malformed
  rows raise `DataFormatError` naming the file and line (JSONL) or row (parquet).
  """
  path = Path(path)
  default_source = default_source or source_from_path(path)
  if path.suffix == ".parquet":
    if not path.is_file():
      raise FileNotFoundError(f"data file not found: {path}")
    import pyarrow.parquet as pq  # only parquet users pay for the import

    numbered = enumerate(pq.read_table(path).to_pylist(), start=1)
    unit = "row"
  elif path.suffix == ".jsonl":
    numbered = iter_jsonl(path)
    unit = "line"
  else:
    raise ValueError(f"{path}: unsupported QA file type {path.suffix!r} (use .jsonl or .parquet)")
  for number, row in numbered:
    try:
      yield example_from_row(row, default_source)
    except ValueError as e:
      raise DataFormatError(path, number, str(e), unit=unit) from e


def read_qa(path: str | os.PathLike, default_source: str | None = None) -> list[QAExample]:
  """Reads all QA examples of a file (see `iter_qa`)."""
  return list(iter_qa(path, default_source))
