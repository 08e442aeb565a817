"""BM25 over a corpus with `bm25s` (in process, no JVM), tokenised like pyserini's default Lucene English
analyzer (s3's BM25): lowercase word tokens, Lucene's 33 English stopwords, Porter stemming."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from s3_jax.data.corpus import Doc
from s3_jax.retrieval.doc_store import DocStore

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET.
LUCENE_STOPWORDS = ("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is",
                    "it", "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there",
                    "these", "they", "this", "to", "was", "will", "with")


def _stemmer():
  import Stemmer

  return Stemmer.Stemmer("porter")


def tokenize(texts: Sequence[str], ids: bool = True):
  import bm25s

  # Possessive "'s" dropped first, as Lucene's EnglishPossessiveFilter does; single characters are tokens.
  texts = [t.replace("'s ", " ").replace("\u2019s ", " ") for t in texts]
  return bm25s.tokenize(texts, stopwords=list(LUCENE_STOPWORDS), stemmer=_stemmer(),
                        token_pattern=r"(?u)\b\w+\b", return_ids=ids, show_progress=False)


def build_bm25(texts: Iterable[str], out_dir: Path, k1: float, b: float) -> None:
  """Indexes `texts` (one per corpus row, in order) into `out_dir/bm25/`."""
  import bm25s

  index = bm25s.BM25(k1=k1, b=b)
  index.index(tokenize(list(texts)), show_progress=False)
  index.save(str(out_dir / "bm25"), show_progress=False)


class BM25Retriever:
  """`search(queries, k) -> list[list[Doc]]`; only documents with a positive score are returned (a query
  of stopwords only matches nothing, as in Lucene)."""

  def __init__(self, index_dir: Path, store: DocStore):
    import bm25s

    # numba-compiled top-k scoring: ~10x the numpy backend on batched queries (compiles once, ~seconds).
    self.index = bm25s.BM25.load(str(index_dir / "bm25"), mmap=True, show_progress=False,
                                 override_params={"backend": "numba"})
    self.store = store

  def search_rows(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(self.store))
    rows, scores = self.index.retrieve(tokenize(queries, ids=False), k=k, show_progress=False,
                                       n_threads=0, backend_selection="numba")
    return np.asarray(rows), np.asarray(scores)

  def hits(self, queries: Sequence[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the rows and scores of its matching documents (score > 0), best first."""
    rows, scores = self.search_rows(queries, k)
    return [(row[score > 0], score[score > 0]) for row, score in zip(rows, scores, strict=True)]

  def search(self, queries: Sequence[str], k: int) -> list[list[Doc]]:
    return [self.store.get(rows, scores) for rows, scores in self.hits(queries, k)]
