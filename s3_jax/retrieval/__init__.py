"""Retrieval backends: BM25 (bm25s) and dense (JAX encoder + FAISS) over a corpus, and index folders."""

from s3_jax.retrieval.index_dir import build_index, load_retriever

__all__ = ["build_index", "load_retriever"]
