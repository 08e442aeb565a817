"""Retrieval speed, side by side, on the `wiki-vital` corpus:

1. dense encoder texts/s: this project's JAX encoder vs PyTorch `transformers` (same all-MiniLM-L6-v2
   weights, mean pooling + L2 norm, max length 256, batch 64, torch on 2 threads), first N passages, each
   engine in its own process;
2. BM25 queries/s (k1=0.9, b=0.4) of the in-process bm25s backend, batched, on the QA questions;
3. a 120-query BM25 batch through the gRPC service on 127.0.0.1 vs the same retriever in process;
4. time and peak memory (ru_maxrss of a fresh process) to build the BM25 and dense indexes.

  python benchmarks/retrieval.py [--texts 1024] [--repeats 3] [--skip-dense-build]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import median_time


def _texts(n: int) -> list[str]:
  from s3_jax import assets
  from s3_jax.data import read_corpus

  return [doc.contents for doc in read_corpus(assets.path("wiki-vital") / "corpus.jsonl", limit=n)]




def encode_s3_jax(texts, repeats):
  from s3_jax import assets
  from s3_jax.models.encoder import load_encoder

  encoder = load_encoder(assets.path("minilm-l6-v2"), max_length=256, batch_size=64)
  return median_time(lambda: encoder.encode(texts), repeats)


def encode_transformers(texts, repeats):
  import torch
  import transformers

  from s3_jax import assets

  torch.set_num_threads(2)
  folder = assets.path("minilm-l6-v2")
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModel.from_pretrained(folder).eval()

  def run():
    for start in range(0, len(texts), 64):
      batch = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
      with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
      mask = batch["attention_mask"].unsqueeze(-1).float()
      torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

  return median_time(run, repeats)


def _questions() -> list[str]:
  from s3_jax import assets
  from s3_jax.data import read_qa

  folder = assets.path("qa-trivia")
  return [ex.question for split in ("train", "dev", "test") for ex in read_qa(folder / f"{split}.jsonl")]


def bm25_and_grpc(index_dir: str, repeats: int) -> dict:
  from s3_jax.retrieval import load_retriever
  from s3_jax.services import RetrieverClient
  from s3_jax.services.retriever_server import RetrieverService, start_server

  retriever = load_retriever(index_dir)
  questions = _questions()
  batched = median_time(lambda: retriever.search_rows(questions, 10), repeats)
  batch = questions[:120]
  in_process = median_time(lambda: retriever.search(batch, 8), max(repeats, 5))
  server, port = start_server(RetrieverService(retriever, "bm25", len(retriever.store)))
  client = RetrieverClient(f"127.0.0.1:{port}")
  over_grpc = median_time(lambda: client.search(batch, 8), max(repeats, 5))
  server.stop(grace=0)
  return {"questions": len(questions), "bm25_qps": len(questions) / batched, "in_process": in_process,
          "grpc": over_grpc}


def build(kind: str, out: str) -> dict:
  from s3_jax import assets
  from s3_jax.retrieval import build_index

  corpus = assets.path("wiki-vital") / "corpus.jsonl"
  start = time.perf_counter()
  encoder = assets.path("minilm-l6-v2") if kind == "dense" else None
  build_index(corpus, out, kind, encoder=encoder, show_progress=False)
  return {"seconds": time.perf_counter() - start,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--texts", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-dense-build", action="store_true")
  parser.add_argument("--engine", choices=("s3_jax", "transformers"), help=argparse.SUPPRESS)
  parser.add_argument("--build", choices=("bm25", "dense"), help=argparse.SUPPRESS)
  parser.add_argument("--bm25", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.engine:
    fn = encode_s3_jax if args.engine == "s3_jax" else encode_transformers
    print(json.dumps(fn(_texts(args.texts), args.repeats)))
    return
  if args.build:
    print(json.dumps(build(args.build, args.out)))
    return
  if args.bm25:
    print(json.dumps(bm25_and_grpc(args.bm25, args.repeats)))
    return

  def child(*flags):
    done = subprocess.run([sys.executable, __file__, *flags, "--texts", str(args.texts), "--repeats",
                           str(args.repeats)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])

  with tempfile.TemporaryDirectory() as tmp:
    builds = {kind: child("--build", kind, "--out", str(Path(tmp) / kind))
              for kind in (("bm25",) if args.skip_dense_build else ("bm25", "dense"))}
    service = child("--bm25", str(Path(tmp) / "bm25"))
  ours, theirs = child("--engine", "s3_jax"), child("--engine", "transformers")
  print(f"dense encoder, all-MiniLM-L6-v2, {args.texts} wiki-vital passages, max length 256, batch 64")
  print(f"  s3_jax (JAX)   {args.texts / ours:8.1f} texts/s  ({ours:.2f} s)")
  print(f"  transformers   {args.texts / theirs:8.1f} texts/s  ({theirs:.2f} s)")
  print(f"  ratio          {theirs / ours:8.2f}x  (target >= 1.5x)")
  print(f"BM25 (bm25s, k1=0.9, b=0.4), {service['questions']} trivia questions in one batch, top 10: "
        f"{service['bm25_qps']:,.0f} queries/s")
  overhead = service["grpc"] / service["in_process"] - 1
  print(f"120-query BM25 batch, top 8: in process {1000 * service['in_process']:.1f} ms, over gRPC "
        f"{1000 * service['grpc']:.1f} ms -> overhead {100 * overhead:+.1f}% (target <= 5%)")
  for kind, figures in builds.items():
    print(f"build {kind} index of wiki-vital (10,033 docs): {figures['seconds']:.1f} s, "
          f"peak RSS {figures['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
  main()
