"""Dense retrieval: JAX encoder + FAISS inner-product search over L2-normalised vectors (cosine).

Building encodes the corpus in chunks written to `vectors/chunk-NNNNN.npy`; an interrupted build resumes
from the chunks on disk, and the FAISS index is filled chunk by chunk, so vectors are never held twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from s3_jax.data.corpus import Doc
from s3_jax.retrieval.doc_store import DocStore

FAISS_KINDS = ("flat", "ivf", "hnsw")


def _faiss():
  import faiss

  return faiss


def make_faiss_index(kind: str, dim: int, count: int, fp16: bool):
  """An empty inner-product index: exact `IndexFlatIP` (or fp16 scalar-quantised), IVF, or HNSW."""
  faiss = _faiss()
  storage = "SQfp16" if fp16 else "Flat"
  if kind == "flat":
    return faiss.index_factory(dim, storage, faiss.METRIC_INNER_PRODUCT)
  if kind == "ivf":
    lists = max(1, min(4096, int(np.sqrt(count))))
    return faiss.index_factory(dim, f"IVF{lists},{storage}", faiss.METRIC_INNER_PRODUCT)
  if kind == "hnsw":
    return faiss.index_factory(dim, f"HNSW32,{storage}" if fp16 else "HNSW32", faiss.METRIC_INNER_PRODUCT)
  raise ValueError(f"faiss kind {kind!r} must be one of {', '.join(FAISS_KINDS)}")


def encode_chunks(encoder, texts: Sequence[str], vectors_dir: Path, chunk_size: int,
                  progress=None) -> list[Path]:
  """Encodes `texts` in chunks to `vectors_dir`, skipping chunks already on disk (resume)."""
  vectors_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for number, start in enumerate(range(0, len(texts), chunk_size)):
    path = vectors_dir / f"chunk-{number:05d}.npy"
    part = texts[start:start + chunk_size]
    if not (path.is_file() and np.load(path, mmap_mode="r").shape[0] == len(part)):
      tmp = path.with_suffix(".tmp.npy")
      np.save(tmp, encoder.encode(list(part)))
      tmp.replace(path)  # a chunk exists only once complete
    paths.append(path)
    if progress is not None:
      progress.update(len(part))
  return paths


def _chunks(paths: Sequence[Path]) -> Iterator[np.ndarray]:
  for path in paths:
    yield np.ascontiguousarray(np.load(path), dtype=np.float32)


def build_faiss(paths: Sequence[Path], out: Path, kind: str, fp16: bool, count: int, dim: int) -> None:
  faiss = _faiss()
  index = make_faiss_index(kind, dim, count, fp16)
  if not index.is_trained:  # IVF / SQ: train on up to 100k vectors
    sample, total = [], 0
    for chunk in _chunks(paths):
      sample.append(chunk)
      total += len(chunk)
      if total >= 100_000:
        break
    index.train(np.concatenate(sample))
  for chunk in _chunks(paths):
    index.add(chunk)
  faiss.write_index(index, str(out))


class DenseRetriever:
  """`search(queries, k) -> list[list[Doc]]` with scores = inner products (cosine similarities)."""

  def __init__(self, index_dir: Path, store: DocStore, encoder, query_prefix: str = "", nprobe: int = 32,
               use_gpu: bool | None = None):
    faiss = _faiss()
    self.index = faiss.read_index(str(index_dir / "faiss.index"))
    if hasattr(self.index, "nprobe"):
      self.index.nprobe = nprobe
    if use_gpu is not False and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
      options = faiss.GpuMultipleClonerOptions()
      options.shard, options.useFloat16 = True, True
      self.index = faiss.index_cpu_to_all_gpus(self.index, co=options)  # faiss-gpu hosts
    self.store, self.encoder, self.query_prefix = store, encoder, query_prefix

  def search_rows(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = self.encoder.encode([self.query_prefix + q for q in queries])
    scores, rows = self.index.search(vectors, min(k, len(self.store)))
    return rows, scores

  def hits(self, queries: Sequence[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the rows and scores of its nearest documents, best first (FAISS's -1 fillers dropped)."""
    rows, scores = self.search_rows(queries, k)
    return [(row[row >= 0], score[row >= 0]) for row, score in zip(rows, scores, strict=True)]

  def search(self, queries: Sequence[str], k: int) -> list[list[Doc]]:
    return [self.store.get(rows, scores) for rows, scores in self.hits(queries, k)]
