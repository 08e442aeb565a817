"""Attention over a KV cache on CPU as an XLA FFI custom call (`cpu_attention.cc`), built on first use: a
decode step's (one new position per row) and a chunked prefill's (new positions written into a kept cache).

XLA:CPU has no fused attention. A decode step's attention reads the whole cache once per layer (~19 GB/s in
fp32; a bf16 cache is converted before its dot, slower than fp32), every slot of the cache's bucket; a chunked
prefill materialises [new, slots] scores and masks, computes the causal half of its own block and the padding
of every row. The kernel reads the cache in its own dtype (bf16: half the bytes), only the 16-slot blocks a
query can see, and computes scores, softmax and sums in fp32 (`benchmarks/README.md`, cached attention).

The C++ source is compiled with the host's C++ compiler (`$CXX`, else `g++`/`c++`) for this machine's
instruction set, into `$S3_JAX_CACHE/kernels/` keyed by the source, the flags and the jaxlib headers;
`status()` says whether it is usable and why not. Nothing here is used on GPU/TPU, where XLA's own
attention runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from s3_jax import assets

TARGET = "s3_cached_attention"
SOURCE = Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-ffp-contract=fast",
         "-fno-math-errno", "-shared", "-fPIC")
HEAD_DIMS = (16, 32, 64, 128)  # instantiated in the kernel
MAX_GROUP = 8  # query heads per kv head


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_flags() -> str:
  """The CPU's feature flags (`/proc/cpuinfo`'s first `flags` line; "" where there is none)."""
  path = Path("/proc/cpuinfo")
  if path.exists():
    for line in path.read_text(errors="replace").splitlines():
      if line.startswith("flags"):
        return line
  return ""


def _library_path(compiler: str) -> Path:
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  key.update(" ".join((compiler, *FLAGS, jax.ffi.include_dir(), jax.__version__)).encode())
  key.update(_cpu_flags().encode())  # -march=native: a build is only good for this instruction set
  return assets.cache_dir() / "kernels" / f"cpu_attention-{key.hexdigest()[:16]}.so"


def _build(compiler: str, out: Path) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    partial = Path(tmp) / out.name
    command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    os.replace(partial, out)  # atomic: a concurrent process sees the whole library or none


@functools.cache
def _load() -> tuple[bool, str]:
  """Builds (once per source and machine) and registers the kernel; (usable, why not)."""
  if jax.default_backend() != "cpu":
    return False, f"the default backend is {jax.default_backend()}, not cpu"
  compiler = _compiler()
  if compiler is None:
    return False, "no C++ compiler ($CXX, g++ or c++) on PATH"
  path = _library_path(compiler)
  if not path.exists():
    _build(compiler, path)
  library = ctypes.cdll.LoadLibrary(str(path))
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
