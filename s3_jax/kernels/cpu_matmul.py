"""bf16 products by a weight on CPU (`cpu_matmul.cc`, an XLA FFI custom call built on first use): the
sampler's weight matmuls, prefills and decode steps.

XLA:CPU's bf16 product (YNNPACK) reads the weights at 8-15 GB/s for the 2-16 rows of a decode step (1.2 GB/s
for one row), where this machine streams 24 GB/s, and runs a prefill's many rows at 100-380 GFLOP/s with a
float32 result that is then rounded to bf16 in a second pass. The kernel streams each weight once for few
rows, packs each weight panel once for many, multiplies with AVX512-BF16's dot products and writes bf16
directly (`benchmarks/README.md`, the matmul kernel). Usable only where the build targets AVX512-BF16
(`status()`); elsewhere, and on GPU/TPU, XLA's product runs.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import jax
import jax.numpy as jnp

from s3_jax.kernels import build

TARGET = "s3_matmul"
SOURCE = build.FOLDER / "cpu_matmul.cc"
SMALL_ROWS = 16  # at most this many rows: the decode-step path (`cpu_matmul.cc`, kSmallRows), fp32 sums out

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
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.S3Matmul), platform="cpu")
  _library.append(library)
  return True, ""


def matmul(x: jax.Array, w: jax.Array, out_dtype: Any = jnp.float32) -> jax.Array:
  """`x [m, k] @ w [k, n]` from bfloat16 operands, products exact and sums in fp32 (as XLA's bf16 product
  with a float32 result), in `out_dtype` (float32, or bfloat16: the fp32 sums rounded to nearest even);
  `k` even. At most 16 rows (a decode step) multiply in blocks of `k` that stream the weight once; more rows
  (a prefill) multiply each 64-column panel of the weight, packed once, with all of `k` at a time."""
  usable, why = status()
  if not usable:
    raise RuntimeError(f"the CPU matmul kernel is not available: {why}")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"cpu_matmul.matmul: x {x.shape} and w {w.shape} are not [m, k] @ [k, n]")
  if x.shape[1] % 2:
    raise ValueError(f"cpu_matmul.matmul: the contraction ({x.shape[1]}) must be even")
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"cpu_matmul.matmul: out_dtype {out_dtype} must be float32 or bfloat16")
  small = x.shape[0] <= SMALL_ROWS  # its sums accumulate in the output over blocks of k: fp32, then rounded
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]),
                                                       jnp.float32 if small else out_dtype),
                          vmap_method="sequential")
  return call(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).astype(out_dtype)
