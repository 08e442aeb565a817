"""Retrieval speed, side by side, on the `wiki-vital` corpus:

1. dense encoder texts/s: this project's JAX encoder vs PyTorch `transformers` (same all-MiniLM-L6-v2
   weights, mean pooling + L2 norm, max length 256, batch 64, torch on 2 threads), first N passages, each
   engine in its own process;
2. BM25 queries/s (k1=0.9, b=0.4) of the in-process bm25s backend, batched, on the QA questions;
3. a 120-query batch through the gRPC service (a server process on 127.0.0.1) vs the same retriever in
   process, for each index built;
4. time and peak memory (ru_maxrss of a fresh process) to build the BM25 and dense indexes.

  python benchmarks/retrieval.py [--texts 1024] [--repeats 3] [--skip-dense-build]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
from timing import interleaved_medians, median_time


def _texts(n: int) -> list[str]:
  from s3_jax import assets
  from s3_jax.data import read_corpus

  return [doc.contents for doc in read_corpus(assets.path("wiki-vital") / "corpus.jsonl", limit=n)]




def encode_s3_jax(texts, repeats):
  from s3_jax import assets
  from s3_jax.models.encoder import load_encoder

  encoder = load_encoder(assets.path("minilm-l6-v2"), max_length=256, batch_size=64)
  return median_time(lambda: encoder.encode(texts), repeats)


def encode_transformers(texts, repeats, sort=False):
  import torch
  import transformers

  from s3_jax import assets

  torch.set_num_threads(2)
  folder = assets.path("minilm-l6-v2")
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModel.from_pretrained(folder).eval()

  def run():
    ordered = texts
    if sort:  # what sentence-transformers' encode() does: batches of similar length, less padding
      lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
      ordered = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    for start in range(0, len(ordered), 64):
      batch = tokenizer(ordered[start:start + 64], padding=True, truncation=True, max_length=256,
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


def bm25_speed(index_dir: str, repeats: int) -> dict:
  from s3_jax.retrieval import load_retriever

  retriever = load_retriever(index_dir)
  questions = _questions()
  batched = median_time(lambda: retriever.search_rows(questions, 10), repeats)
  return {"questions": len(questions), "bm25_qps": len(questions) / batched}


def service_overhead(index_dir: str, repeats: int) -> dict:
  """120 questions, top 8: the retriever in this process vs `python -m s3_jax.serve retriever` in another
  process on 127.0.0.1 (as deployed), with the client receiving the documents' text, or reading them from
  its own copy of the index (`local_index`). Calls interleaved, median of `repeats`."""
  from s3_jax.retrieval import load_retriever
  from s3_jax.services import RetrieverClient

  retriever = load_retriever(index_dir)
  batch = _questions()[:120]
  server = subprocess.Popen([sys.executable, "-m", "s3_jax.serve", "retriever", "--index", index_dir,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    port = next(int(m.group(1)) for line in server.stdout
                if (m := re.search(r"serving on 127\.0\.0\.1:(\d+)", line)))
    text_client = RetrieverClient(f"127.0.0.1:{port}", local_index=None)
    local_client = RetrieverClient(f"127.0.0.1:{port}")  # "auto": this host sees the server's index folder
    expected = retriever.search(batch, 8)
    for client in (text_client, local_client):  # dense scores move by float32 rounding with batch shape
      got = client.search(batch, 8)
      assert [[d.id for d in r] for r in got] == [[d.id for d in r] for r in expected]
      gaps = [abs(a.score - b.score) for r, e in zip(got, expected, strict=True)
              for a, b in zip(r, e, strict=True)]
      assert max(gaps) < 1e-5
    return interleaved_medians({"in_process": lambda: retriever.search(batch, 8),
                                "grpc": lambda: text_client.search(batch, 8),
                                "grpc_local_index": lambda: local_client.search(batch, 8)}, repeats)
  finally:
    server.kill()


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
  parser.add_argument("--engine", choices=("s3_jax", "transformers", "transformers_sorted"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--build", choices=("bm25", "dense"), help=argparse.SUPPRESS)
  parser.add_argument("--bm25", help=argparse.SUPPRESS)
  parser.add_argument("--service", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.engine:
    if args.engine == "s3_jax":
      seconds = encode_s3_jax(_texts(args.texts), args.repeats)
    else:
      seconds = encode_transformers(_texts(args.texts), args.repeats, sort=args.engine.endswith("sorted"))
    print(json.dumps(seconds))
    return
  if args.build:
    print(json.dumps(build(args.build, args.out)))
    return
  if args.bm25:
    print(json.dumps(bm25_speed(args.bm25, args.repeats)))
    return
  if args.service:
    print(json.dumps(service_overhead(args.service, max(args.repeats, 40))))
    return

  def child(*flags):
    done = subprocess.run([sys.executable, __file__, *flags, "--texts", str(args.texts), "--repeats",
                           str(args.repeats)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])

  with tempfile.TemporaryDirectory() as tmp:
    builds = {kind: child("--build", kind, "--out", str(Path(tmp) / kind))
              for kind in (("bm25",) if args.skip_dense_build else ("bm25", "dense"))}
    bm25 = child("--bm25", str(Path(tmp) / "bm25"))
    services = {kind: child("--service", str(Path(tmp) / kind)) for kind in builds}
  ours, theirs = child("--engine", "s3_jax"), child("--engine", "transformers")
  theirs_sorted = child("--engine", "transformers_sorted")
  print(f"dense encoder, all-MiniLM-L6-v2, {args.texts} wiki-vital passages, max length 256, batch 64")
  print(f"  s3_jax (JAX)   {args.texts / ours:8.1f} texts/s  ({ours:.2f} s)")
  print(f"  transformers   {args.texts / theirs:8.1f} texts/s  ({theirs:.2f} s)")
  print(f"  ratio          {theirs / ours:8.2f}x  (target >= 1.5x)")
  print(f"  transformers, batches sorted by length (as sentence-transformers does) "
        f"{args.texts / theirs_sorted:8.1f} texts/s -> ratio {theirs_sorted / ours:.2f}x")
  print(f"BM25 (bm25s, k1=0.9, b=0.4), {bm25['questions']} trivia questions in one batch, top 10: "
        f"{bm25['bm25_qps']:,.0f} queries/s")
  for kind, t in services.items():
    text, local = (100 * (t[name] / t["in_process"] - 1) for name in ("grpc", "grpc_local_index"))
    print(f"120-query {kind} batch, top 8: in process {1000 * t['in_process']:.1f} ms; over gRPC (server "
          f"process on 127.0.0.1) {1000 * t['grpc']:.1f} ms = {text:+.1f}%, with local_index "
          f"{1000 * t['grpc_local_index']:.1f} ms = {local:+.1f}% (target <= +5%)")
  for kind, figures in builds.items():
    print(f"build {kind} index of wiki-vital (10,033 docs): {figures['seconds']:.1f} s, "
          f"peak RSS {figures['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
  main()
