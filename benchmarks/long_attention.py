"""One decoder layer's causal self-attention over long training sequences (the learner's score and update
passes, the sampler's first prefill), the whole `[t, t]` score matrix vs query blocks that each stop at their
own last position (`models/decoder.py`'s `_attention`): time and XLA's temporary memory, forward and
forward + backward, SmolLM2-135M's shapes (9 query heads in 3 groups of 3, head_dim 64).

  python benchmarks/long_attention.py [--batch 4] [--lengths 1024,2048,4096] [--blocks 0,256,512,1024]

Block 0 is the whole matrix. Medians of interleaved calls (`timing.interleaved_medians`).
"""

from __future__ import annotations

import argparse

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_medians

from s3_jax.models.decoder import _attention, _dense_attention


def _inputs(batch: int, length: int, dtype):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((batch, length, 9, 64)), dtype)
  k = jnp.asarray(rng.standard_normal((batch, 3, length, 64)), dtype)
  v = jnp.asarray(rng.standard_normal((batch, 3, length, 64)), dtype)
  valid = np.ones((batch, length), bool)
  valid[:, : length // 8] = False  # some left padding
  mask = jnp.asarray(np.tril(np.ones((length, length), bool))[None] & valid[:, None, :])
  return q, k, v, mask


def _functions(block: int):
  attend = _dense_attention if block == 0 else (lambda q, k, v, m: _attention(q, k, v, m, block=block))
  forward = jax.jit(attend)

  @jax.jit
  def backward(q, k, v, m):
    return jax.grad(lambda *a: jnp.sum(attend(*a, m).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(q, k, v)

  return forward, backward


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--lengths", default="1024,2048,4096")
  parser.add_argument("--blocks", default="0,256,512,1024")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  blocks = [int(b) for b in args.blocks.split(",")]
  print(f"causal self-attention, batch {args.batch}, 9 heads / 3 kv heads x 64, {args.dtype}, "
        f"{jax.devices()[0].device_kind}")
  for length in (int(x) for x in args.lengths.split(",")):
    inputs = _inputs(args.batch, length, dtype)
    for kind in ("forward", "forward+backward"):
      fns, memory = {}, {}
      for block in blocks:
        fn = _functions(block)[kind != "forward"]
        compiled = fn.lower(*inputs).compile()
        memory[block] = compiled.memory_analysis().temp_size_in_bytes / 1e9
        fns[block] = (lambda f, xs: lambda: jax.block_until_ready(f(*xs)))(compiled, inputs)
      times = interleaved_medians(fns, args.repeats, warmup=1)
      base = times[blocks[0]]
      row = " | ".join(f"{'whole' if b == 0 else f'block {b}'} {1e3 * times[b]:7.1f} ms "
                       f"({base / times[b]:.2f}x) temp {memory[b]:.2f} GB" for b in blocks)
      print(f"  t {length:5d} {kind:<17} {row}")


if __name__ == "__main__":
  main()
