"""Which compute dtype pays on this machine: `"auto"` is bfloat16 where the hardware has bf16 matrix units
(TPUs, GPUs, CPUs with AMX-BF16 or AVX512-BF16) and float32 elsewhere.

On XLA:CPU a bf16 matmul is fast only with float32 accumulation (`decoder.dot`); with it, prefill and the
learner's passes run 1.3-1.5x faster on the 2-core Sapphire Rapids VM (`benchmarks/README.md`). Master
weights, optimizer state, log-softmax, norms' statistics, losses and advantages stay float32 either way.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether `cpuinfo`'s flags list AMX-BF16 or AVX512-BF16 (False where the file is missing)."""
  path = Path(cpuinfo)
  if not path.exists():
    return False
  for line in path.read_text(errors="replace").splitlines():
    if line.startswith("flags"):
      return any(flag in line.split() for flag in _CPU_BF16_FLAGS)
  return False


def resolve(name: str, backend: str | None = None) -> str:
  """`"auto"` -> `"bfloat16"` or `"float32"` for `backend` (default: JAX's); other names unchanged."""
  if name != "auto":
    if name not in DTYPES:
      raise ValueError(f"dtype {name!r} must be auto, float32 or bfloat16")
    return name
  if backend is None:
    import jax

    backend = jax.default_backend()
  if backend in ("tpu", "gpu", "cuda", "rocm"):
    return "bfloat16"
  return "bfloat16" if cpu_has_bf16_units() else "float32"


def dtype(name: str, backend: str | None = None):
  """The JAX dtype `resolve(name)` names."""
  return DTYPES[resolve(name, backend)]


def sampling_dtype(config):
  """The sampler's compute dtype for `config`: `rollout.compute_dtype`, "" = `searcher.compute_dtype`."""
  return dtype(config.rollout.compute_dtype or config.searcher.compute_dtype)
