"""Gain Beyond RAG and its variants (s3_protocol.md §3.1, Table 5), and the RAG cache they compare against.

    paper   acc_s3 - acc_rag                  (paper Eq. 1; acc = GenAcc)
    code    (acc_s3 - acc_rag) + acc_s3       (s3's released training reward; 2 acc_s3 on its filtered set)
    genacc  acc_s3                            (Table 5's metric comparison: the s3 answer's score alone)
    em      EM(s3 answer)
    f1      token F1(s3 answer)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from s3_jax.data.qa import normalize_question

REWARD_KINDS = ("paper", "code", "genacc", "em", "f1")


@dataclasses.dataclass(frozen=True)
class AnswerScores:
  """How one generator answer scores against the gold answers. `judge` is None when it was not asked
  (the span matched, or the judge is off); `genacc` = span or judge."""

  span: bool
  em: bool
  f1: float
  judge: bool | None
  genacc: bool

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def reward(kind: str, scores: AnswerScores, rag_genacc: bool | None) -> float:
  """The scalar reward of one trajectory; `rag_genacc` is the cached naive-RAG GenAcc of its question
  (needed by `paper` and `code`)."""
  if kind in ("paper", "code"):
    if rag_genacc is None:
      raise ValueError(f"reward kind {kind!r} needs the question's naive-RAG score from the RAG cache")
    gain = float(scores.genacc) - float(rag_genacc)
    return gain + float(scores.genacc) if kind == "code" else gain
  if kind == "genacc":
    return float(scores.genacc)
  if kind == "em":
    return float(scores.em)
  if kind == "f1":
    return scores.f1
  raise ValueError(f"reward.kind={kind!r} must be one of {REWARD_KINDS}")


class RagCache:
  """The naive-RAG baseline per question, in s3's `rag_cache.json` layout:
  `{data_source: {normalised question: {"answer", "score" (GenAcc 0/1), "em_score"}}}`.

  A question or data source that is missing is an error naming both and the file (s3 silently falls back
  to a closed-book answer, s3_protocol.md §3.1; here the precompute must cover the training set)."""

  def __init__(self, entries: dict[str, dict[str, dict[str, Any]]] | None = None,
               path: str | os.PathLike | None = None):
    self.entries = entries if entries is not None else {}
    self.path = Path(path) if path is not None else None

  @classmethod
  def load(cls, path: str | os.PathLike) -> RagCache:
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"RAG cache {path} not found; build it with: python -m s3_jax.precompute "
                              "--config configs/NAME.py")
    try:
      entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"RAG cache {path}: invalid JSON ({e})") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
      raise ValueError(f"RAG cache {path}: expected {{data_source: {{question: entry}}}}")
    return cls(entries, path)

  def save(self, path: str | os.PathLike | None = None) -> Path:
    """Writes the cache atomically (temp file + rename), so an interrupted save loses nothing."""
    path = Path(path or self.path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(self.entries, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    self.path = path
    return path

  def __contains__(self, key: tuple[str, str]) -> bool:
    data_source, question = key
    return normalize_question(question) in self.entries.get(data_source, {})

  def get(self, data_source: str, question: str) -> dict[str, Any]:
    where = f" ({self.path})" if self.path else ""
    if data_source not in self.entries:
      raise KeyError(f"data source {data_source!r} is not in the RAG cache{where}; it has "
                     f"{sorted(self.entries)}. Rerun python -m s3_jax.precompute for this dataset")
    entry = self.entries[data_source].get(normalize_question(question))
    if entry is None:
      raise KeyError(f"question {normalize_question(question)!r} of data source {data_source!r} is not in "
                     f"the RAG cache{where}. Rerun python -m s3_jax.precompute for this dataset")
    return entry

  def put(self, data_source: str, question: str, answer: str, scores: AnswerScores) -> None:
    self.entries.setdefault(data_source, {})[normalize_question(question)] = {
        "answer": answer, "score": int(scores.genacc), "em_score": int(scores.em)}

  def __len__(self) -> int:
    return sum(len(v) for v in self.entries.values())
