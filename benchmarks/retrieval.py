"""Retrieval speed, side by side. Today: dense encoder texts/s, this project's JAX encoder vs PyTorch
`transformers` (same all-MiniLM-L6-v2 weights, mean pooling + L2 norm, max length 256, batch 64, torch on
2 threads), on the first N passages of the `wiki-vital` corpus. Each engine runs in its own process.

  python benchmarks/retrieval.py [--texts 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _texts(n: int) -> list[str]:
  from s3_jax import assets
  from s3_jax.data import read_corpus

  return [doc.contents for doc in read_corpus(assets.path("wiki-vital") / "corpus.jsonl", limit=n)]


def _median(fn, repeats: int) -> float:
  fn()  # warm-up (and compile every bucket)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def encode_s3_jax(texts, repeats):
  from s3_jax import assets
  from s3_jax.models.encoder import load_encoder

  encoder = load_encoder(assets.path("minilm-l6-v2"), max_length=256, batch_size=64)
  return _median(lambda: encoder.encode(texts), repeats)


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

  return _median(run, repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--texts", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--engine", choices=("s3_jax", "transformers"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.engine:
    fn = encode_s3_jax if args.engine == "s3_jax" else encode_transformers
    print(json.dumps(fn(_texts(args.texts), args.repeats)))
    return

  def child(engine):
    done = subprocess.run([sys.executable, __file__, "--engine", engine, "--texts", str(args.texts),
                           "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])

  ours, theirs = child("s3_jax"), child("transformers")
  print(f"dense encoder, all-MiniLM-L6-v2, {args.texts} wiki-vital passages, max length 256, batch 64")
  print(f"  s3_jax (JAX)   {args.texts / ours:8.1f} texts/s  ({ours:.2f} s)")
  print(f"  transformers   {args.texts / theirs:8.1f} texts/s  ({theirs:.2f} s)")
  print(f"  ratio          {theirs / ours:8.2f}x  (target >= 1.5x)")


if __name__ == "__main__":
  main()
