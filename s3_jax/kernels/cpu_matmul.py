"""A bf16 product of a few rows by a weight on CPU (`cpu_matmul.cc`, an XLA FFI custom call built on first
use): a decode step's weight matmuls, which read every weight to multiply a few rows.

XLA:CPU's bf16 product of 2-16 rows reads the weights at 8-12 GB/s (one row: 1.2 GB/s), where this machine
streams 24 GB/s; the kernel reads each weight once, in its own layout, with AVX512-BF16's dot products
(`benchmarks/README.md`, small bf16 products). Usable only where the build targets AVX512-BF16
(`status()`); elsewhere, and on GPU/TPU, XLA's product runs.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp

from s3_jax.kernels import build

TARGET = "s3_small_matmul"
SOURCE = build.FOLDER / "cpu_matmul.cc"
MAX_ROWS = 32  # the decoder uses the kernel for products of at most this many rows (above, XLA's is as fast)

_library: list[ctypes.CDLL] = []


@functools.cache
def status() -> tuple[bool, str]:
  """(True, "") when the kernel is built, registered and has AVX512-BF16 here; else (False, the reason). A
  failed build raises."""
  library, why = build.load(SOURCE)
  if library is None:
    return False, why
  if not library.S3Bf16Matmul():
    return False, "this CPU (or compiler) has no AVX512-BF16"
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.S3SmallMatmul), platform="cpu")
  _library.append(library)
  return True, ""


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x [m, k] @ w [k, n]` in float32 from bfloat16 operands (products exact, sums in fp32, as XLA's bf16
  product with a float32 result); `k` even."""
  usable, why = status()
  if not usable:
    raise RuntimeError(f"the CPU small-matmul kernel is not available: {why}")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"cpu_matmul.matmul: x {x.shape} and w {w.shape} are not [m, k] @ [k, n]")
  if x.shape[1] % 2:
    raise ValueError(f"cpu_matmul.matmul: the contraction ({x.shape[1]}) must be even")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32),
                          vmap_method="sequential")
  return call(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
