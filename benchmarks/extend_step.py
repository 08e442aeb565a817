"""Where a chunked prefill's time goes (`Sampler._extend`: new tokens of every row written into a kept KV
cache; 67% of a warm greedy rollout, benchmarks/README.md): the whole call, its 30 layers' attention over the
cache alone (the whole [t, slots] score matrix, as `decoder._cached_attention` computes it, and in query
blocks that see only the slots up to their own last position), and its weight matmuls alone, for a rollout's
first turn (16 rows of ~450 new tokens after the shared 651-token instruction: chunk 512 over 1,280 slots) and
a later turn (16 observations: chunk 128 over 1,600 slots).

  python benchmarks/extend_step.py [--repeats 3] [--compute bfloat16|float32]

Random weights of SmolLM2-135M's shapes (time does not depend on the values). The whole call runs with XLA's
attention over an fp32 cache (the sampler's before the CPU kernel), with the CPU attention kernel
(`s3_jax/kernels/cpu_attention.cc`) over the sampler's cache (the compute dtype), and with the CPU matmul
kernel too (`cpu_matmul.cc`, bf16 on AVX512-BF16 CPUs); the attention alone, XLA's over an fp32 cache and the
kernel's over fp32 and bf16 caches; the weight matmuls alone, XLA's and the kernel's. Prints ms per call and
the GFLOP/s of the matmul work each does (attention counted over every slot, as XLA computes it; the kernel
skips the slots a query cannot see).
"""

from __future__ import annotations

import argparse

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from timing import median_time

from s3_jax.kernels import cpu_attention

SHAPES = {"first turn": (16, 512, 704, 64), "later turn": (16, 128, 1408, 64)}  # rows, chunk, kept slots, new


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--compute", default="bfloat16", choices=("bfloat16", "float32"))
  args = parser.parse_args()
  from flax import nnx

  from s3_jax import assets
  from s3_jax.models import decoder
  from s3_jax.models.decoder import Decoder, KVCache, cache_storage, to_cache
  from s3_jax.models.hf import read_config
  from s3_jax.models.sampler import Sampler

  config, _ = read_config(assets.prepare("smollm2-135m-instruct", log=lambda m: None))
  compute = jnp.dtype(args.compute)
  model = Decoder(config, rngs=nnx.Rngs(0), compute_dtype=compute)
  samplers = {"xla, fp32 cache": Sampler(model, attention_kernel="xla", matmul_kernel="xla"),
              "CPU attention kernel": Sampler(model, matmul_kernel="xla"),
              "CPU attention + matmul kernels": Sampler(model)}
  if samplers["CPU attention + matmul kernels"].matmul_kernel != "cpu":
    print(f"(no matmul kernel here: {samplers.pop('CPU attention + matmul kernels').matmul_note})")
  layers = samplers["CPU attention kernel"].params["layers"]
  kernel_sampler = samplers.get("CPU attention + matmul kernels")  # its weights packed for the kernel
  rng = np.random.default_rng(0)
  kv, e, heads = config.num_kv_heads, config.head_dim, config.num_heads
  per_token = 2 * sum(int(np.prod(w.shape)) for layer in layers for w in layer.values() if w.ndim > 1)
  print(f"SmolLM2-135M chunked prefill, compute {args.compute}; layer weights {per_token / 2e6:.0f}M "
        "parameters")
  for name, (b, t, kept, new) in SHAPES.items():
    slots = kept + t + new

    def make_cache(dtype, b=b, slots=slots, kept=kept):
      def buffer(shape):  # a bf16 cache as the sampler keeps it: its bits (`decoder.cache_storage`)
        return to_cache(jnp.asarray(rng.standard_normal(shape), jnp.float32), cache_storage(dtype))

      return KVCache(tuple(buffer((b, kv, e, slots)) for _ in layers),
                     tuple(buffer((b, kv, slots, e)) for _ in layers),
                     jnp.asarray(np.arange(slots)[None, :].repeat(b, 0) < kept), jnp.int32(kept))

    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), bool)
    positions = jnp.asarray(np.arange(kept, kept + t)[None].repeat(b, 0), jnp.int32)
    matmul_flop = per_token * b * t
    attn_flop = 4 * b * heads * t * slots * e * len(layers)  # q.k and p.v over every slot, every layer
    print(f"{name}: {b} rows x {t} new tokens over {slots} slots ({kept} kept)")
    for label, sampler in samplers.items():
      held = {"cache": make_cache(sampler.cache_dtype)}
      start_valid = np.asarray(held["cache"].valid)

      def whole(sampler=sampler, held=held, valid=start_valid, kept=kept):
        # each call writes the same slots (the call donates its cache, and its index moves on)
        cache = held["cache"]._replace(valid=jnp.asarray(valid), index=jnp.int32(kept))
        out_cache, logits = sampler._extend(sampler.params, cache, tokens, mask, positions)  # noqa: B023
        logits.block_until_ready()
        held["cache"] = out_cache  # the call donates its cache

      ms = median_time(whole, args.repeats) * 1e3
      label = f"whole extend, {label} ({jnp.dtype(sampler.cache_dtype).name})"
      print(f"  {label:<42} {ms:8.1f} ms  {(matmul_flop + attn_flop) / ms / 1e6:6.1f} GFLOP/s")
    caches = {dtype: make_cache(dtype) for dtype in ("float32", "bfloat16")}

    q = jnp.asarray(rng.standard_normal((b, t, heads, e)), compute)
    valid = jnp.asarray(np.arange(slots)[None, :].repeat(b, 0) < kept + t)
    attn_mask = valid[:, None, :] & (jnp.arange(slots)[None, None, :] <= kept + jnp.arange(t)[None, :, None])
    whole_attention = jax.jit(lambda q, ks, vs: [decoder._cached_attention(q, k, v, attn_mask)  # noqa: B023
                                                  for k, v in zip(ks, vs, strict=True)])

    def blocked(q, ks, vs, block=128):
      out = []
      for k, v in zip(ks, vs, strict=True):
        parts = []
        for start in range(0, t, block):  # noqa: B023
          end = min(start + block, t)  # noqa: B023
          see = kept + end  # noqa: B023  (slots past a block's last position are masked for all its queries)
          parts.append(decoder._cached_attention(q[:, start:end], k[..., :see], v[:, :, :see],
                                                 attn_mask[:, start:end, :see]))  # noqa: B023
        out.append(jnp.concatenate(parts, axis=1))
      return out

    kernel = jax.jit(lambda q, ks, vs: [cpu_attention.cached_attention(q, k, v, valid, kept)  # noqa: B023
                                        for k, v in zip(ks, vs, strict=True)])
    for label, fn, dtype in (("30 layers' attention, whole score matrix", whole_attention, "float32"),
                             ("30 layers' attention, query blocks of 128", jax.jit(blocked), "float32"),
                             ("30 layers' attention, CPU kernel", kernel, "float32"),
                             ("30 layers' attention, CPU kernel", kernel, "bfloat16")):
      ms = median_time(lambda fn=fn, c=caches[dtype], q=q: jax.block_until_ready(fn(q, c.k, c.v)),
                       args.repeats) * 1e3
      label = f"{label} ({dtype} cache)"
      print(f"  {label:<42} {ms:8.1f} ms  {attn_flop / ms / 1e6:6.1f} GFLOP/s (all slots)")

    x = jnp.asarray(rng.standard_normal((b, t, config.hidden_size)), compute)

    def matmuls(x, layers, kernel):
      kv_sum = jnp.zeros((), jnp.float32)  # keeps the k/v projections from being dropped as unused
      for p in layers:
        h = decoder.dense("btd,dhe->bthe", x, p["q"], kernel)
        x = x + decoder.dense("bthe,hed->btd", h, p["o"], kernel)
        k = decoder.dense("btd,dke->btke", x, p["k"], kernel)
        v = decoder.dense("btd,dke->btke", x, p["v"], kernel)
        kv_sum += jnp.sum(k + v)
        gate = decoder.dense("btd,df->btf", x, p["gate"], kernel)
        up = decoder.dense("btd,df->btf", x, p["up"], kernel)
        x = x + decoder.dense("btf,fd->btd", jax.nn.silu(gate) * up, p["down"], kernel)
      return x, kv_sum

    runs = [("XLA", layers, None)]
    if kernel_sampler is not None:
      runs.append(("matmul kernel", kernel_sampler.params["layers"], kernel_sampler.matmul))
    for label, weights, kernel in runs:
      fn = jax.jit(lambda x, weights=weights, kernel=kernel: matmuls(x, weights, kernel))
      ms = median_time(lambda fn=fn: jax.block_until_ready(fn(x)), args.repeats) * 1e3  # noqa: B023
      label = f"30 layers' weight matmuls alone, {label}"
      print(f"  {label:<42} {ms:8.1f} ms  {matmul_flop / ms / 1e6:6.1f} GFLOP/s")

if __name__ == "__main__":
  main()
