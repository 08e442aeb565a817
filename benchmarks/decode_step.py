"""One SmolLM2-135M decode step (one new token per row) through the sampler's own jitted decode loop, over a
KV cache of rollout length, for the weight / compute / cache dtypes the sampler can use; and the decode
attention of 30 layers three ways (a scan over a stacked cache, the stacked cache with the slots minor, a loop
over per-layer buffers): the figures behind `decoder.KVCache`'s layout and `Sampler.decode_dtype`; each decode
step with XLA's attention and with the CPU kernel (`Sampler(attention_kernel=...)`). Then the
token draw alone (s3's temperature 0.6 / top-p 0.95 over SmolLM2's 49,152 logits): the sort-based top-p and
Gumbel draw the sampler used until 2026-12-07 against `sample_logits` now (bisection and an inverse-CDF draw),
and the fp32 decode step sampling that way against greedy.

  python benchmarks/decode_step.py [--batch 16] [--slots 1088] [--steps 16] [--repeats 3] [--skip-attention]

Random weights of SmolLM2-135M's shapes (the time does not depend on their values), a random cache with 90%
of the slots valid. ms per step is the median over `repeats` calls of `steps` decode steps each.
"""

from __future__ import annotations

import argparse

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from timing import median_time


def attention_layouts(batch: int, slots: int, repeats: int) -> None:
  layers, kv, g, e = 30, 3, 3, 64
  rng = np.random.default_rng(0)
  k = rng.standard_normal((layers, batch, kv, slots, e), np.float32)
  v = rng.standard_normal((layers, batch, kv, slots, e), np.float32)
  valid = jnp.asarray(rng.random((batch, slots)) < 0.9)
  q0 = jnp.asarray(rng.standard_normal((batch, kv, g, e), np.float32))

  def softmax(scores):
    return jax.nn.softmax(jnp.where(valid[:, None, None], scores / 8.0, -1e30), -1)

  def reduce_attn(q, k, v):  # keys [b, k, s, e]: broadcast multiply-reduce
    p = softmax(jnp.sum(q[:, :, :, None, :] * k[:, :, None], -1))
    return jnp.sum(p[..., None] * v[:, :, None], 3)

  def dot_attn(q, kt, v):  # keys [b, k, e, s]: two batched dots
    p = softmax(jnp.einsum("bkge,bkes->bkgs", q, kt))
    return jnp.einsum("bkgs,bkse->bkge", p, v)

  def scan(attn):
    return jax.jit(lambda q, k, v: jax.lax.scan(lambda c, kv: (c + attn(c, *kv), None), q, (k, v))[0])

  def loop(attn):
    def f(q, ks, vs):
      for kl, vl in zip(ks, vs, strict=True):
        q = q + attn(q, kl, vl)
      return q
    return jax.jit(f)

  kt = k.transpose(0, 1, 2, 4, 3)
  cases = [("scan, stacked [L,b,k,s,e], multiply-reduce (before)", scan(reduce_attn), k),
           ("scan, stacked [L,b,k,e,s], dots", scan(dot_attn), kt),
           ("loop, per-layer [b,k,s,e], multiply-reduce", loop(reduce_attn), list(k)),
           ("loop, per-layer [b,k,e,s], dots (now)", loop(dot_attn), list(kt))]
  cache_bytes = 2 * k.nbytes
  print(f"decode attention, 30 layers, batch {batch}, {slots} slots, fp32 "
        f"({cache_bytes / 1e6:.0f} MB of K/V per step)")
  for name, fn, keys in cases:
    keys = jax.tree.map(jnp.asarray, keys)
    values = jnp.asarray(v) if isinstance(keys, jax.Array) else [jnp.asarray(x) for x in v]
    ms = median_time(lambda: fn(q0, keys, values).block_until_ready(), repeats * 3) * 1e3  # noqa: B023
    print(f"  {name:<52} {ms:7.1f} ms  {cache_bytes / ms / 1e6:5.1f} GB/s")


def sorted_top_p_draw(logits, rng, temperature, top_p):
  """The sampler's token draw until 2026-12-07: a descending sort of the vocabulary for top-p, then
  `jax.random.categorical` (a Gumbel number per token)."""
  scaled = logits / temperature
  ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
  return jax.random.categorical(rng, jnp.where(scaled < threshold, -jnp.inf, scaled), axis=-1)


def token_draw(batch: int, repeats: int) -> None:
  from s3_jax.models.sampler import first_max, sample_logits

  logits = jax.random.normal(jax.random.key(0), (batch, 49152)) * 4
  t, p = jnp.float32(0.6), jnp.float32(0.95)
  cases = {
      "sort + Gumbel (until 2026-12-07)": lambda x, r: sorted_top_p_draw(x, r, t, p),
      "bisection + inverse CDF (now)": lambda x, r: sample_logits(x, r, t, p, greedy=False, top_k=0,
                                                                   use_top_p=True),
      "no top-p, Gumbel": lambda x, r: jax.random.categorical(r, x / t, axis=-1),
      "no top-p, inverse CDF (now)": lambda x, r: sample_logits(x, r, t, p, greedy=False, top_k=0,
                                                                 use_top_p=False),
      "greedy, jnp.argmax (until 2026-12-07)": lambda x, r: jnp.argmax(x, axis=-1),
      "greedy, first_max (now)": lambda x, r: first_max(x)}
  print(f"token draw, batch {batch}, 49,152 logits, T 0.6, top-p 0.95")
  for name, fn in cases.items():
    fn = jax.jit(fn)
    keys = iter(jax.random.split(jax.random.key(1), 4 * repeats + 8))
    ms = median_time(lambda: fn(logits, next(keys)).block_until_ready(), 4 * repeats) * 1e3  # noqa: B023
    print(f"  {name:<40} {ms:7.2f} ms", flush=True)


def random_decode_state(sampler, rng, batch: int, slots: int, steps: int, repeats: int, cache_dtype,
                        valid_fraction: float) -> dict:
  """A decode state of `sampler` over a random cache of `slots` slots in `cache_dtype` (a bf16 cache as the
  sampler keeps it: its bits), `valid_fraction` of the slots valid up to the first step's position, room
  for `repeats + 2` calls of `steps` steps."""
  from s3_jax.models.decoder import KVCache, cache_storage, to_cache

  config = sampler.config
  kv, e = config.num_kv_heads, config.head_dim

  def layer(shape):
    return to_cache(jnp.asarray(rng.standard_normal(shape, np.float32)), cache_storage(cache_dtype))

  start = slots - (repeats + 2) * steps  # each call writes `steps` more slots
  valid = np.zeros((batch, slots), bool)
  valid[:, :start] = rng.random((batch, start)) < valid_fraction
  cache = KVCache(tuple(layer((batch, kv, e, slots)) for _ in range(config.num_layers)),
                  tuple(layer((batch, kv, slots, e)) for _ in range(config.num_layers)),
                  jnp.asarray(valid), jnp.int32(start))
  logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
  position = jnp.full((batch,), start, jnp.int32)
  return sampler._decode_state(cache, logits, position, [steps] * batch, batch, steps, None)


def decode_steps(batch: int, slots: int, steps: int, repeats: int) -> None:
  from flax import nnx

  from s3_jax import assets
  from s3_jax.models.decoder import Decoder
  from s3_jax.models.hf import read_config
  from s3_jax.models.sampler import Sampler

  config, _ = read_config(assets.prepare("smollm2-135m-instruct", log=lambda m: None))
  rng = np.random.default_rng(0)
  print(f"SmolLM2-135M decode step through Sampler._decode, batch {batch}, {slots} slots, greedy")
  print(f"  {'weights':<9} {'compute':<9} {'cache':<9} {'attention':<10} {'draw':<22} {'ms/step':>8}")
  sampled = "T 0.6, top-p 0.95"
  for weights, compute, cache_dtype, attention, draw in (
      ("float32", "float32", "float32", "xla", "greedy"),
      ("float32", "float32", "float32", "cpu", "greedy"),
      ("float32", "float32", "float32", "xla", sampled),
      ("float32", "float32", "float32", "cpu", sampled),
      ("float32", "float32", "bfloat16", "xla", "greedy"),
      ("float32", "float32", "bfloat16", "cpu", "greedy"),
      ("float32", "float32", "bfloat16", "cpu", sampled),
      ("bfloat16", "float32", "bfloat16", "xla", "greedy"),
      ("bfloat16", "float32", "bfloat16", "cpu", "greedy"),
      ("bfloat16", "bfloat16", "bfloat16", "xla", "greedy"),
      ("bfloat16", "bfloat16", "bfloat16", "cpu", "greedy")):
    model = Decoder(config, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(weights))
    sampler = Sampler(model, decode_dtype=jnp.dtype(compute), chunk=steps, attention_kernel=attention)
    held = {"state": random_decode_state(sampler, rng, batch, slots, steps, repeats, cache_dtype, 0.9)}

    def run():
      state = held["state"]  # noqa: B023  (the last call's state: its cache was donated and returned)
      state = {**state, "step": jnp.int32(0), "count": jnp.zeros(batch, jnp.int32),
               "done": jnp.zeros(batch, bool)}
      greedy = draw == "greedy"  # noqa: B023
      state = sampler._decode(sampler.params, state, jnp.float32(1.0 if greedy else 0.6),  # noqa: B023
                              jnp.float32(0.95), greedy=greedy, top_k=0, use_top_p=not greedy,
                              ignore_eos=True)
      state["tokens"].block_until_ready()
      held["state"] = state  # noqa: B023

    ms = median_time(run, repeats) / steps * 1e3
    print(f"  {weights:<9} {compute:<9} {cache_dtype:<9} {attention:<10} {draw:<22} {ms:8.1f}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--slots", type=int, default=1088)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-attention", action="store_true")
  args = parser.parse_args()
  if not args.skip_attention:
    attention_layouts(args.batch, args.slots, args.repeats)
  for batch in sorted({1, args.batch}):
    token_draw(batch, args.repeats)
  decode_steps(args.batch, args.slots, args.steps, args.repeats)


if __name__ == "__main__":
  main()
