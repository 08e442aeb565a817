"""Attention over a KV cache on CPU as an XLA FFI custom call (`cpu_attention.cc`), built on first use: a
decode step's (one new position per row) and a chunked prefill's (new positions written into a kept cache).

XLA:CPU has no fused attention. A decode step's attention reads the whole cache once per layer (~19 GB/s in
fp32; a bf16 cache is converted before its dot, slower than fp32), every slot of the cache's bucket; a chunked
prefill materialises [new, slots] scores and masks, computes the causal half of its own block and the padding
of every row. The kernel reads the cache in its own dtype (bf16: half the bytes), only the 16-slot blocks a
query can see, and computes scores, softmax and sums in fp32 (`benchmarks/README.md`, cached attention).

The C++ source is compiled for this machine on first use (`kernels.build`); `status()` says whether it is
usable and why not. Nothing here is used on GPU/TPU, where XLA's own attention runs.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from s3_jax.kernels import build

TARGET = "s3_cached_attention"
SOURCE = build.FOLDER / "cpu_attention.cc"
HEAD_DIMS = (16, 32, 64, 128)  # instantiated in the kernel
MAX_GROUP = 8  # query heads per kv head


@functools.cache
def _load() -> tuple[bool, str]:
  """Builds (once per source and machine) and registers the kernel; (usable, why not)."""
  library, why = build.load(SOURCE)
  if library is None:
    return False, why
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.S3CachedAttention), platform="cpu")
  _library.append(library)
  return True, ""


_library: list[ctypes.CDLL] = []


def bf16_dots() -> bool:
  """Whether this host's build multiplies a chunked prefill over a bf16 cache in bf16 pairs (AVX512-BF16):
  the query and the softmax's probabilities rounded to bf16, sums in fp32. False where the kernel is not
  usable."""
  return status()[0] and bool(_library[0].S3Bf16Dots())


def status() -> tuple[bool, str]:
  """(True, "") when the kernel is built and registered for this process; else (False, the reason). A
  failed build raises (a compiler that is present but fails is a bug to see, not a fallback)."""
  return _load()


def faster_here(cpuinfo_flags: str | None = None) -> tuple[bool, str]:
  """(True, "") where the kernel is the faster choice for `Sampler(attention_kernel="auto")`, else (False,
  why). It was tuned and measured on AVX-512 CPUs; on an AVX2-only CPU (a Zen 1 EPYC, 2026-12-08) the same
  build ran a chunked prefill's attention 3.7-4.6x and a decode step's 1.2-1.6x slower than XLA's, and a
  SmolLM2 rollout took 206 s against 110 s with XLA's attention (benchmarks/README.md)."""
  flags = (build.cpu_flags() if cpuinfo_flags is None else cpuinfo_flags).split()
  if "avx512f" in flags:
    return True, ""
  return False, ("the CPU has no AVX-512 (on AVX2 the kernel measured slower than XLA's attention: "
                 "benchmarks/README.md)")


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
  """Whether the kernel is instantiated for these attention shapes."""
  return (head_dim in HEAD_DIMS and num_kv_heads > 0 and num_heads % num_kv_heads == 0
          and num_heads // num_kv_heads <= MAX_GROUP)


def cached_attention(q: jax.Array, kt: jax.Array, v: jax.Array, valid: jax.Array,
                     index: jax.Array) -> jax.Array:
  """Grouped-query attention of new positions over a row's cache: q `[b, t, h, e]`, cached keys kt
  `[b, k, e, s]` and values v `[b, k, s, e]` (float32, bfloat16 or bfloat16's bits as uint16, both the same;
  the new positions' already written at slots `index ... index + t - 1`), `valid [b, s]` the slots holding a
  token -> float32 `[b, t, h, e]`: for query i, `softmax(q . k / sqrt(e)) . v` over the valid slots up to
  `index + i`; zeros for a query whose own slot is not valid (left padding). A chunked prefill (t > 1) over a
  bf16 cache on a host with AVX512-BF16 (`bf16_dots()`) rounds the query and the probabilities to bf16
  (relative 2^-9 each; exact for a query a bf16 model computed)."""
  usable, why = status()
  if not usable:
    raise RuntimeError(f"the CPU cached-attention kernel is not available: {why}")
  b, t, h, e = q.shape
  if not supports(h, kt.shape[1], e):
    raise ValueError(f"cached_attention: no kernel for {h} heads over {kt.shape[1]} kv heads of dim {e}")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((b, t, h, e), jnp.float32), vmap_method="sequential")
  return call(q.astype(jnp.float32), kt, v, valid.astype(bool), jnp.asarray(index, jnp.int32),
              scale=np.float32(1.0 / np.sqrt(e)))
