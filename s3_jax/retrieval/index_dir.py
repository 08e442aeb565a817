"""Index folders: build (BM25 or dense) with a manifest, and load a retriever from one.

    DIR/manifest.json   kind, corpus path/sha256/bytes, count, encoder, dim, faiss kind, fp16, BM25 k1/b,
                        query and passage prefixes, build seconds
    DIR/offsets.npy     byte offset of every corpus row (DocStore)
    DIR/bm25/           bm25s index                  (kind=bm25)
    DIR/vectors/, DIR/faiss.index                    (kind=dense; vector chunks kept for resuming)
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from s3_jax.assets import sha256_file
from s3_jax.data.corpus import iter_corpus
from s3_jax.data.jsonl import DataFormatError
from s3_jax.retrieval.doc_store import DocStore, build_offsets, check_row

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class RetrieverKind:
  """How one retriever kind builds its part of an index folder and opens a retriever on it.

    build(texts, out, options) -> manifest entries   (`options`: `build_index`'s keyword arguments)
    open(index_dir, store, manifest, encoder) -> a retriever with `search(queries, k)`

  A new retriever backend is a `RetrieverKind` in `RETRIEVER_KINDS`; `retriever.kind` and
  `python -m s3_jax.index build --kind` accept the name from there."""

  build: Callable[[list[str], Path, dict[str, Any]], dict[str, Any]]
  open: Callable[[Path, DocStore, dict[str, Any], Any], Any]
  needs_encoder: bool = False


def _build_bm25(texts: list[str], out: Path, options: dict[str, Any]) -> dict[str, Any]:
  k1, b = options["k1"], options["b"]
  if options["bm25_backend"] == "lucene":
    from s3_jax.retrieval.lucene import build_lucene

    build_lucene(texts, out)
    return {"bm25": {"backend": "lucene", "k1": k1, "b": b, "analyzer": "Lucene English (Porter)"}}
  from s3_jax.retrieval.bm25 import build_bm25

  build_bm25(texts, out, k1, b, options["bm25_norms"])
  return {"bm25": {"backend": "bm25s", "k1": k1, "b": b, "norms": options["bm25_norms"],
                   "analyzer": "Lucene English (Porter), s3_jax.retrieval.analyzer"}}


def _open_bm25(index_dir: Path, store: DocStore, manifest: dict[str, Any], encoder: Any) -> Any:
  del encoder
  if manifest["bm25"].get("backend") == "lucene":
    from s3_jax.retrieval.lucene import LuceneRetriever

    return LuceneRetriever(index_dir, store, manifest["bm25"]["k1"], manifest["bm25"]["b"])
  from s3_jax.retrieval.bm25 import BM25Retriever

  return BM25Retriever(index_dir, store)


def _build_dense(texts: list[str], out: Path, options: dict[str, Any]) -> dict[str, Any]:
  from tqdm import tqdm

  from s3_jax.models.encoder import load_encoder
  from s3_jax.retrieval.dense import build_faiss, encode_chunks

  model = load_encoder(options["encoder"])
  progress = tqdm(total=options["count"], desc="encoding", unit="doc", disable=not options["show_progress"])
  with progress:
    paths = encode_chunks(model, texts, out / "vectors", options["chunk_size"], progress)
  build_faiss(paths, out / "faiss.index", options["faiss_kind"], options["fp16"], options["count"], model.dim)
  return {"encoder": str(Path(options["encoder"]).resolve()), "dim": model.dim,
          "faiss": options["faiss_kind"], "fp16": options["fp16"], "max_length": model.max_length}


def _open_dense(index_dir: Path, store: DocStore, manifest: dict[str, Any], encoder: Any) -> Any:
  from s3_jax.models.encoder import load_encoder
  from s3_jax.retrieval.dense import DenseRetriever

  return DenseRetriever(index_dir, store, encoder or load_encoder(manifest["encoder"]),
                        query_prefix=manifest["query_prefix"])


RETRIEVER_KINDS: dict[str, RetrieverKind] = {
    "bm25": RetrieverKind(_build_bm25, _open_bm25),
    "dense": RetrieverKind(_build_dense, _open_dense, needs_encoder=True),
}
BM25_BACKENDS = ("bm25s", "lucene")
BM25_NORMS = ("lucene", "exact")


def build_index(corpus: str | Path, out: str | Path, kind: str, *, encoder: str | Path | None = None,
                faiss_kind: str = "flat", fp16: bool = False, k1: float = 0.9, b: float = 0.4,
                query_prefix: str = "", passage_prefix: str = "", chunk_size: int = 4096,
                bm25_backend: str = "bm25s", bm25_norms: str = "lucene",
                show_progress: bool = True) -> dict[str, Any]:
  """Builds an index of `kind` (`RETRIEVER_KINDS`) of `corpus` into `out` and returns its manifest. A dense
  build that was interrupted resumes from the vector chunks already in `out/vectors/`."""
  corpus, out = Path(corpus).resolve(), Path(out)
  if kind not in RETRIEVER_KINDS:
    raise ValueError(f"--kind {kind!r} must be one of {', '.join(RETRIEVER_KINDS)}")
  if bm25_backend not in BM25_BACKENDS:
    raise ValueError(f"--bm25-backend {bm25_backend!r} must be one of {', '.join(BM25_BACKENDS)}")
  if bm25_norms not in BM25_NORMS:
    raise ValueError(f"--bm25-norms {bm25_norms!r} must be one of {', '.join(BM25_NORMS)}")
  if RETRIEVER_KINDS[kind].needs_encoder and encoder is None:
    raise ValueError(f"a {kind} index needs --encoder (an HF BERT-family folder, e.g. asset:minilm-l6-v2)")
  if not corpus.is_file():
    raise FileNotFoundError(f"corpus not found: {corpus}")
  out.mkdir(parents=True, exist_ok=True)
  (out / MANIFEST).unlink(missing_ok=True)  # the manifest marks a finished build
  start = time.perf_counter()
  count = build_offsets(corpus, out / "offsets.npy")
  manifest: dict[str, Any] = {
      "kind": kind, "count": count,
      "corpus": {"path": str(corpus), "sha256": sha256_file(corpus), "bytes": corpus.stat().st_size},
      "query_prefix": query_prefix, "passage_prefix": passage_prefix,
  }
  texts = [passage_prefix + doc.contents for doc in iter_corpus(corpus)]
  options = {"count": count, "encoder": encoder, "faiss_kind": faiss_kind, "fp16": fp16, "k1": k1, "b": b,
             "chunk_size": chunk_size, "bm25_backend": bm25_backend, "bm25_norms": bm25_norms,
             "show_progress": show_progress}
  manifest.update(RETRIEVER_KINDS[kind].build(texts, out, options))
  manifest["build_seconds"] = round(time.perf_counter() - start, 2)
  (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def load_retriever(index_dir: str | Path, *, encoder: Any = None):
  """The retriever of a built index folder (`RETRIEVER_KINDS[manifest kind].open`; a dense index's encoder
  is loaded from the manifest unless given)."""
  index_dir = Path(index_dir)
  manifest_path = index_dir / MANIFEST
  if not manifest_path.is_file():
    raise FileNotFoundError(f"{index_dir}: no {MANIFEST} (not an index, or its build did not finish); "
                            f"run: python -m s3_jax.index build --corpus FILE --out {index_dir} ...")
  manifest = json.loads(manifest_path.read_text())
  if manifest["kind"] not in RETRIEVER_KINDS:
    raise ValueError(f"{manifest_path}: kind {manifest['kind']!r} is not one of {', '.join(RETRIEVER_KINDS)}")
  corpus = Path(manifest["corpus"]["path"])
  if not corpus.is_file() or corpus.stat().st_size != manifest["corpus"]["bytes"]:
    raise FileNotFoundError(f"{index_dir}: its corpus {corpus} is missing or changed since the build")
  store = DocStore(corpus, index_dir / "offsets.npy")
  return RETRIEVER_KINDS[manifest["kind"]].open(index_dir, store, manifest, encoder)


def ensure_index(corpus: str | Path, kind: str, *, corpus_limit: int = 0, encoder: str | Path | None = None,
                 query_prefix: str = "", passage_prefix: str = "", faiss_kind: str = "flat",
                 root: str | Path | None = None, show_progress: bool = True) -> Path:
  """The index folder of `corpus` (its first `corpus_limit` rows when > 0) under `root` (default
  `$S3_JAX_CACHE/indexes`), built on first use and reused while the corpus file is unchanged (path, size,
  modification time) and the settings are the same. What embedded configs use instead of a service."""
  import hashlib

  from s3_jax.assets import cache_dir

  corpus = Path(corpus).resolve()
  if not corpus.is_file():
    raise FileNotFoundError(f"corpus not found: {corpus}")
  stat = corpus.stat()
  settings = [str(corpus), stat.st_size, stat.st_mtime_ns, corpus_limit, kind,
              str(Path(encoder).resolve()) if encoder else "", query_prefix, passage_prefix, faiss_kind]
  digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
  out = Path(root or cache_dir() / "indexes") / f"{kind}-{corpus.stem}-{digest}"
  if (out / MANIFEST).is_file():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Processes starting together (hosts of one job on a shared cache) build it once: the others wait.
  with open(out.parent / f"{out.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out / MANIFEST).is_file():
      # Built in OUT.partial and renamed when complete, so a failed build never leaves a folder that looks
      # like an index (a dense build interrupted there resumes from its vector chunks; bad data removes it).
      partial = out.with_name(out.name + ".partial")
      try:
        _build_subset_index(corpus, partial, kind, corpus_limit, encoder, faiss_kind, query_prefix,
                            passage_prefix, show_progress)
      except DataFormatError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
      manifest = json.loads((partial / MANIFEST).read_text())
      if corpus_limit > 0:  # the subset's corpus file moves with the folder
        manifest["corpus"]["path"] = str(out / "corpus.jsonl")
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
      if out.exists():  # no manifest: a build interrupted before builds went through OUT.partial
        shutil.rmtree(out)
      partial.rename(out)
  return out


def _build_subset_index(corpus: Path, out: Path, kind: str, corpus_limit: int, encoder, faiss_kind: str,
                        query_prefix: str, passage_prefix: str, show_progress: bool) -> None:
  out.mkdir(parents=True, exist_ok=True)
  source = corpus
  if corpus_limit > 0:  # the first rows, as a corpus file of their own next to the index
    source = out / "corpus.jsonl"
    ids: dict[str, int] = {}
    with open(corpus, "rb") as f, open(source, "wb") as subset:
      for line_no, raw in enumerate(f, start=1):
        if raw.strip():
          check_row(raw, corpus, line_no, ids)  # errors name the user's file and line, not this copy
          subset.write(raw if raw.endswith(b"\n") else raw + b"\n")
          if len(ids) == corpus_limit:
            break
  build_index(source, out, kind, encoder=encoder, faiss_kind=faiss_kind, query_prefix=query_prefix,
              passage_prefix=passage_prefix, show_progress=show_progress)


def ensure_config_index(config: Any, show_progress: bool = True) -> Path:
  """`ensure_index` of a job config's corpus and retriever settings (`data.corpus`, `retriever.*`)."""
  from s3_jax import assets

  encoder = (assets.resolve(config.retriever.encoder) if RETRIEVER_KINDS[config.retriever.kind].needs_encoder
             else None)
  return ensure_index(assets.resolve(config.data.corpus), config.retriever.kind,
                      corpus_limit=config.data.corpus_limit, encoder=encoder,
                      query_prefix=config.retriever.query_prefix,
                      passage_prefix=config.retriever.passage_prefix, faiss_kind=config.retriever.faiss,
                      show_progress=show_progress)
