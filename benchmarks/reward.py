"""Reward scoring speed, side by side: N trajectories (FanOutQA questions with their BM25 top-3 wiki-vital
documents as D_s3), scored by the same generator service (`python -m s3_jax.serve generator --backend jax`,
SmolLM2-135M-Instruct, fp32, in its own process on 127.0.0.1):

1. s3-style: a serial loop, one answer request per trajectory, then one judge request when the span check
   fails (s3_protocol.md §3.1: what s3's `compute_score_rag` does);
2. this project's `RewardScorer`: one batched answer call, one batched judge call;
3. the same batch again, answered from the content-addressed cache.

  python benchmarks/reward.py [--n 120] [--max-tokens 32] [--address HOST:PORT]

`--address` scores against a generator service that is already running (e.g. the vllm backend on a GPU
host) instead of starting the jax one here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)


def reward_questions(n: int) -> tuple[list, list]:
  """The benchmark's first `n` FanOutQA questions (train, dev, test in order) and their BM25 top-3 wiki-vital
  documents (D_s3 of each trajectory); `generator_dtype.py` answers the same prompts."""
  from s3_jax import assets
  from s3_jax.data.qa import read_qa
  from s3_jax.retrieval.index_dir import ensure_index, load_retriever

  questions = [q for split in ("train", "dev", "test")
               for q in read_qa(assets.path("qa-fanout") / f"{split}.jsonl")][:n]
  retriever = load_retriever(ensure_index(assets.path("wiki-vital") / "corpus.jsonl", "bm25",
                                          show_progress=False))
  return questions, retriever.search([q.question for q in questions], 3)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=120)
  parser.add_argument("--max-tokens", type=int, default=32)
  parser.add_argument("--address", default=None, help="an already running generator service")
  args = parser.parse_args()

  from s3_jax.reward.answers import span_match
  from s3_jax.reward.judge import judge
  from s3_jax.reward.prompts import answer_messages
  from s3_jax.reward.scorer import RewardItem, RewardScorer
  from s3_jax.search.formats import generator_context
  from s3_jax.services import GeneratorClient

  questions, docs = reward_questions(args.n)
  items = [RewardItem(q.data_source, q.question, q.golden_answers, tuple(d))
           for q, d in zip(questions, docs, strict=True)]

  server = None
  if args.address is None:
    command = [sys.executable, "-m", "s3_jax.serve", "generator", "--backend", "jax", "--model",
               "asset:smollm2-135m-instruct", "--port", "0", "--max-tokens", str(args.max_tokens)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    if server is not None:
      port = next(int(m.group(1)) for line in server.stdout
                  if (m := re.search(r"serving on 127\.0\.0\.1:(\d+)", line)))
      args.address = f"127.0.0.1:{port}"
    client = GeneratorClient(args.address)
    health = client.health()
    client.generate([answer_messages(items[0].question, generator_context(items[0].docs))],
                    max_tokens=args.max_tokens)  # warm-up (compiles the first shapes)

    start = time.perf_counter()
    serial_correct = 0
    for item in items:  # s3: one blocking request per trajectory, a judge request when the span fails
      [answer] = client.generate([answer_messages(item.question, generator_context(item.docs))],
                                 max_tokens=args.max_tokens)
      correct = span_match(answer, item.golden_answers) or judge(client, [answer], [item.golden_answers])[0]
      serial_correct += correct
    serial = time.perf_counter() - start

    scorer = RewardScorer(client, generator_id="bench", kind="genacc", max_tokens=args.max_tokens)
    start = time.perf_counter()
    results = scorer.rewards(items)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    again = scorer.rewards(items)
    cached = time.perf_counter() - start
  finally:
    if server is not None:
      server.kill()
  assert all(r.cached for r in again)
  print(f"{len(items)} trajectories, generator {health.backend}:{health.model} over gRPC, answers <= "
        f"{args.max_tokens} tokens, judge on failed spans")
  print(f"  s3-style serial loop  {serial:8.2f} s   GenAcc {serial_correct / len(items):.3f}")
  genacc = sum(r.scores.genacc for r in results) / len(items)
  print(f"  RewardScorer batched  {batched:8.2f} s   GenAcc {genacc:.3f}   -> {serial / batched:.1f}x "
        "(target >= 10x)")
  print(f"  cached batch          {cached:8.4f} s   -> {batched / cached:,.0f}x faster than uncached "
        "(target >= 100x)")


if __name__ == "__main__":
  main()
