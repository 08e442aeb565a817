"""Index building and in-process retrieval: BM25 against bm25s called directly, dense against NumPy."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, REPO

from s3_jax.data import read_corpus
from s3_jax.retrieval import build_index, load_retriever
from s3_jax.retrieval.analyzer import analyze
from s3_jax.retrieval.dense import encode_chunks

QUERIES = ["Who composed the opera Carmen?", "capital of France", "theory of relativity physicist",
           "largest ocean on Earth", "the of and", "Mount Everest height", "photosynthesis in plants"]


@pytest.fixture(scope="module")
def corpus(asset):
  return asset("wiki-vital") / "corpus.jsonl"


@pytest.fixture(scope="module")
def sample_corpus(corpus, tmp_path_factory):
  """The first 300 wiki-vital rows (a dense build of the whole corpus takes minutes on 2 cores)."""
  path = tmp_path_factory.mktemp("sample") / "corpus.jsonl"
  path.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:300]),
                  encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def dense_index(sample_corpus, asset, tmp_path_factory):
  out = tmp_path_factory.mktemp("dense")
  build_index(sample_corpus, out, "dense", encoder=asset("minilm-l6-v2"), chunk_size=128,
              show_progress=False)
  return out


def test_bm25_equals_bm25s_called_directly(corpus, tmp_path):
  """With exact document lengths, our index scores as bm25s's own "lucene" BM25 on the same terms (the
  default, Lucene's one-byte length norms, is checked against Lucene itself in test_bm25_lucene.py)."""
  import bm25s

  manifest = build_index(corpus, tmp_path, "bm25", k1=0.9, b=0.4, bm25_norms="exact")
  assert manifest["count"] == 10_033 and manifest["bm25"]["k1"] == 0.9
  assert manifest["bm25"]["norms"] == "exact"
  docs = read_corpus(corpus)
  reference = bm25s.BM25(k1=0.9, b=0.4, method="lucene", idf_method="lucene")  # default numpy backend
  reference.index([analyze(d.contents) for d in docs], show_progress=False)
  rows, scores = reference.retrieve([analyze(q) for q in QUERIES], k=5, show_progress=False)
  results = load_retriever(tmp_path).search(QUERIES, 5)
  for got, row, score in zip(results, rows, scores, strict=True):
    expected = [(docs[r].id, float(s)) for r, s in zip(row, score, strict=True) if s > 0]
    assert [d.id for d in got] == [doc_id for doc_id, _ in expected]
    assert [d.score for d in got] == pytest.approx([s for _, s in expected], rel=1e-6)  # float32 sums
  assert results[0][0].title == "Carmen"
  assert results[4] == []  # stopwords only: no match, not arbitrary zero-score docs


def test_dense_top_k_equals_numpy_brute_force(dense_index, sample_corpus):
  retriever = load_retriever(dense_index)
  vectors = np.concatenate([np.load(p) for p in sorted((dense_index / "vectors").glob("chunk-*.npy"))])
  docs = read_corpus(sample_corpus)
  assert vectors.shape == (300, 384)
  queries = retriever.encoder.encode(QUERIES)
  expected_rows = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :8]
  results = retriever.search(QUERIES, 8)
  for got, rows, query in zip(results, expected_rows, queries, strict=True):
    assert [d.id for d in got] == [docs[r].id for r in rows]
    np.testing.assert_allclose([d.score for d in got], vectors[rows] @ query, rtol=0, atol=1e-5)


def test_dense_manifest(dense_index, sample_corpus):
  manifest = json.loads((dense_index / "manifest.json").read_text())
  assert manifest["kind"] == "dense" and manifest["count"] == 300 and manifest["dim"] == 384
  assert manifest["faiss"] == "flat" and manifest["fp16"] is False
  assert manifest["corpus"]["path"] == str(sample_corpus.resolve())
  assert len(manifest["corpus"]["sha256"]) == 64 and manifest["encoder"].endswith("minilm-l6-v2")


@pytest.mark.parametrize("faiss_kind, fp16", [("flat", True), ("hnsw", False), ("ivf", False)])
def test_approximate_indexes_agree_with_exact(dense_index, sample_corpus, faiss_kind, fp16, tmp_path):
  from s3_jax.retrieval.dense import build_faiss

  paths = sorted((dense_index / "vectors").glob("chunk-*.npy"))
  exact = load_retriever(dense_index)
  import shutil

  shutil.copytree(dense_index, tmp_path / "idx")
  build_faiss(paths, tmp_path / "idx" / "faiss.index", faiss_kind, fp16, 300, 384)
  approximate = load_retriever(tmp_path / "idx", encoder=exact.encoder)
  agree = [a[0].id == b[0].id for a, b in zip(approximate.search(QUERIES, 3), exact.search(QUERIES, 3),
                                              strict=True)]
  assert sum(agree) >= len(QUERIES) - 1


def test_dense_encoding_resumes_from_chunks(tmp_path):
  class CountingEncoder:
    calls = 0

    def encode(self, texts):
      CountingEncoder.calls += 1
      return np.ones((len(texts), 4), np.float32)

  texts = [f"doc {i}" for i in range(10)]
  paths = encode_chunks(CountingEncoder(), texts, tmp_path, chunk_size=4)
  assert [np.load(p).shape[0] for p in paths] == [4, 4, 2] and CountingEncoder.calls == 3
  encode_chunks(CountingEncoder(), texts, tmp_path, chunk_size=4)
  assert CountingEncoder.calls == 3  # everything on disk: nothing re-encoded
  paths[1].unlink()
  encode_chunks(CountingEncoder(), texts, tmp_path, chunk_size=4)
  assert CountingEncoder.calls == 4


def test_both_corpus_formats_index_the_same(tmp_path):
  a = build_index(FIXTURES / "corpus_contents.jsonl", tmp_path / "a", "bm25")
  b = build_index(FIXTURES / "corpus_title_text.jsonl", tmp_path / "b", "bm25")
  assert a["count"] == b["count"] == 4
  queries = ["opera by Bizet", "capital city of France"]
  from_contents = load_retriever(tmp_path / "a").search(queries, 2)
  assert from_contents == load_retriever(tmp_path / "b").search(queries, 2)
  assert from_contents[0][0].title == "Carmen"


def test_bad_index_requests(tmp_path, corpus):
  with pytest.raises(FileNotFoundError, match=r"no manifest\.json .*python -m s3_jax.index build"):
    load_retriever(tmp_path)
  with pytest.raises(ValueError, match="a dense index needs --encoder"):
    build_index(corpus, tmp_path / "x", "dense")
  copy = tmp_path / "corpus.jsonl"
  copy.write_text((FIXTURES / "corpus_contents.jsonl").read_text())
  build_index(copy, tmp_path / "idx", "bm25")
  copy.write_text(copy.read_text() + '{"id": "9", "contents": "new"}\n')
  with pytest.raises(FileNotFoundError, match="missing or changed since the build"):
    load_retriever(tmp_path / "idx")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "1", "contents": "a"}\n{"id": "1", "contents": "b"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: duplicate doc id '1'"):
    build_index(bad, tmp_path / "bad", "bm25")


@pytest.mark.entry
def test_index_cli(tmp_path):
  done = subprocess.run([sys.executable, "-m", "s3_jax.index", "build", "--corpus",
                         str(FIXTURES / "corpus_title_text.jsonl"), "--out", str(tmp_path / "i"), "--kind",
                         "bm25"], capture_output=True, text=True, cwd=REPO)
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout)["count"] == 4
  failed = subprocess.run([sys.executable, "-m", "s3_jax.index", "build", "--corpus", str(tmp_path / "no"),
                           "--out", str(tmp_path / "j"), "--kind", "bm25"], capture_output=True, text=True,
                          cwd=REPO)
  assert failed.returncode == 1 and "corpus not found" in failed.stderr


def test_dense_top_k_over_grpc_equals_numpy(dense_index, sample_corpus):
  from s3_jax.services import RetrieverClient
  from s3_jax.services.retriever_server import RetrieverService, start_server

  retriever = load_retriever(dense_index)
  vectors = np.concatenate([np.load(p) for p in sorted((dense_index / "vectors").glob("chunk-*.npy"))])
  docs = read_corpus(sample_corpus)
  server, port = start_server(RetrieverService(retriever, "dense", 300))
  try:
    results = RetrieverClient(f"127.0.0.1:{port}").search(QUERIES, 5)
  finally:
    server.stop(grace=0).wait()
  scores = retriever.encoder.encode(QUERIES) @ vectors.T
  for got, row_scores in zip(results, scores, strict=True):
    rows = np.argsort(-row_scores, kind="stable")[:5]
    assert [d.id for d in got] == [docs[r].id for r in rows]
    np.testing.assert_allclose([d.score for d in got], row_scores[rows], rtol=0, atol=1e-5)
