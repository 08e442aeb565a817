"""`host_memory.release` gives a fragmented C heap's free pages back to the OS (glibc, Linux)."""

import sys

import numpy as np
import pytest

from s3_jax import host_memory


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_release_returns_a_fragmented_heaps_free_pages():
  host_memory.release()
  # 64 KB arrays sit in the heap (below glibc's mmap threshold); keeping every 64th one alive pins the
  # heap's top, so freeing the rest returns nothing to the OS by itself.
  arrays = [np.ones(8192) for _ in range(8192)]  # 512 MB, touched
  kept = arrays[::64]
  del arrays
  before = _rss_mb()
  assert host_memory.release()
  after = _rss_mb()
  assert before - after > 300, (before, after)
  assert all(float(a[0]) == 1.0 for a in kept)  # live blocks untouched
