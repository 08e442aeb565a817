"""Giving the host memory a stage freed back to the operating system.

XLA:CPU allocates its buffers with the C library's `malloc`. glibc keeps most freed blocks in its heaps
rather than returning them, so a stage that frees gigabytes (the rollout's KV caches, the update's
temporaries) leaves the process's resident set where its peak was, and the next stage's peak lands on top:
measured on a 16-question SmolLM2 step (`benchmarks/step_memory.py --trim`), 3.65 GB of live arrays in an
11.5 GB resident set after the rollout, 5.4 GB after `malloc_trim(0)`. `release()` is called between the
stages of a PPO step and after each rollout turn.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
  """glibc's `malloc_trim`, or None where the C library has none (macOS, musl): there is nothing to do."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # not glibc
    return None
  return getattr(libc, "malloc_trim", None)


def release() -> bool:
  """Returns the free pages of the C heap to the OS (glibc `malloc_trim(0)`: tens of ms on a 10 GB heap);
  whether any were returned."""
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False
