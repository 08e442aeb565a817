"""Timing shared by the benchmark scripts."""

import statistics
import time


def median_time(fn, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn`, after one warm-up call (which also compiles)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
