"""One decoder layer's decode attention (one new token per row over a long KV cache), in the layouts and
dtypes the sampler could use: the figure behind `models/decoder.py`'s choice for `_scores`/`_mix` at t == 1.

  python benchmarks/decode_attention.py [--batch 16] [--slots 1088] [--repeats 200]

SmolLM2-135M's shapes (9 query heads in 3 groups of 3, head_dim 64). Prints ms per call and the effective
bandwidth over the cache bytes each variant reads (K and V once).
"""

from __future__ import annotations

import argparse
import time

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from s3_jax.kernels import cpu_attention

_NEG = float(np.finfo(np.float32).min)


def _softmax_masked(scores, valid):
  scores = jnp.where(valid[:, None, None, :], scores, _NEG)
  return jax.nn.softmax(scores, axis=-1)


def reduce_bkse(q, k, v, valid):
  """Today's: broadcast multiply-reduce over e, cache [b, k, s, e] (f32 math)."""
  scores = jnp.sum(q[:, :, :, None, :].astype(jnp.float32) * k[:, :, None].astype(jnp.float32), -1) / 8.0
  probs = _softmax_masked(scores, valid)
  return jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=3)


def _dots(score_equation: str):
  """Batched dots with f32 accumulation, the keys laid out as `score_equation`'s second operand says."""
  def attend(q, k, v, valid):
    scores = jnp.einsum(score_equation, q.astype(k.dtype), k, preferred_element_type=jnp.float32) / 8.0
    probs = _softmax_masked(scores, valid)
    return jnp.einsum("bkgs,bkse->bkge", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return attend


dot_bkse = _dots("bkge,bkse->bkgs")  # cache [b, k, s, e]
dot_bkes = _dots("bkge,bkes->bkgs")  # keys [b, k, e, s]


def reduce_bkes(q, kt, v, valid):
  """Broadcast multiply-reduce with keys [b, k, e, s] (s minor: the reduction over e is across rows)."""
  scores = jnp.sum(q[..., None].astype(jnp.float32) * kt[:, :, None].astype(jnp.float32), axis=3) / 8.0
  probs = _softmax_masked(scores, valid)
  return jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=3)


def kernel_bkes(q, kt, v, valid):
  """The CPU kernel (`s3_jax/kernels/cpu_attention.cc`): keys [b, k, e, s], reads only blocks with a valid
  slot, in the cache's dtype."""
  b, k, g, e = q.shape
  index = kt.shape[3] - 1  # the new token's slot: the last (valid in every row, see main)
  return cpu_attention.cached_attention(q.reshape(b, 1, k * g, e), kt, v, valid, index).reshape(b, k, g, e)


VARIANTS = {"reduce bkse": (reduce_bkse, False), "dot bkse": (dot_bkse, False),
            "reduce bkes": (reduce_bkes, True), "dot bkes": (dot_bkes, True),
            "kernel bkes": (kernel_bkes, True)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--slots", type=int, default=1088)
  parser.add_argument("--repeats", type=int, default=200)
  parser.add_argument("--valid", type=float, default=0.9,
                      help="the longest row's valid slots: this fraction of the slots, from the first "
                           "(the rest empty, as in a bucket longer than its rows); the shortest, 0.8 of it")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated, of: " + ", ".join(VARIANTS))
  args = parser.parse_args()
  variants = args.variants.split(",")
  for name in variants:
    if name not in VARIANTS:
      parser.error(f"--variants: unknown variant {name!r}")
  b, kh, g, s, e = args.batch, 3, 3, args.slots, 64
  rng = np.random.default_rng(0)
  q = rng.standard_normal((b, kh, g, e), np.float32)
  k = rng.standard_normal((b, kh, s, e), np.float32)
  v = rng.standard_normal((b, kh, s, e), np.float32)
  valid = np.arange(s)[None, :] < np.linspace(args.valid * s * 0.8, args.valid * s, b).astype(int)[:, None]
  valid[:, -1] = True  # the new token's own slot
  reference = None
  print(f"batch {b}, slots {s}, 3 kv heads x 3 queries, head_dim 64; {jax.devices()[0].platform}")
  print(f"{'variant':<20} {'cache':<9} {'ms/call':>8} {'GB/s':>6} {'max|diff|':>10}")
  for name in variants:
    fn, transposed = VARIANTS[name]
    for dtype in (jnp.float32, jnp.bfloat16):
      keys = jnp.asarray(k.transpose(0, 1, 3, 2) if transposed else k, dtype)
      values = jnp.asarray(v, dtype)
      qs = jnp.asarray(q, jnp.float32)
      f = jax.jit(fn)
      out = np.asarray(f(qs, keys, values, jnp.asarray(valid)), np.float32)
      if reference is None:
        reference = out
      for _ in range(3):
        f(qs, keys, values, jnp.asarray(valid)).block_until_ready()
      start = time.perf_counter()
      for _ in range(args.repeats):
        result = f(qs, keys, values, valid)
      result.block_until_ready()
      ms = (time.perf_counter() - start) / args.repeats * 1e3
      gbs = (keys.nbytes + values.nbytes) / (ms / 1e3) / 1e9  # of the whole cache (the kernel reads less)
      print(f"{name:<20} {jnp.dtype(dtype).name:<9} {ms:8.2f} {gbs:6.1f} "
            f"{np.abs(out - reference).max():10.2e}")


if __name__ == "__main__":
  main()
