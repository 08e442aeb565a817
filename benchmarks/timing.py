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


def interleaved_medians(fns: dict, repeats: int, warmup: int = 3) -> dict:
  """Median wall time of each of `fns`, calling them in turn `repeats` times (after `warmup` rounds) so
  that this VM's drift hits all of them alike."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
