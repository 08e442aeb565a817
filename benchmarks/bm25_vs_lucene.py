"""BM25 queries/s and agreement: the bm25s backend vs pyserini/Lucene on wiki-vital (k1=0.9, b=0.4),
all trivia + FanOutQA questions in one batch, top 10, Lucene on 2 threads. Needs requirements-lucene.txt
(run it in the environment that has pyserini; anchor_measurements.md has pyserini at 9,200 q/s batched).

  python benchmarks/bm25_vs_lucene.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
from timing import median_time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  from s3_jax import assets
  from s3_jax.data import read_qa
  from s3_jax.retrieval import build_index, load_retriever

  corpus = assets.path("wiki-vital") / "corpus.jsonl"
  questions = [ex.question for name in ("qa-trivia", "qa-fanout") for split in ("train", "dev", "test")
               for ex in read_qa(assets.path(name) / f"{split}.jsonl")]
  with tempfile.TemporaryDirectory() as tmp:
    build_index(corpus, Path(tmp) / "bm25s", "bm25", k1=0.9, b=0.4)
    build_index(corpus, Path(tmp) / "lucene", "bm25", k1=0.9, b=0.4, bm25_backend="lucene")
    ours, lucene = load_retriever(Path(tmp) / "bm25s"), load_retriever(Path(tmp) / "lucene")
    ours_s = median_time(lambda: ours.search_rows(questions, 10), args.repeats)
    lucene_s = median_time(lambda: lucene.search_rows(questions, 10), args.repeats)
    rows, scores = ours.search_rows(questions, 10)
    top_ours = [int(r[0]) if s[0] > 0 else None for r, s in zip(rows, scores, strict=True)]
    top_lucene = [hits[0][0] if hits else None for hits in lucene.search_rows(questions, 10)]
  agree = sum(a == b for a, b in zip(top_ours, top_lucene, strict=True)) / len(questions)
  print(f"BM25 over wiki-vital, {len(questions)} questions in one batch, top 10")
  print(f"  bm25s backend   {len(questions) / ours_s:10,.0f} queries/s")
  print(f"  pyserini/Lucene {len(questions) / lucene_s:10,.0f} queries/s (2 threads)")
  print(f"  ratio           {lucene_s / ours_s:10.2f}x  (target >= 10x)")
  print(f"  top-1 agreement {100 * agree:9.1f}%  (target >= 99%)")


if __name__ == "__main__":
  main()
