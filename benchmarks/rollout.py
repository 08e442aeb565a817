"""Where a rollout's wall time goes: 16 episodes (FanOutQA train questions, BM25 top-3 initial block, the
retriever as a gRPC server process on 127.0.0.1) with the tiny random searcher and with SmolLM2-135M-Instruct,
split into sampling, retrieval and host-side work (parsing, formatting, tokenizing observations, Python
loops). Target: host-side work <= 10% of the total.

SmolLM2 runs three ways on the same questions and RNG: today's path (fp32, the whole context re-prefilled
every turn), each episode's KV cache kept across turns (fp32), and the cache kept with bf16 compute (fp32
weights, f32 accumulation). The fp32 rows sample the same tokens (up to float rounding), so their ratio is
the cache's alone.

  python benchmarks/rollout.py [--episodes 16] [--models tiny,smollm2] [--paths prefill,cache,cache-bf16]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--episodes", type=int, default=16)
  parser.add_argument("--models", default="tiny,smollm2")
  parser.add_argument("--paths", default="prefill,cache,cache-bf16")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed runs per path (the first compiles the shape buckets the warm-up missed)")
  args = parser.parse_args()

  import jax.numpy as jnp
  from flax import nnx

  from s3_jax import assets, config_lib
  from s3_jax.data.qa import read_qa
  from s3_jax.models.config import DecoderConfig
  from s3_jax.models.decoder import Decoder
  from s3_jax.models.hf import load_hf
  from s3_jax.models.sampler import Sampler
  from s3_jax.models.tokenizer import load_tokenizer
  from s3_jax.retrieval.index_dir import ensure_index
  from s3_jax.search.episode import EpisodeConfig, SamplerPolicy, run_episodes
  from s3_jax.services import RetrieverClient

  smollm2 = assets.path("smollm2-135m-instruct")
  tokenizer = load_tokenizer(smollm2)
  examples = read_qa(assets.path("qa-fanout") / "train.jsonl")[:args.episodes]
  index = ensure_index(assets.path("wiki-vital") / "corpus.jsonl", "bm25", show_progress=False)
  server = subprocess.Popen([sys.executable, "-m", "s3_jax.serve", "retriever", "--index", str(index),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    port = next(int(m.group(1)) for line in server.stdout
                if (m := re.search(r"serving on 127\.0\.0\.1:(\d+)", line)))
    retriever = RetrieverClient(f"127.0.0.1:{port}")
    initial = retriever.search([e.question for e in examples], 3)
    for name in args.models.split(","):
      runs = [("cache", None)] if name == "tiny" else [(p, p) for p in args.paths.split(",")]
      base = None
      for label, path in runs:
        if name == "tiny":  # the CI pulse's random searcher: its samples are noise, so mostly invalid turns
          tiny = config_lib.load(str(CONFIGS / "tiny.py"))
          m = tiny.searcher.model
          model = Decoder(DecoderConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                                        intermediate_size=m.mlp_size, num_layers=m.num_layers,
                                        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                                        head_dim=m.head_dim, rope_theta=m.rope_theta,
                                        tie_embeddings=m.tie_embeddings, eos_token_id=tokenizer.eos_token_id),
                          rngs=nnx.Rngs(0))
          config = EpisodeConfig.from_config(tiny)
        else:
          compute = jnp.bfloat16 if path == "cache-bf16" else jnp.float32
          model = load_hf(smollm2, dtype=jnp.float32, compute_dtype=compute)
          config = EpisodeConfig.from_config(config_lib.load(f"{CONFIGS / 'smollm2_wiki.py'}:runlocal"))
        sampler = Sampler(model, tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id or 0)

        def policy(sampler=sampler, path=path):
          return SamplerPolicy(sampler, temperature=0.6, top_p=0.95, seed=0, keep_cache=path != "prefill")

        run_episodes(policy(), tokenizer, retriever, examples[:2], initial[:2], config)  # warm-up compiles
        for repeat in range(args.repeats):
          traces = dict(sampler.trace_counts)
          timings: dict[str, float] = {}
          start = time.perf_counter()
          episodes = run_episodes(policy(), tokenizer, retriever, examples, initial, config, timings)
          total = time.perf_counter() - start
          compiled = {k: v - traces[k] for k, v in sampler.trace_counts.items() if v > traces[k]}
          if repeat == args.repeats - 1:
            base = base or total
          host = total - timings.get("sample", 0.0) - timings.get("retrieve", 0.0)
          turns = sum(e.stats()["turns"] for e in episodes)
          searches = sum(e.stats()["searches"] for e in episodes)
          tokens = sum(e.stats()["context_tokens"] for e in episodes)
          ratio = f" ({base / total:.2f}x the first row's last run)" if repeat == args.repeats - 1 else ""
          print(f"{name} [{label}] run {repeat + 1}: {len(episodes)} episodes, {turns} turns, {searches} "
                f"searches, {tokens} context tokens, {total:.2f} s{ratio}, "
                f"compiled {compiled or 'nothing'} | "
                f"sample {timings.get('sample', 0.0):.2f} s "
                f"({100 * timings.get('sample', 0.0) / total:.1f}%), "
                f"retrieve {timings.get('retrieve', 0.0):.3f} s "
                f"({100 * timings.get('retrieve', 0.0) / total:.1f}%), "
                f"host {host:.3f} s ({100 * host / total:.1f}%, target <= 10%)", flush=True)
  finally:
    server.kill()


if __name__ == "__main__":
  main()
