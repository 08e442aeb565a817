"""What a bf16 decode step costs on XLA:CPU, piece by piece: the figures behind `decoder.cache_storage` (a
bf16 cache kept as its bits), `decoder._two_rows` (one-row bf16 products done on two rows) and the sampler
decoding in bf16 (`Sampler.decode_dtype`).

  python benchmarks/bf16_decode.py [--batches 1,2,16] [--slots 1088] [--steps 16] [--repeats 4]

1. One new slot written into each of 30 layers' key buffers `[16, 3, 64, 1088]` per step, in a jitted loop of
   16 steps with the buffers donated: fp32, bf16, bf16 viewed as uint16 around the write, and uint16 storage.
2. `x [M, k] @ w` for 30 weights of SmolLM2's MLP shapes and its vocabulary's one, fp32 against bf16 x bf16 ->
   f32 (XLA) and the CPU matmul kernel, M = 1 ... 32.
3. SmolLM2-135M decode steps through `Sampler._decode` (greedy, the CPU attention kernel where it runs), fp32
   (weights, compute, cache) against bf16 with XLA's weight matmuls and with the CPU matmul kernel
   (`kernels.cpu_matmul`, where the CPU has AVX512-BF16), per batch size; random weights of SmolLM2's shapes
   and a random cache of `slots` slots, all valid up to the step's position.
"""

from __future__ import annotations

import argparse

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from decode_step import random_decode_state
from timing import median_time


def cache_writes(repeats: int) -> None:
  from s3_jax.models.decoder import update_slice

  layers, shape, steps = 30, (16, 3, 64, 1088), 16
  bits = jax.lax.bitcast_convert_type

  def plain(buffer, new, i):
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, 0, 0, i))

  def viewed(buffer, new, i):  # a bf16 buffer viewed as uint16 around the write only
    new = bits(new.astype(buffer.dtype), jnp.uint16)
    written = jax.lax.dynamic_update_slice(bits(buffer, jnp.uint16), new, (0, 0, 0, i))
    return bits(written, buffer.dtype)

  def stored(buffer, new, i):  # the sampler's way: the buffer is uint16 throughout
    return update_slice(buffer, new, (0, 0, 0, i))

  x = jnp.ones((*shape[:3], 1), jnp.float32)
  print(f"one slot written into 30 layers' key buffers {list(shape)} a step (16 steps a call, donated)")
  for name, dtype, write in (("fp32 buffer", jnp.float32, plain), ("bf16 buffer", jnp.bfloat16, plain),
                             ("bf16 buffer viewed as uint16 around the write", jnp.bfloat16, viewed),
                             ("uint16 buffer holding bf16 bits (now)", jnp.uint16, stored)):
    def loop(buffers, x, write=write):
      def body(i, buffers):
        return tuple(write(b, x + i.astype(jnp.float32), i) for b in buffers)
      return jax.lax.fori_loop(0, steps, body, buffers)

    fn = jax.jit(loop, donate_argnums=0)
    held = {"b": fn(tuple(jnp.zeros(shape, dtype) for _ in range(layers)), x)}

    def run(fn=fn, held=held):
      held["b"] = fn(held["b"], x)
      jax.block_until_ready(held["b"])

    ms = median_time(run, repeats) / steps * 1e3
    print(f"  {name:<48} {ms:7.2f} ms a step", flush=True)


def row_products(repeats: int) -> None:
  from s3_jax.kernels import cpu_matmul

  kernel, why = cpu_matmul.status()
  print("x [M, k] @ w for 30 weights of a shape (a decode step's layers; the logits' one), ms (bf16: bf16 x "
        "bf16 -> f32; kernel: kernels.cpu_matmul" + ("" if kernel else f", not here: {why}") + ")")
  rng = np.random.default_rng(0)

  def products(product):  # each product's first 8 columns summed: every product is computed, little else
    return jax.jit(lambda x, ws: sum(product(x, w)[:, :8].sum() for w in ws))

  f32 = products(lambda x, w: jnp.dot(x, w))
  b16 = products(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32))
  own = products(lambda x, w: cpu_matmul.matmul(x.astype(jnp.bfloat16), w))
  for k, n, count in ((576, 1536, 30), (1536, 576, 30), (576, 49152, 1)):
    w32 = [jnp.asarray(rng.standard_normal((k, n)), jnp.float32) for _ in range(count)]
    w16 = [w.astype(jnp.bfloat16) for w in w32]
    packed = [cpu_matmul.pack(w) for w in w16] if kernel else []  # as the sampler keeps them: packed once
    gb = sum(w.nbytes for w in w16) / 1e9
    for m in (1, 2, 4, 8, 16, 32):
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
      a = median_time(lambda x=x: f32(x, w32).block_until_ready(), 2 * repeats) * 1e3  # noqa: B023
      b = median_time(lambda x=x: b16(x, w16).block_until_ready(), 2 * repeats) * 1e3  # noqa: B023
      line = (f"  {k:>4} x {n:<6} x{count:<2} M {m:>2}: fp32 {a:7.2f}  "
              f"bf16 {b:7.2f} ({gb / b * 1e3:4.1f} GB/s)")
      if kernel:
        c = median_time(lambda x=x: own(x, packed).block_until_ready(), 2 * repeats) * 1e3  # noqa: B023
        line += f"  kernel {c:7.2f} ({gb / c * 1e3:4.1f} GB/s)  bf16/kernel {b / c:5.2f}x"
      print(line, flush=True)


def decode_steps(batches: list[int], slots: int, steps: int, repeats: int) -> None:
  from flax import nnx

  from s3_jax import assets
  from s3_jax.models.decoder import Decoder
  from s3_jax.models.hf import read_config
  from s3_jax.models.sampler import Sampler

  config, _ = read_config(assets.prepare("smollm2-135m-instruct", log=lambda m: None))
  rng = np.random.default_rng(0)
  print(f"SmolLM2-135M greedy decode steps through Sampler._decode, {slots} slots, ms a step")
  for batch in batches:
    row = {}
    for name, dtype, matmul in (("float32", jnp.float32, "xla"), ("bfloat16", jnp.bfloat16, "xla"),
                                ("bf16-kernel", jnp.bfloat16, "auto")):
      model = Decoder(config, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=dtype)
      sampler = Sampler(model, chunk=steps, matmul_kernel=matmul)
      if name == "bf16-kernel" and sampler.matmul_kernel != "cpu":
        print(f"  (no bf16 matmul kernel here: {sampler.matmul_note})")
        continue
      held = {"state": random_decode_state(sampler, rng, batch, slots, steps, repeats, dtype, 1.0)}

      def run(sampler=sampler, held=held, batch=batch):
        state = {**held["state"], "step": jnp.int32(0), "count": jnp.zeros(batch, jnp.int32),
                 "done": jnp.zeros(batch, bool)}
        state = sampler._decode(sampler.params, state, jnp.float32(1.0), jnp.float32(1.0), greedy=True,
                                top_k=0, use_top_p=False, ignore_eos=True)
        state["tokens"].block_until_ready()
        held["state"] = state

      run()  # compiles
      row[name] = median_time(run, repeats) / steps * 1e3
    kernel = (f"  bf16 with the matmul kernel {row['bf16-kernel']:6.1f}  fp32/that "
              f"{row['float32'] / row['bf16-kernel']:4.2f}x" if "bf16-kernel" in row else "")
    print(f"  batch {batch:>2}: fp32 {row['float32']:6.1f}  bf16 {row['bfloat16']:6.1f}  fp32/bf16 "
          f"{row['float32'] / row['bfloat16']:4.2f}x{kernel} (attention: {sampler.attention_kernel})",
          flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", default="1,2,16")
  parser.add_argument("--slots", type=int, default=1088)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=4)
  args = parser.parse_args()
  cache_writes(args.repeats)
  row_products(args.repeats)
  decode_steps([int(b) for b in args.batches.split(",")], args.slots, args.steps, args.repeats)


if __name__ == "__main__":
  main()
