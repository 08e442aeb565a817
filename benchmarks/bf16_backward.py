"""Why bf16 compute barely speeds up the update on XLA:CPU: the gradient of 30 layers of SmolLM2's MLP matmul
pair (576 x 1,536 and back, M = 2,048 rows, f32 master weights), in fp32 and bf16 (f32 accumulation), with the
layers as a `lax.scan` over stacked weights (how the learner runs today) or a Python loop over per-layer
buffers, and with a custom VJP for the matmul that does every backward dot bf16 x bf16 -> f32 and materialises
the activations transposed for the weight gradient (`im,mo->io`: XLA:CPU's bf16 `mi,mo->io` is no faster than
fp32).

  python benchmarks/bf16_backward.py [--rows 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def plain(x, w):
  return jnp.einsum("mi,io->mo", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


@jax.custom_vjp
def vjp_matmul(x, w):
  return plain(x, w)


def _fwd(x, w):
  return plain(x, w), (x, w)


def _bwd(res, ct):
  x, w = res
  ct = ct.astype(x.dtype)
  dx = jnp.einsum("mo,io->mi", ct, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
  xt = jax.lax.optimization_barrier(x.T)  # keep the transpose: folded back into the dot it is slow in bf16
  dw = jnp.einsum("im,mo->io", xt, ct, preferred_element_type=jnp.float32)
  return dx, dw.astype(w.dtype)


vjp_matmul.defvjp(_fwd, _bwd)


def _loss_scan(mm, dtype):
  def f(params, x):
    def body(c, p):
      return c + mm(jax.nn.silu(mm(c, p[0])), p[1]), None
    return jnp.sum(jax.lax.scan(body, x.astype(dtype), params)[0].astype(jnp.float32) ** 2)
  return f


def _loss_loop(mm, dtype):
  def f(params, x):
    c = x.astype(dtype)
    for a, b in zip(*params, strict=True):
      c = c + mm(jax.nn.silu(mm(c, a)), b)
    return jnp.sum(c.astype(jnp.float32) ** 2)
  return f


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  layers, d, f = 30, 576, 1536
  rng = np.random.default_rng(0)
  w1 = jnp.asarray(rng.standard_normal((layers, d, f), np.float32) * 0.02)
  w2 = jnp.asarray(rng.standard_normal((layers, f, d), np.float32) * 0.02)
  x = jnp.asarray(rng.standard_normal((args.rows, d), np.float32))
  stacked, per_layer = (w1, w2), (list(w1), list(w2))
  cases = [("scan, fp32", _loss_scan(plain, jnp.float32), stacked),
           ("scan, bf16 (the learner today)", _loss_scan(plain, jnp.bfloat16), stacked),
           ("scan, bf16, custom VJP", _loss_scan(vjp_matmul, jnp.bfloat16), stacked),
           ("loop, fp32", _loss_loop(plain, jnp.float32), per_layer),
           ("loop, bf16", _loss_loop(plain, jnp.bfloat16), per_layer),
           ("loop, bf16, custom VJP", _loss_loop(vjp_matmul, jnp.bfloat16), per_layer)]
  print(f"grad of 30 layers x (M={args.rows} x 576 @ 576 x 1536, silu, @ 1536 x 576), f32 masters; "
        f"median of {args.repeats}")
  first = None
  for name, loss, params in cases:
    grad = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad(params, x))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(grad(params, x))
      times.append(time.perf_counter() - start)
    ms = float(np.median(times)) * 1e3
    first = first or ms
    print(f"  {name:<32} {ms:8.0f} ms  ({first / ms:.2f}x scan fp32)", flush=True)


if __name__ == "__main__":
  main()
