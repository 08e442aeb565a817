"""BM25 in process on `bm25s`'s numba top-k, scored as Lucene scores it (s3's BM25 is pyserini/Lucene).

Terms come from `analyzer.analyze` (Lucene's English analyzer in Python). The score of term t in document d
is Lucene's BM25Similarity:

    idf(t) * tf / (tf + k1 * (1 - b + b * L(d) / avgdl)),   idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))

with avgdl the exact mean document length and L(d) the document length after Lucene's one-byte norm
encoding (`lucene_length`: exact below 24 terms, then 4 significant bits), which changes rankings at the
margin. `norms="exact"` uses the exact length instead (bm25s's own "lucene" method). The matrix of these
scores is stored in bm25s's format, so bm25s loads and searches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from s3_jax.data.corpus import Doc
from s3_jax.retrieval.analyzer import analyze
from s3_jax.retrieval.doc_store import DocStore

NORMS = ("lucene", "exact")


def _int4(i: int) -> int:
  """Lucene SmallFloat.longToInt4: 4 significant bits, the top one implicit, and a 4-bit shift."""
  bits = i.bit_length()
  if bits < 4:
    return i
  shift = bits - 4
  return ((i >> shift) & 0x07) | ((shift + 1) << 3)


def _from_int4(i: int) -> int:
  bits, shift = i & 0x07, (i >> 3) - 1
  return bits if shift == -1 else (bits | 0x08) << shift


_EXACT_BELOW = 255 - _int4(2**31 - 1)  # 24: SmallFloat.intToByte4 stores smaller lengths exactly


def lucene_length(length: int) -> int:
  """The document length Lucene's BM25 sees: `SmallFloat.byte4ToInt(SmallFloat.intToByte4(length))`."""
  if length < _EXACT_BELOW:
    return length
  return _EXACT_BELOW + _from_int4(_int4(length - _EXACT_BELOW))


def score_matrix(docs_terms: Sequence[Sequence[str]], k1: float, b: float, norms: str = "lucene"):
  """The BM25 score of every (document, term) pair: `(data, indices, indptr)` of a CSC matrix
  [documents x vocabulary] (float32), and the vocabulary {term: column}."""
  if norms not in NORMS:
    raise ValueError(f"norms={norms!r} must be one of {NORMS}")
  vocab: dict[str, int] = {}
  ids = [[vocab.setdefault(term, len(vocab)) for term in terms] for terms in docs_terms]
  n_docs, n_terms = len(ids), len(vocab)
  lengths = np.fromiter((len(d) for d in ids), np.int64, n_docs)
  doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
  term_of = np.fromiter((t for d in ids for t in d), np.int64, int(lengths.sum()))
  pairs, tf = np.unique(term_of * n_docs + doc_of, return_counts=True)  # sorted by term, then document
  term, doc = pairs // n_docs, pairs % n_docs
  df = np.bincount(term, minlength=n_terms)
  n_indexed = int((lengths > 0).sum())  # Lucene's docCount: documents that have the field
  avgdl = lengths.sum() / max(n_indexed, 1)
  # Lucene's arithmetic: idf in double rounded to float, the rest in float32 (its per-length cache).
  idf = np.log1p((n_indexed - df + 0.5) / (df + 0.5)).astype(np.float32)
  norm_length = np.array([lucene_length(int(n)) for n in lengths]) if norms == "lucene" else lengths
  f32 = np.float32
  norm_inverse = f32(1) / (f32(k1) * ((f32(1) - f32(b)) + f32(b) * norm_length.astype(f32) / f32(avgdl)))
  weight, freq = idf[term], tf.astype(f32)
  scores = weight - weight / (f32(1) + freq * norm_inverse[doc])
  indptr = np.zeros(n_terms + 2, np.int64)  # one extra, empty column: bm25s's "" token
  np.cumsum(df, out=indptr[1:n_terms + 1])
  indptr[-1] = indptr[-2]
  vocab[""] = n_terms
  return (scores.astype(f32), doc.astype(np.int32), indptr), vocab


def build_bm25(texts: Iterable[str], out_dir: Path, k1: float, b: float, norms: str = "lucene") -> None:
  """Indexes `texts` (one per corpus row, in order) into `out_dir/bm25/` (bm25s's format)."""
  import bm25s

  docs_terms = [analyze(text) for text in texts]
  (data, indices, indptr), vocab = score_matrix(docs_terms, k1, b, norms)
  index = bm25s.BM25(k1=k1, b=b, method="lucene", idf_method="lucene")
  index.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": len(docs_terms)}
  index.vocab_dict = vocab
  index.unique_token_ids_set = set(vocab.values())
  index.nonoccurrence_array = None  # only BM25L and BM25+ have one
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
    self._empty = self.index.vocab_dict[""]

  def query_ids(self, queries: Sequence[str]) -> list[list[int]]:
    """Each query's index terms as vocabulary ids (terms the corpus lacks dropped; a repeated term counts
    each time, as in Lucene's query of one clause per term)."""
    vocab = self.index.vocab_dict
    return [[vocab[t] for t in analyze(q) if t in vocab] or [self._empty] for q in queries]

  def search_rows(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(self.store))
    rows, scores = self.index.retrieve(self.query_ids(queries), k=k, show_progress=False, n_threads=0,
                                       backend_selection="numba")
    rows, scores = np.asarray(rows), np.asarray(scores)
    order = np.lexsort((rows, -scores), axis=-1)  # equal scores: lower row first, as Lucene orders doc ids
    return np.take_along_axis(rows, order, -1), np.take_along_axis(scores, order, -1)

  def hits(self, queries: Sequence[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the rows and scores of its matching documents (score > 0), best first."""
    rows, scores = self.search_rows(queries, k)
    return [(row[score > 0], score[score > 0]) for row, score in zip(rows, scores, strict=True)]

  def search(self, queries: Sequence[str], k: int) -> list[list[Doc]]:
    return [self.store.get(rows, scores) for rows, scores in self.hits(queries, k)]
