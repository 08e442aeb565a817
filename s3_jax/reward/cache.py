"""A persistent, content-addressed store of scored answers: the same question with the same context, scored
by the same generator and prompt version, is never sent to the generator or the judge twice.

SQLite (one file, safe across processes and interrupted runs); keys are SHA-256 of the canonical JSON of
everything that determines the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def content_key(**parts: Any) -> str:
  """SHA-256 hex of the parts as canonical JSON (sorted keys, no whitespace)."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False,
                                   separators=(",", ":")).encode("utf-8")).hexdigest()


class AnswerCache:
  """`get_many(keys) -> {key: value}` and `put_many([(key, value)])`, values JSON objects. `path=None`
  keeps the cache in memory."""

  def __init__(self, path: str | os.PathLike | None = None):
    self.path = Path(path) if path is not None else None
    if self.path is not None:
      self.path.parent.mkdir(parents=True, exist_ok=True)
    self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                               timeout=60)
    self._db.execute("PRAGMA journal_mode=WAL")
    self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    self._db.commit()
    self._lock = threading.Lock()

  def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    with self._lock:
      for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
        chunk = list(keys[start:start + 500])
        rows = self._db.execute(f"SELECT key, value FROM answers WHERE key IN ({','.join('?' * len(chunk))})",
                                chunk).fetchall()
        found.update((k, json.loads(v)) for k, v in rows)
    return found

  def put_many(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
    with self._lock:
      self._db.executemany("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)",
                           [(k, json.dumps(v, ensure_ascii=False)) for k, v in items])
      self._db.commit()

  def __len__(self) -> int:
    with self._lock:
      return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

  def close(self) -> None:
    self._db.close()
