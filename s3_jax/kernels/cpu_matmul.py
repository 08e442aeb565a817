"""bf16 products by a weight on CPU (`cpu_matmul.cc`, an XLA FFI custom call built on first use): the
sampler's weight matmuls, prefills and decode steps.

XLA:CPU's bf16 product (YNNPACK) reads the weights at 8-15 GB/s for the 2-16 rows of a decode step (1.2 GB/s
for one row), where this machine streams 24 GB/s, and runs a prefill's many rows at 100-380 GFLOP/s with a
float32 result that is then rounded to bf16 in a second pass. The kernel takes the weights packed once in its
layout (`pack`: contiguous 64-column panels), streams each once for few rows, keeps a panel in cache for
many, multiplies with AVX512-BF16's dot products and writes bf16 directly (`benchmarks/README.md`, the
matmul kernel). Usable only where the build targets AVX512-BF16 (`status()`); elsewhere, and on GPU/TPU,
XLA's product runs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from s3_jax.kernels import build

TARGET = "s3_matmul"
SOURCE = build.FOLDER / "cpu_matmul.cc"
SMALL_ROWS = 16  # at most this many rows: the decode-step path (`cpu_matmul.cc`, kSmallRows), fp32 sums out
PANEL = 64  # columns of a packed panel (`cpu_matmul.cc`, kPanel)

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
  """A weight `w` in the kernel's layout (`pack`): `data [ceil(n / 64), k / 2, 128]` bf16, the product's
  contraction `k` and columns `n`, and `shape`, the weight's own shape (`[*in, *out]`, whose input dims
  multiply to `k`). A pytree whose static fields are the ints."""
  data: jax.Array
  k: int = dataclasses.field(metadata={"static": True})
  n: int = dataclasses.field(metadata={"static": True})
  shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

  @property
  def dtype(self) -> Any:
    return self.data.dtype


def pack(w: jax.Array, n_in: int = 1) -> PackedWeight:
  """`w [*in, *out]` (its first `n_in` dims the product's contraction, `k` of them in all: even) in the
  kernel's layout: 64-column panels, each the weight's rows in pairs, a pair's two values of a column side
  by side (`cpu_matmul.cc`); columns past n are zero."""
  shape = tuple(w.shape)
  k, n = math.prod(shape[:n_in]), math.prod(shape[n_in:])
  if k % 2:
    raise ValueError(f"cpu_matmul.pack: the contraction of a weight of shape {shape} ({k}) must be even")
  panels = -(-n // PANEL)
  w2 = jnp.pad(w.reshape(k, n).astype(jnp.bfloat16), [(0, 0), (0, panels * PANEL - n)])
  data = w2.reshape(k // 2, 2, panels, PANEL).transpose(2, 0, 3, 1).reshape(panels, k // 2, 2 * PANEL)
  return PackedWeight(data, k, n, shape)


def matmul(x: jax.Array, w: jax.Array | PackedWeight, out_dtype: Any = jnp.float32) -> jax.Array:
  """`x [m, k] @ w` from bfloat16 operands, products exact and sums in fp32 (as XLA's bf16 product with a
  float32 result), in `out_dtype` (float32, or bfloat16: the fp32 sums rounded to nearest even); `k` even.
  `w`: a `PackedWeight` (`pack`: the sampler packs its weights once), or a matrix `[k, n]` packed here. At
  most 16 rows (a decode step) multiply each panel of the weight in blocks that stream it once; more rows (a
  prefill), each panel with all of `k` at a time."""
  usable, why = status()
  if not usable:
    raise RuntimeError(f"the CPU matmul kernel is not available: {why}")
  if not isinstance(w, PackedWeight):
    if w.ndim != 2:
      raise ValueError(f"cpu_matmul.matmul: w {w.shape} is not a matrix [k, n] (or a PackedWeight)")
    if x.ndim == 2 and x.shape[1] % 2:
      raise ValueError(f"cpu_matmul.matmul: the contraction ({x.shape[1]}) must be even")
    w = pack(w)
  if x.ndim != 2 or x.shape[1] != w.k:
    raise ValueError(f"cpu_matmul.matmul: x {x.shape} and w (k={w.k}, n={w.n}) are not [m, k] @ [k, n]")
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"cpu_matmul.matmul: out_dtype {out_dtype} must be float32 or bfloat16")
  small = x.shape[0] <= SMALL_ROWS  # its sums build up in the output over blocks of k: fp32, then rounded
  result = jax.ShapeDtypeStruct((x.shape[0], w.n), jnp.float32 if small else out_dtype)
  call = jax.ffi.ffi_call(TARGET, result, vmap_method="sequential")
  return call(x.astype(jnp.bfloat16), w.data).astype(out_dtype)
